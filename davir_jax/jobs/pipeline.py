"""The whole DavIR experiment as one resumable job (`davir pipeline`, `davir demo`).

    reference SFT on the pool -> score (base, reference) -> select (davir, rho, random, ...) ->
    SFT the base on each subset -> evaluate every model on held-out data -> report.md

Each stage writes into the run folder (`pipeline.out`) and records `stages/<name>.json` with a
fingerprint of the CONTENT of its inputs (data files by sha256, models by
`loading.model_fingerprint`, the settings that change its result), never of a path; a rerun
skips every stage whose record matches, so a killed pipeline resumes where it stopped (and the
SFT and scoring stages themselves resume mid-way), and a changed input (a retrained reference,
an edited pool, another learning rate) reruns exactly the stages downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from davir_jax.config import Config
from davir_jax.core import storage
from davir_jax.core.io import file_sha256, write_json
from davir_jax.core.schema import to_dict
from davir_jax.core.selection import SelectionMethod
from davir_jax.data.readers import resolve_format, source_name
from davir_jax.engine.preflight import checked
from davir_jax.jobs.evaluate import run_eval
from davir_jax.jobs.score import score
from davir_jax.jobs.select import run_select
from davir_jax.jobs.sft import sft
from davir_jax.models.loading import load_tokenizer_for, model_fingerprint
from davir_jax.reports.report import write_report


def _fp(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class Stages:
    """Run-once bookkeeping: a stage runs unless `stages/<name>.json` holds the same inputs."""

    def __init__(self, out: Path, say: Callable[[str], None]) -> None:
        self.dir, self.say = out / "stages", say
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def run(self, name: str, inputs: dict[str, Any], fn: Callable[[], Any]) -> None:
        record = self.dir / f"{name.replace('/', '_')}.json"
        fp = _fp(inputs)
        if record.is_file() and json.loads(record.read_text()).get("fingerprint") == fp:
            self.say(f"[pipeline] {name}: done before, skipped")
            return
        self.say(f"[pipeline] {name} ...")
        t0 = time.time()
        fn()
        self.timings[name] = time.time() - t0
        write_json(
            record,
            {"fingerprint": fp, "inputs": inputs, "seconds": round(self.timings[name], 1)},
            default=str,
        )


def _with(cfg: Config, **sections: dict[str, Any]) -> Config:
    """`cfg` with some keys of some sections replaced."""
    return dataclasses.replace(
        cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    )


def _file_fp(path: str | None) -> str | None:
    return None if path is None else file_sha256(path)


# Settings that decide where a job writes or how often it reports, not what it computes.
_NOT_RESULTS = {
    "train": (
        *("out", "overwrite", "selection", "log_every", "checkpoint_every", "keep_checkpoints"),
        *("min_steps", "strict_steps"),
    ),
    "data": ("path", "cache_dir"),
    "scoring": ("base", "reference", "proxy", "out", "overwrite", "diagnostics"),
    "eval": ("out",),
}


def _settings(section: str, obj: Any) -> dict[str, Any]:
    return {k: v for k, v in to_dict(obj).items() if k not in _NOT_RESULTS.get(section, ())}


def data_inputs(dc: Any, path: str | None = None) -> dict[str, Any]:
    """A data file as a stage input: its bytes' sha256 and the name its example ids carry (not
    its path), with the data settings."""

    path = path if path is not None else dc.path
    return {
        **_settings("data", dc),
        "sha256": _file_fp(path),
        "source": dc.name or (None if path is None else source_name(path)),
    }


def model_inputs(mc: Any, source: str | None = None) -> dict[str, Any]:
    """A model as a stage input: the content fingerprint of its source (weights, architecture,
    tokenizer files) and how it is run."""

    source = source if source is not None else mc.source
    run = {k: v for k, v in to_dict(mc).items() if k != "source"}
    return {**run, "fingerprint": model_fingerprint(source)}


def add_extra_pools(sel_dir: Path, extra: tuple[str, ...]) -> None:
    """Append whole extra data files (`NAME=FILE`) to a selection as more pools (the paper's
    mixture: a DavIR-compressed Alpaca plus all of GSM8K)."""
    if not extra:
        return

    path = sel_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for spec in extra:
        name, eq, file = spec.partition("=")
        if not eq or not storage.upath(file).is_file():
            raise ValueError(f"pipeline.extra_pools: {spec!r} is not NAME=FILE with FILE present")
        storage.copy_file(file, sel_dir / f"{name}.jsonl")
        manifest["pools"].append(
            {
                "name": name,
                "file": f"{name}.jsonl",
                "format": resolve_format(file),
                "template": manifest["pools"][0]["template"],
                "budget": {"spec": "all"},
                "data": {"path": storage.resolved(file), "sha256": file_sha256(file)},
            }
        )
    write_json(path, manifest)


@checked("pipeline")  # preflight: every input and output checked, the output locked
def run_pipeline(cfg: Config, progress: bool = True) -> Path:
    """Run (or resume) the pipeline of `cfg.pipeline`; returns the run folder."""

    pc = cfg.pipeline
    if pc.out is None or cfg.data.path is None or cfg.model.source is None:
        raise ValueError("davir pipeline needs pipeline.out, data.path (the pool) and model.source")
    out = storage.upath(pc.out)  # a local path or a URL (gs://)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731

    # Before any stage: the base's tokenizer must fit the base (and a given reference).
    load_tokenizer_for(cfg.model.source, (pc.reference,))
    stages = Stages(out, say)
    write_json(out / "config.json", to_dict(cfg))
    common = {
        "model": model_inputs(cfg.model),
        "data": data_inputs(cfg.data),
        "seed": cfg.seed,
    }
    train_inputs = {
        **common,
        "optimizer": to_dict(cfg.optimizer),
        "train": _settings("train", cfg.train),
    }
    # 1. The reference: the base fine-tuned on the whole pool (method.md step 1).
    ref = pc.reference or str(out / "reference")
    if pc.reference is None:
        _reference_stage(cfg, stages, ref, train_inputs, progress)
    # 2. Both models over the pool.
    _scores_stage(cfg, stages, out / "scores", ref, common, progress)

    # 3-4. Select with every method at every budget, for every seed; SFT the base on each
    # subset with that seed (random draws another subset, every method another data order).
    runs: dict[str, str] = {}
    for budget in pc.budgets:
        for spec in pc.methods:
            method = SelectionMethod.parse(spec)
            for k in range(pc.seeds):
                name = run_name(method.label, budget, k)
                runs[name] = _subset_run(
                    cfg, stages, out, name, (method, budget, cfg.seed + k), train_inputs, progress
                )

    # 5. Held-out evaluation of the base, the full-pool SFT and every subset model.
    models = {"base": cfg.model.source, **({"full": ref} if pc.full else {}), **runs}
    if pc.test is not None:
        for name, source in models.items():
            _eval_stage(cfg, stages, out, name, source, progress)

    # 6. The report.
    write_report(out, cfg)
    say(f"[pipeline] report: {out / 'report.md'}")
    return out


# The pipeline owns its folders: a stage whose record does not match has stale outputs, so its
# job may replace them (a job still resumes its own unfinished run of the same inputs).
_OWN = {"overwrite": True}


def _reference_stage(
    cfg: Config, stages: Stages, ref: str, train_inputs: dict[str, Any], progress: bool
) -> None:
    """The base fine-tuned on the whole pool. With `pipeline.val`, its recipe (the epoch it
    stops at) is chosen by the loss on that split of the pool alone: the later stages cannot
    influence it."""
    pc = cfg.pipeline
    val = {"val": pc.val} if pc.val is not None else {}
    stages.run(
        "reference",
        {**train_inputs, "val": data_inputs(cfg.data, pc.val) if pc.val else None},
        lambda: sft(_with(cfg, train={"out": ref, "selection": None, **val, **_OWN}), progress),
    )


def _scores_stage(
    cfg: Config, stages: Stages, scores_dir: Path, ref: str, common: dict, progress: bool
) -> None:
    """Both models over the pool (the reference by its content: retrained, it is rescored)."""
    inputs = {
        **common,
        "reference": model_inputs(cfg.model, ref),
        "scoring": _settings("scoring", cfg.scoring),
    }
    if cfg.scoring.proxy is not None:  # by its content, like the other models
        inputs["proxy"] = model_inputs(cfg.model, cfg.scoring.proxy)
    scoring = {"base": cfg.model.source, "reference": ref, "out": str(scores_dir), **_OWN}
    stages.run("scores", inputs, lambda: score(_with(cfg, scoring=scoring), progress))


def _eval_stage(
    cfg: Config, stages: Stages, out: Path, name: str, source: str, progress: bool
) -> None:
    """One model on the held-out set (by its content: a retrained model is evaluated again)."""
    pc = cfg.pipeline
    inputs = {
        "model": model_inputs(cfg.model, source),
        "test": data_inputs(cfg.data, pc.test),
        "eval": _settings("eval", cfg.eval),
        "generate": pc.generate,
        "seed": cfg.seed,
    }
    run_cfg = _with(
        cfg,
        model={"source": source},
        data={"path": pc.test, "strict": False},
        eval={"out": str(out / "eval" / name), "generate": pc.generate},
    )
    stages.run(f"eval/{name}", inputs, lambda: run_eval(run_cfg, progress))


def run_name(method: str, budget: str, seed_index: int) -> str:
    """The name of one subset model: `davir-fraction0.1-s0`."""
    return f"{method}-{budget.replace('=', '')}-s{seed_index}"


def _subset_run(
    cfg: Config,
    stages: Stages,
    out: Path,
    name: str,
    spec: tuple[SelectionMethod, str, int],
    train_inputs: dict[str, Any],
    progress: bool,
) -> str:
    """Select with `spec` = (method, budget, seed) and SFT the base on the subset with that
    seed; returns the SFT run folder (a model source)."""

    method, budget, seed = spec
    pc, scores_dir = cfg.pipeline, out / "scores"
    extra = [
        (n, _file_fp(f) if storage.upath(f).is_file() else f)
        for n, _, f in (x.partition("=") for x in pc.extra_pools)
    ]
    sel = out / "select" / name
    stages.run(
        f"select/{name}",
        {
            "scores": file_sha256(scores_dir / "scores.parquet"),
            # A plain score keeps its old stage key (earlier runs stay valid).
            "method": method.score
            if method.label == method.score and not (method.filters or method.diversity)
            else dataclasses.asdict(method),
            "budget": budget,
            "extra": extra,
            "seed": seed,
        },
        lambda: (
            run_select(
                [f"pool={scores_dir}:{budget}"],
                method.score,
                str(sel),
                seed,
                method.filters,
                method.diversity,
            ),
            add_extra_pools(sel, pc.extra_pools),
        ),
    )
    target = str(out / "sft" / name)
    seeded = dataclasses.replace(cfg, seed=seed)
    stages.run(
        f"sft/{name}",
        {**train_inputs, "seed": seed, "selection": _selection_fp(sel)},
        lambda: sft(
            _with(seeded, train={"out": target, "selection": str(sel), **_OWN}),
            progress,
        ),
    )
    return target


def _selection_fp(sel: Path) -> str:
    """A selection as SFT reads it (`train.training_data`): every pool's rows file by content,
    with its name, format and template; the manifest's paths are left out."""
    manifest = json.loads((sel / "manifest.json").read_text())
    pools = [
        {
            **{k: p.get(k) for k in ("name", "format", "template")},
            "data_format": p.get("data", {}).get("format"),
            "sha256": file_sha256(sel / p["file"]),
        }
        for p in manifest.get("pools", [])
    ]
    return _fp(pools)
