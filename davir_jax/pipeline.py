"""The whole DavIR experiment as one resumable job (`davir pipeline`, `davir demo`).

    reference SFT on the pool -> score (base, reference) -> select (davir, rho, random, ...) ->
    SFT the base on each subset -> evaluate every model on held-out data -> report.md

Each stage writes into the run folder (`pipeline.out`) and records `stages/<name>.json` with a
fingerprint of its inputs; a rerun skips every stage whose record matches, so a killed pipeline
resumes where it stopped (and the SFT and scoring stages themselves resume mid-way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from davir_jax.config import Config, to_dict
from davir_jax.io_utils import file_sha256, write_json
from davir_jax.preflight import checked


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


def add_extra_pools(sel_dir: Path, extra: tuple[str, ...]) -> None:
    """Append whole extra data files (`NAME=FILE`) to a selection as more pools (the paper's
    mixture: a DavIR-compressed Alpaca plus all of GSM8K)."""
    if not extra:
        return
    from davir_jax.data.readers import resolve_format

    path = sel_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    for spec in extra:
        name, eq, file = spec.partition("=")
        if not eq or not Path(file).is_file():
            raise ValueError(f"pipeline.extra_pools: {spec!r} is not NAME=FILE with FILE present")
        shutil.copyfile(file, sel_dir / f"{name}.jsonl")
        manifest["pools"].append(
            {
                "name": name,
                "file": f"{name}.jsonl",
                "format": resolve_format(file),
                "template": manifest["pools"][0]["template"],
                "budget": {"spec": "all"},
                "data": {"path": str(Path(file).resolve()), "sha256": file_sha256(file)},
            }
        )
    write_json(path, manifest)


@checked("pipeline")  # preflight: every input and output checked, the output locked
def run_pipeline(cfg: Config, progress: bool = True) -> Path:
    """Run (or resume) the pipeline of `cfg.pipeline`; returns the run folder."""
    from davir_jax.evaluate import run_eval
    from davir_jax.report import write_report
    from davir_jax.scoring import score
    from davir_jax.selection import run_select
    from davir_jax.train import sft

    pc = cfg.pipeline
    if pc.out is None or cfg.data.path is None or cfg.model.source is None:
        raise ValueError("davir pipeline needs pipeline.out, data.path (the pool) and model.source")
    out = Path(pc.out)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    stages = Stages(out, say)
    write_json(out / "config.json", to_dict(cfg))
    common = {
        "model": to_dict(cfg.model),
        "data": to_dict(cfg.data),
        "seed": cfg.seed,
        "pool": _file_fp(cfg.data.path),
    }
    train_inputs = {**common, "optimizer": to_dict(cfg.optimizer), "train": to_dict(cfg.train)}

    # 1. The reference: the base fine-tuned on the whole pool (method.md step 1).
    ref = pc.reference or str(out / "reference")
    if pc.reference is None:
        stages.run(
            "reference",
            train_inputs,
            lambda: sft(_with(cfg, train={"out": ref, "selection": None}), progress),
        )

    # 2. Both models over the pool.
    scores_dir = out / "scores"
    stages.run(
        "scores",
        {**common, "reference": ref, "scoring": to_dict(cfg.scoring)},
        lambda: score(
            _with(
                cfg, scoring={"base": cfg.model.source, "reference": ref, "out": str(scores_dir)}
            ),
            progress,
        ),
    )

    # 3-4. Select with every method at every budget; SFT the base on each subset.
    runs: dict[str, str] = {}
    for budget in pc.budgets:
        for method in pc.methods:
            name = f"{method}-{budget.replace('=', '')}"
            sel = out / "select" / name
            stages.run(
                f"select/{name}",
                {
                    "scores": file_sha256(scores_dir / "scores.parquet"),
                    "method": method,
                    "budget": budget,
                    "extra": list(pc.extra_pools),
                    "seed": cfg.seed,
                },
                lambda sel=sel, method=method, budget=budget: (
                    run_select([f"pool={scores_dir}:{budget}"], method, str(sel), cfg.seed),
                    add_extra_pools(sel, pc.extra_pools),
                ),
            )
            target = str(out / "sft" / name)
            stages.run(
                f"sft/{name}",
                {**train_inputs, "selection": file_sha256(sel / "manifest.json")},
                lambda sel=sel, target=target: sft(
                    _with(cfg, train={"out": target, "selection": str(sel)}), progress
                ),
            )
            runs[name] = target

    # 5. Held-out evaluation of the base, the full-pool SFT and every subset model.
    models = {"base": cfg.model.source, **({"full": ref} if pc.full else {}), **runs}
    if pc.test is not None:
        for name, source in models.items():
            inputs = {
                "model": source,
                "test": _file_fp(pc.test),
                "eval": to_dict(cfg.eval),
                "generate": pc.generate,
                "data": to_dict(cfg.data),
                "trained": _stage_fp(out, name),
            }
            stages.run(
                f"eval/{name}",
                inputs,
                lambda name=name, source=source: run_eval(
                    _with(
                        cfg,
                        model={"source": source},
                        data={"path": pc.test, "strict": False},
                        eval={"out": str(out / "eval" / name), "generate": pc.generate},
                    ),
                    progress,
                ),
            )

    # 6. The report.
    write_report(out, cfg)
    say(f"[pipeline] report: {out / 'report.md'}")
    return out


def _stage_fp(out: Path, name: str) -> str | None:
    """The fingerprint of the SFT stage that produced model `name` (so evaluations rerun when
    their model was retrained)."""
    rec = out / "stages" / ("reference.json" if name == "full" else f"sft_{name}.json")
    return json.loads(rec.read_text())["fingerprint"] if rec.is_file() else None
