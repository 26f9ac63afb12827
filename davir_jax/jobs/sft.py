"""Supervised fine-tuning (`davir sft`): optax AdamW, one jitted sharded step, orbax checkpoints
with exact resume.

    davir sft --model SRC --data FILE --template T --out DIR
    davir sft --model SRC --selection runs/sel --out DIR       # a `davir select` output

Training is the trainer's (`davir_jax.engine.trainer`: the step, the planner, checkpoints,
`fit`) with the SFT objective: the mean NLL over every response token of a global batch.

`DIR` receives: `checkpoints/<step>/` (orbax: parameters, optimizer state, step and data
position; the last `keep_checkpoints`), `metrics.jsonl`, TensorBoard events under `tb/`,
`loss.png`, `run.json` (what this run is; a different rerun is refused unless `--overwrite`),
`steps.json` (the planned steps) and, at the end, `model/` (a `load_model` source: `DIR` itself
resolves to it). With `train.val`, the held-out loss of every epoch goes to `val.json` (and
metrics.jsonl), and `model/` is the best epoch (`keep_best`; kept in `best/` while training);
`train.patience` stops a run whose validation loss has stopped improving. Killed at any moment and
restarted with the same command, training continues from the last good checkpoint and the losses
equal an uninterrupted run's: the data order is a pure function of (seed, epoch, step).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from jax.sharding import Mesh

from davir_jax.config import Config
from davir_jax.core import storage
from davir_jax.core.io import (
    file_sha256,
)
from davir_jax.core.runs import check_batch_rows
from davir_jax.core.schema import to_dict
from davir_jax.core.sharding import mesh_from_config
from davir_jax.data.batching import BatchPlan
from davir_jax.data.config import DataConfig
from davir_jax.data.dataset import Mixture, prepare
from davir_jax.engine.nll import held_out_loss
from davir_jax.engine.preflight import checked
from davir_jax.engine.trainer import Job, fit, plan_steps, sft_objective, step_batch
from davir_jax.models.loading import (
    load_tokenizer_for,
)

if TYPE_CHECKING:  # the data layer (tensorflow-datasets) loads only when a job runs
    from davir_jax.data.dataset import Mixture, TokenizedData


# -- optimizer -------------------------------------------------------------------------------


# -- the step --------------------------------------------------------------------------------


# -- data --------------------------------------------------------------------------------------


def training_data(
    cfg: Config,
    tokenizer: Any,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = True,
) -> tuple[TokenizedData | Mixture, dict[str, Any]]:
    """The data set to train on (`data.path`, or every pool of `train.selection`) and its
    identity for run.json."""

    sel = cfg.train.selection
    if sel is None:
        data = prepare(cfg.data, tokenizer, process_index, process_count, progress)
        return data, {"data": data.fields}
    sel_path = storage.upath(sel)
    manifest_path = sel_path / "manifest.json" if sel_path.is_dir() else sel_path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{sel}: no selection manifest.json (write one with davir select)")
    manifest = json.loads(manifest_path.read_text())
    parts = []
    for pool in manifest.get("pools", []):
        dc = DataConfig(
            **{
                **to_dict(cfg.data),
                "path": str(manifest_path.parent / pool["file"]),
                "format": pool.get("format") or pool.get("data", {}).get("format", "auto"),
                "template": pool.get("template") or cfg.data.template,
                "name": pool["name"],
            }
        )
        parts.append(prepare(dc, tokenizer, process_index, process_count, progress))
    if not parts:
        raise ValueError(f"{manifest_path}: the selection has no pools")
    mix = Mixture(parts, cfg.data)
    return mix, {"selection": file_sha256(manifest_path), "data": [p.fields for p in parts]}


# -- checkpoints -------------------------------------------------------------------------------


# -- metrics -----------------------------------------------------------------------------------


# -- the loop ----------------------------------------------------------------------------------


def validation_data(
    cfg: Config, tokenizer: Any, process_index: int, process_count: int, progress: bool = True
) -> TokenizedData:
    """`train.val`, read with the training data's settings."""

    dc = dataclasses.replace(cfg.data, path=cfg.train.val, name=None)
    return prepare(dc, tokenizer, process_index, process_count, progress)


@checked("sft")  # preflight: every input and output checked, the output locked
def sft(cfg: Config, progress: bool = True, mesh: Mesh | None = None) -> Path:
    """Run (or resume) supervised fine-tuning as described by `cfg`; returns the output dir."""
    tc = cfg.train
    if tc.out is None or cfg.model.source is None:
        raise ValueError("davir sft needs train.out and model.source")
    if tc.selection is None and cfg.data.path is None:
        raise ValueError("davir sft needs data.path or train.selection")
    mesh = mesh or mesh_from_config(cfg.mesh)  # first: it may set the CPU device count
    pi, pc = jax.process_index(), jax.process_count()
    check_batch_rows(cfg, mesh)
    tok = load_tokenizer_for(cfg.model.source)  # refused if its ids do not fit the model
    data, data_identity = training_data(cfg, tok, pi, pc, progress and pi == 0)
    lengths = data.lengths
    validate = None
    if tc.val is not None:
        val_data = validation_data(cfg, tok, pi, pc, progress and pi == 0)
        data_identity = {**data_identity, "val": val_data.fields}

        def validate(model: Any) -> dict[str, Any]:

            return held_out_loss(model, val_data, tc.chunk, what="the model in training")

    def count(plans: Sequence[BatchPlan]) -> tuple[int, int]:
        idx = [i for p in plans for r in p.rows for i in r]
        return len(idx), int(lengths[idx].sum()) if idx else 0

    job = Job(
        name="sft",
        objective=sft_objective(tc.chunk),
        steps=plan_steps(lengths, data.cfg, tc, cfg.seed),
        batch=lambda plans: step_batch(data, plans, mesh, pi, pc),
        count=count,
        tokenizer=tok,
        identity=data_identity,
        example_ids=data.example_ids,
        validate=validate,
    )
    return fit(cfg, job, mesh, progress)
