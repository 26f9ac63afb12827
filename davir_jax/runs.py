"""Run directories that refuse to mix: `run.json` records what a run is (models, data, config);
a rerun with the same identity resumes, a different one is refused unless `overwrite`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax

from davir_jax.io_utils import write_atomic

RUN_FILE = "run.json"


class MixedRunError(ValueError):
    """The output directory holds another run's results (other models, data or settings)."""


def batching_identity(cfg: Any) -> dict[str, Any]:
    """The batch layout of a run (it decides which examples share a step)."""
    d = cfg.data
    return {
        "pack": d.pack,
        "row_len": d.packed_row_len,
        "max_segments": d.max_segments,
        "bucket_min": d.bucket_min,
        "batch_rows": d.batch_rows,
    }


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def claim_run_dir(out: Path, identity: dict[str, Any], overwrite: bool, what: str) -> None:
    """Make `out` this run's directory: keep it if it holds the same run (resume), refuse it if
    it holds another run or anything else, unless `overwrite` (then start afresh). Process 0
    decides; every process returns only once it has."""
    run_file = out / RUN_FILE
    if jax.process_index() == 0:
        if run_file.is_file():
            old = json.loads(run_file.read_text())
            if old != identity:
                if not overwrite:
                    diff = sorted(
                        k for k in set(old) | set(identity) if old.get(k) != identity.get(k)
                    )
                    raise MixedRunError(
                        f"{out} holds another {what} (different {', '.join(diff)}); use another "
                        "output directory, or --overwrite to discard it"
                    )
                shutil.rmtree(out)
        elif out.exists() and any(out.iterdir()):
            if not overwrite:
                raise MixedRunError(
                    f"{out} is not empty and is not a {what}; use another output directory or "
                    "--overwrite"
                )
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if not run_file.is_file():
            write_atomic(run_file, json.dumps(identity, indent=1, sort_keys=True))
    _barrier(f"davir claim {out}")
    if json.loads(run_file.read_text()) != identity:
        raise MixedRunError(f"{out}: process {jax.process_index()} sees a different run")


def check_batch_rows(cfg: Any, mesh: Any) -> None:
    """Global batch rows must split evenly over the data-parallel devices and the processes."""
    dp, pc = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
    if cfg.data.batch_rows % dp or cfg.data.batch_rows % pc:
        raise ValueError(
            f"data.batch_rows={cfg.data.batch_rows} must be a multiple of the data-parallel size "
            f"{dp} (mesh data*fsdp, over {mesh.size} devices; mesh.cpu_devices sets how many a "
            f"CPU host has) and of the process count {pc}"
        )
