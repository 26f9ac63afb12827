"""The `davir` command. Thin: parse, build from the library, call it, print.

Subcommands: `demo` (the embedded default job), `info` (a model's architecture, parameter count
and shardings), `export` (any model source to a Hugging Face directory), `config` (print the
resolved config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults)")


def _load_cfg(args: argparse.Namespace, overrides: list[str]) -> Any:
    from davir_jax.config import load_config

    return load_config(args.config, overrides)


def _mesh(cfg: Any) -> Any:
    from davir_jax.sharding import make_mesh

    return make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)


def _model(cfg: Any, mesh: Any) -> Any:
    from davir_jax.models import load_model, random_model

    m = cfg.model
    if m.source is not None:
        return load_model(m.source, m.dtype, mesh, compute_dtype=m.compute_dtype, remat=m.remat)
    return random_model(
        m.arch, m.dtype, mesh, compute_dtype=m.compute_dtype, remat=m.remat, seed=cfg.seed
    )


def cmd_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    """Load the default model, print per-token losses and a greedy chat answer."""
    import numpy as np

    from davir_jax.evaluate import sequence_losses as sentence_losses
    from davir_jax.generation import greedy_generate
    from davir_jax.models import load_tokenizer

    cfg = _load_cfg(args, overrides)
    if cfg.model.source is None:
        raise SystemExit("davir demo needs model.source (a tokenizer comes with the weights)")
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

        from davir_jax.config import ModelConfig

        cfg = dataclasses.replace(cfg, model=ModelConfig(source=args.source))
    model = _model(cfg, mesh)
    print(json.dumps(model.arch.to_dict(), indent=2))
    print(f"parameters: {model.arch.num_params():,}; mesh {dict(mesh.shape)}")
    for path, sh in sharding_of(model).items():
        if args.verbose or path.startswith(("embed", "layers.0.", "lm_head", "final")):
            print(f"  {path:40s} {sh.spec}")
    return 0


def cmd_export(args: argparse.Namespace, overrides: list[str]) -> int:
    from davir_jax.models import export_hf, load_model, load_tokenizer

    model = load_model(args.source, args.dtype)
    tok = None
    try:
        tok = load_tokenizer(args.source)
    except (ValueError, OSError) as e:
        print(f"note: no tokenizer exported ({e})", file=sys.stderr)
    out = export_hf(model, tok, args.out)
    print(f"wrote {out}")
    return 0


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    import yaml

    from davir_jax.config import to_dict

    print(yaml.safe_dump(to_dict(_load_cfg(args, overrides)), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="davir",
        description="DavIR data selection (arXiv 2310.13008) in JAX. Any --section.key=value "
        "after the subcommand overrides a config key.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    d = sub.add_parser(
        "demo", help="run the embedded default job (SmolLM2-135M): losses and a greedy chat answer"
    )
    _config_args(d)
    d.add_argument("--max-new-tokens", type=int, default=24)
    d.set_defaults(fn=cmd_demo)
    i = sub.add_parser("info", help="architecture, parameter count and shardings of a model")
    _config_args(i)
    i.add_argument("source", nargs="?", help="a model source (default: model.source)")
    i.add_argument("-v", "--verbose", action="store_true", help="every parameter's sharding")
    i.set_defaults(fn=cmd_info)
    e = sub.add_parser("export", help="write any model source as a Hugging Face directory")
    e.add_argument("source")
    e.add_argument("out")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.set_defaults(fn=cmd_export)
    c = sub.add_parser("config", help="print the resolved config")
    _config_args(c)
    c.set_defaults(fn=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    from davir_jax.config import ConfigError

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
        return args.fn(args, rest)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"davir {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
