"""The `davir` command. Thin: parse, build from the library, call it, print.

Subcommands: `demo` (the embedded default job), `info` (a model's architecture, parameter count
and shardings), `export` (any model source to a Hugging Face directory, LoRA adapters merged;
or `--peft`: a LoRA source's adapters as a PEFT directory), `score` (the DavIR
scoring job), `select` (top examples by a score, mixtures), `diagnostics` (length correlations),
`config` (print the resolved config).

`--plugins FILE.py,MODULE` (or `DAVIR_PLUGINS`) loads objectives, scores and model families from
outside the package first (`davir_jax.plugins`).

Errors: a user's mistake (a path, a config key or value, a data file) prints one line
`davir CMD: error: ...` and exits 2; a bug keeps its traceback; `--debug` shows every traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub


def _config_args(p: argparse.ArgumentParser, *sections: str) -> None:
    """`--config`, and an option for every key of the config `sections` the command reads (all
    when none are named) with the short flags the schema declares for it (`cli_schema`)."""
    from davir_jax.cli_schema import add_config_options
    from davir_jax.config import Config

    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")
    add_config_options(p, p.prog.split()[-1], sections or None, Config)
    # An abbreviation of a dotted option (--data.max_l) must stay an unknown key, not a guess.
    p.allow_abbrev = False


def _overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The generated options' overrides (shorthands, then dotted keys), then the unparsed ones."""
    from davir_jax.cli_schema import config_overrides

    return config_overrides(args) + overrides


def _load_cfg(args: argparse.Namespace, overrides: list[str]) -> Any:
    from davir_jax.config import load_config

    return _started(load_config(args.config, _overrides(args, overrides)))


def _started(cfg: Any) -> Any:
    """`cfg` once its mesh's runtime settings (CPU device count, compile cache) are applied:
    before any JAX computation, which fixes the device count (library entry points apply them
    too, through `mesh_from_config`)."""
    from davir_jax.core.sharding import use_compile_cache, use_cpu_devices

    use_cpu_devices(cfg.mesh.cpu_devices)
    use_compile_cache(cfg.mesh.compile_cache)
    return cfg


def _mesh(cfg: Any) -> Any:
    from davir_jax.core.sharding import mesh_from_config

    return mesh_from_config(cfg.mesh)


def _model(cfg: Any, mesh: Any) -> Any:
    from davir_jax.models import load_model, random_model

    m = cfg.model
    if m.source is not None:
        return load_model(m.source, m.dtype, mesh, **m.run_options())
    return random_model(m.arch, m.dtype, mesh, seed=cfg.seed, **m.run_options())


def cmd_pipeline(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.jobs.pipeline import run_pipeline

    out = run_pipeline(_load_cfg(args, overrides), progress=not args.quiet)
    print(f"wrote {out / 'report.md'}")
    return 0


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    """The embedded default job: the whole pipeline with SmolLM2-135M on the real instruction
    data shipped in `davir_jax/demo` (pool, validation and test split i.i.d.), or on
    `--data`/`--test` files (a pool the config or the command line names)."""
    from pathlib import Path

    from davir_jax.config import load_config
    from davir_jax.core.errors import UserError
    from davir_jax.demo import make_splits, pipeline_overrides
    from davir_jax.jobs.pipeline import run_pipeline

    config = args.config or str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    if not Path(config).is_file():  # installed without the repository's configs/
        config = None
    user = _overrides(args, overrides)
    cfg = _started(load_config(config, user))
    from davir_jax.core import storage

    out = storage.upath(cfg.pipeline.out or "runs/demo")  # a local path or a URL (gs://)
    splits = None
    if cfg.data.path is None:
        try:
            n_pool, n_val, n_test = (int(x) for x in args.sizes.split(","))
        except ValueError:
            raise UserError(
                f"--sizes: {args.sizes!r} is not POOL,VAL,TEST (three integers)"
            ) from None
        splits = make_splits(out / "data", n_pool, n_val, n_test, seed=cfg.seed)
    cfg = load_config(config, pipeline_overrides(out, splits) + user)
    t0 = time.time()
    run_pipeline(cfg, progress=not args.quiet)
    print(f"wrote {out / 'report.md'} in {time.time() - t0:.0f}s")
    print((out / "report.md").read_text())
    return 0


def cmd_hello(args: argparse.Namespace, overrides: list[str]) -> int:
    """Load the default model, print per-token losses and a greedy chat answer."""
    import numpy as np

    from davir_jax.engine.nll import sequence_losses as sentence_losses
    from davir_jax.models.generation import greedy_generate
    from davir_jax.models.loading import load_tokenizer_for as load_tokenizer

    cfg = _load_cfg(args, overrides)
    if cfg.model.source is None:
        raise SystemExit(
            "davir hello needs a model source (a tokenizer comes with the weights), not a random "
            "architecture"
        )
    t0 = time.time()
    mesh = _mesh(cfg)
    model = _model(cfg, mesh)
    tok = load_tokenizer(cfg.model.source)
    print(
        f"loaded {cfg.model.source}: {model.arch.family}, {model.arch.num_params():,} "
        f"parameters, mesh {dict(mesh.shape)} in {time.time() - t0:.1f}s"
    )
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "Paris is the capital and most populous city of France.",
    ]
    ids = [tok(s)["input_ids"] for s in sentences]
    rng = np.random.default_rng(0)
    shuffled = [list(rng.permutation(x)) for x in ids]
    print("\nper-token loss (nats), text vs the same tokens shuffled:")
    for s, a, b in zip(sentences, sentence_losses(model, ids), sentence_losses(model, shuffled)):
        print(f"  {a:6.3f}  vs {b:6.3f}  {s}")
    question = "What is the capital of France?"
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    # Stop on the tokenizer's EOS and on every EOS the model config lists (Llama 3 has two).
    arch_eos = model.arch.eos_token_id
    eos = {tok.eos_token_id} | set(arch_eos if isinstance(arch_eos, tuple) else [arch_eos])
    eos = sorted(e for e in eos if e is not None)
    t0 = time.time()
    answer = greedy_generate(model, [prompt_ids], args.max_new_tokens, eos)[0]
    text = tok.decode(answer, skip_special_tokens=True).strip()
    print(f"\nQ: {question}\nA: {text}\n({len(answer)} tokens, greedy, {time.time() - t0:.1f}s)")
    return 0


def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.models.weights import sharding_of

    cfg = _load_cfg(args, overrides)
    mesh = _mesh(cfg)
    if args.source:
        import dataclasses

        from davir_jax.models.config import ModelConfig

        cfg = dataclasses.replace(cfg, model=ModelConfig(source=args.source))
    model = _model(cfg, mesh)
    print(json.dumps(model.arch.to_dict(), indent=2))
    print(f"parameters: {model.arch.num_params():,}; mesh {dict(mesh.shape)}")
    for path, sh in sharding_of(model).items():
        if args.verbose or path.startswith(("embed", "layers.0.", "lm_head", "final")):
            print(f"  {path:40s} {sh.spec}")
    return 0


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    """Any model source as a Hugging Face directory (a LoRA source with its adapters merged),
    or with `--peft` a LoRA source's adapters as a PEFT adapter directory."""
    from davir_jax.models import export_hf, load_model
    from davir_jax.models.loading import load_tokenizer_for, lora_config, lora_meta
    from davir_jax.models.lora import export_peft, merge_lora

    meta = lora_meta(args.source) if args.peft else None  # refused first if not a LoRA source
    model = load_model(args.source, args.dtype)
    if meta is not None:
        out = export_peft(model, meta["base"]["source"], lora_config(meta), args.out)
        print(f"wrote {out} (PEFT adapters of {meta['base']['source']})")
        return 0
    tok = None
    try:
        tok = load_tokenizer_for(args.source)
    except (ValueError, OSError) as e:
        print(f"note: no tokenizer exported ({e})", file=sys.stderr)
    out = export_hf(merge_lora(model), tok, args.out)
    print(f"wrote {out}")
    return 0


def cmd_score(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.jobs.score import score

    out = score(_load_cfg(args, overrides), progress=not args.quiet)
    print(f"wrote {out / 'scores.parquet'} and {out / 'manifest.json'}")
    return 0


def cmd_sft(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.jobs.sft import sft

    out = sft(_load_cfg(args, overrides), progress=not args.quiet)
    print(f"wrote {out} (metrics.jsonl, checkpoints/, model/)")
    return 0


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.jobs.evaluate import run_eval

    res = run_eval(_load_cfg(args, overrides), progress=not args.quiet)
    line = f"loss {res['loss']:.4f} nats/token ({res['n_examples']:,} examples)"
    if "accuracy" in res:
        line += f", {res['answer_check']} accuracy {res['accuracy']:.3f} of {res['n_generated']}"
    print(line)
    return 0


def cmd_dpo(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.jobs.dpo import dpo

    out = dpo(_load_cfg(args, overrides), progress=not args.quiet)
    print(f"wrote {out} (metrics.jsonl, eval.json, checkpoints/, model/)")
    return 0


def cmd_select(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.jobs.select import run_select

    if overrides:
        raise ValueError(f"davir select takes no config overrides, got {overrides}")
    manifest = run_select(args.pools, args.method, args.out, args.seed, args.filter, args.diversity)
    for pool in manifest["pools"]:
        print(f"{pool['name']}: {pool['n_selected']:,} of {pool['n_pool']:,} -> {pool['file']}")
        for f in pool.get("filters", []):
            print(f"  filter {f['filter']}: removed {f['removed']:,}")
        for d in pool.get("diversity", []):
            print(f"  diversity {d['method']}: removed {d['n_removed']:,}")
        if pool.get("n_short"):
            why = "; the diversity steps removed the rest" if pool.get("diversity") else ""
            print(
                f"  {pool['n_short']:,} short of the budget "
                f"({pool['n_passed']:,} passed the filters{why})"
            )
    print(f"wrote {args.out}/manifest.json ({manifest['n_selected']:,} examples, {args.method})")
    return 0


def cmd_diagnostics(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.reports.diagnostics import write_diagnostics

    write_diagnostics(args.scores, args.out, k=args.k, echo=True)
    return 0


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.jobs.plan import plan, render

    cfg = _load_cfg(args, overrides)
    compiled, devices = None, args.devices
    if args.compile:  # the estimate is then for the mesh the step was compiled on
        from davir_jax.jobs.aot import compile_step, render_compiled

        compiled = compile_step(cfg, args.job)
        devices = compiled["devices"]
    p = plan(cfg, args.job, args.chip, devices)
    text = render(p)
    if compiled is not None:
        p["compiled"] = compiled
        text += "\n" + render_compiled(compiled)
    print(json.dumps(p, indent=1) if args.json else text)
    return 1 if p["fits"] is False else 0


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    import yaml

    from davir_jax.core.schema import to_dict

    print(yaml.safe_dump(to_dict(_load_cfg(args, overrides)), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `davir` parser. A command that reads a config names its sections in `_config_args`;
    its config options (`--section.key`, short flags such as `--data`) come from the schema."""
    p = argparse.ArgumentParser(
        prog="davir",
        description="DavIR data selection (arXiv 2310.13008) in JAX. Any --section.key=value "
        "after the subcommand overrides a config key.",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of every error (also after the subcommand; or DAVIR_DEBUG=1)",
    )
    p.add_argument(
        "--plugins",
        metavar="SPEC[,SPEC]",
        help="load objectives, scores or model families from .py files or modules first "
        "(davir_jax.plugins; also after the subcommand; or DAVIR_PLUGINS=...)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _experiment_commands(sub)
    _model_commands(sub)
    _job_commands(sub)
    _tool_commands(sub)
    return p


def _experiment_commands(sub: Any) -> None:
    d = sub.add_parser(
        "demo",
        help="the embedded default job: the whole DavIR pipeline with SmolLM2-135M on real "
        "instruction data shipped with the package (alpaca-libre + GSM8K), 2 seeds",
    )
    d.add_argument(
        "--sizes",
        default="120,30,300",
        help="POOL,VAL,TEST: how many shipped rows each split draws (default 120,30,300)",
    )
    _quiet(d)
    _config_args(d)
    d.set_defaults(fn=cmd_demo)
    pl = sub.add_parser(
        "pipeline",
        help="reference SFT -> score -> select (davir, rho, random) -> SFT subsets -> eval -> "
        "report.md (resumable)",
    )
    _quiet(pl)
    _config_args(pl)
    pl.set_defaults(fn=cmd_pipeline)


def _model_commands(sub: Any) -> None:
    h = sub.add_parser("hello", help="load a model: per-token losses and a greedy chat answer")
    h.add_argument("--max-new-tokens", type=int, default=24)
    _config_args(h, "model", "mesh")
    h.set_defaults(fn=cmd_hello)
    i = sub.add_parser("info", help="architecture, parameter count and shardings of a model")
    i.add_argument("source", nargs="?", help="a model source (default: the config's)")
    i.add_argument("-v", "--verbose", action="store_true", help="every parameter's sharding")
    _config_args(i, "model", "mesh")
    i.set_defaults(fn=cmd_info)
    e = sub.add_parser(
        "export",
        help="write any model source as a Hugging Face directory (LoRA adapters merged), or a "
        "LoRA source's adapters as a PEFT directory (--peft)",
    )
    e.add_argument("source")
    e.add_argument("out")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    how = e.add_mutually_exclusive_group()
    how.add_argument(
        "--merged",
        action="store_true",
        help="merged weights W + (alpha/r) A B, as save_model/export_hf write (the default)",
    )
    how.add_argument(
        "--peft",
        action="store_true",
        help="adapter_config.json + adapter_model.safetensors for PeftModel.from_pretrained",
    )
    e.set_defaults(fn=cmd_export)


def _job_commands(sub: Any) -> None:
    """The jobs that read a model and a data file; each names the config sections it reads."""
    s = sub.add_parser(
        "score",
        help="score every example under a base and a reference model (resumable)",
        description="Writes OUT/scores.parquet (example_id, n_tokens, nll_base, nll_ref, ...), "
        "OUT/manifest.json and length-correlation diagnostics. Rerun the same command to resume.",
    )
    _quiet(s)
    _config_args(s, "model", "mesh", "data", "scoring")
    s.set_defaults(fn=cmd_score)
    t = sub.add_parser(
        "sft",
        help="supervised fine-tuning (resumable; DIR becomes a model source)",
        description="Writes DIR/checkpoints, DIR/metrics.jsonl, TensorBoard events in DIR/tb, "
        "DIR/loss.png and DIR/model. Rerun the same command to resume after a crash.",
    )
    _quiet(t)
    _config_args(t, "model", "mesh", "data", "optimizer", "train")
    t.set_defaults(fn=cmd_sft)
    po = sub.add_parser(
        "dpo",
        help="preference training: dpo, ipo, dpo_norm or davir_dpo (resumable)",
        description="Reference log-probs are precomputed once (or read from a davir score run "
        "with --reference-scores), or computed inside the step with the reference resident.",
    )
    _quiet(po)
    _config_args(po, "model", "mesh", "data", "optimizer", "train", "dpo")
    po.set_defaults(fn=cmd_dpo)
    ev = sub.add_parser(
        "eval",
        help="held-out loss, generation (KV cache; greedy or sampled) and exact-match accuracy",
    )
    _quiet(ev)
    _config_args(ev, "model", "mesh", "data", "eval")
    ev.set_defaults(fn=cmd_eval)


def _tool_commands(sub: Any) -> None:
    sel = sub.add_parser(
        "select",
        help="select the top examples by a score (per pool, with budgets)",
        description="POOL is [NAME=]SCORES_DIR:BUDGET with BUDGET = all | count=N | fraction=F, "
        "e.g. alpaca=runs/a:fraction=0.06 gsm8k=runs/g:all",
    )
    sel.add_argument("pools", nargs="+", metavar="POOL")
    sel.add_argument("--method", default="davir", help="score name (default davir)")
    sel.add_argument("--out", required=True)
    sel.add_argument("--seed", type=int, default=0, help="seed of the random score")
    sel.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="SCORE<VALUE",
        help="keep only rows whose score passes (<, <=, >, >=; repeatable), e.g. 'ifd<1' "
        "(Cherry/Superfiltering); the budget still counts against the whole pool",
    )
    sel.add_argument(
        "--diversity",
        action="append",
        default=[],
        metavar="STEP",
        help="after ranking (repeatable, in order): minhash[:threshold=0.8] drops near-duplicate "
        "texts; threshold[:min_distance=0.1] (DEITA) or facility[:pool=N] (Superfiltering.D) "
        "picks the budget on the embeddings the scoring run stored (its embed option)",
    )
    sel.set_defaults(fn=cmd_select)
    dg = sub.add_parser("diagnostics", help="length correlations, plots, top/bottom examples")
    dg.add_argument("scores", help="a scoring output directory or scores.parquet")
    dg.add_argument("--out", default=None, help="default: next to the scores")
    dg.add_argument("-k", type=int, default=5, help="top and bottom examples to show")
    dg.set_defaults(fn=cmd_diagnostics)
    pn = sub.add_parser(
        "plan",
        help="per-device memory, step FLOPs and ideal step time of a config (nothing allocated)",
    )
    pn.add_argument("--job", default="sft", choices=["sft", "dpo", "score"])
    pn.add_argument(
        "--chip", help="accelerator (default: the mesh section's): v4 v5e v5p v6e a100 h100 h200"
    )
    pn.add_argument("--devices", type=int, help="device count for a -1 mesh axis")
    pn.add_argument("--json", action="store_true")
    pn.add_argument(
        "--compile",
        action="store_true",
        help="also lower and compile the real step for the mesh of this process's devices "
        "(abstract shapes, no weights) and report XLA's memory analysis",
    )
    _config_args(pn)
    pn.set_defaults(fn=cmd_plan)
    c = sub.add_parser("config", help="print the resolved config")
    _config_args(c)
    c.set_defaults(fn=cmd_config)


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _take_plugins(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """argv without its `--plugins A,B` / `--plugins=A,B` options, and their values in order
    (None when the last `--plugins` has no value)."""
    rest: list[str] = []
    values: list[str] = []
    it = iter(argv)
    for a in it:
        if a == "--plugins":
            value = next(it, None)
            if value is None:
                return rest, None
            values.append(value)
        elif a.startswith("--plugins="):
            values.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    return rest, values


def main(argv: list[str] | None = None) -> int:
    """Run one command. The error boundary: a user's mistake (a missing or unwritable path, a
    bad config value or override, unusable data, a run directory in use; see
    `davir_jax.core.errors`) prints one line `davir CMD: error: ...` and returns 2; anything else is
    a bug and keeps its traceback. `--debug` prints the traceback of every error."""
    from davir_jax.core.distributed import init_from_env
    from davir_jax.core.errors import describe, user_error_types

    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is global: accepted before or after the subcommand.
    debug = "--debug" in argv or os.environ.get("DAVIR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    # --plugins is global too, loaded (with DAVIR_PLUGINS) before the parser is built and any
    # config is validated: a plugin's names are then valid wherever a built-in's are.
    argv, specs = _take_plugins(argv)
    if specs is None:
        print("davir: error: --plugins needs a value (SPEC[,SPEC])", file=sys.stderr)
        return 2
    specs.append(os.environ.get("DAVIR_PLUGINS", ""))
    try:
        if any(x.strip(", ") for x in specs):  # davir_jax.plugins imports jax: only when used
            from davir_jax.plugins import load_plugins

            load_plugins(",".join(specs))
    except user_error_types() as e:
        if debug:
            traceback.print_exc()
        cmd = next((a for a in argv if not a.startswith("-")), "")
        print(f"davir{' ' + cmd if cmd else ''}: error: {describe(e)}", file=sys.stderr)
        return 2
    args, rest = build_parser().parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        print(
            f"davir {args.cmd}: unrecognised arguments {bad} (overrides look like "
            "--section.key=value)",
            file=sys.stderr,
        )
        return 2
    try:
        init_from_env()
        return args.fn(args, rest)
    except user_error_types() as e:
        if debug:
            traceback.print_exc()
        print(f"davir {args.cmd}: error: {describe(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
