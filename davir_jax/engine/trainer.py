"""The trainer every training job uses: optax AdamW, one jitted, sharded, accumulated step
with an objective, the step planner, orbax checkpoints with exact resume, metrics and `fit`.

An `Objective` (`sft_objective` here, the preference objectives in `jobs/dpo.py`)
gives a micro-batch's summed loss and its token or pair count; the step (`make_train_step`) runs
the micro-batches in a `lax.scan`, summing the loss and its gradient, and divides by the count of
the whole global batch once: the loss is the mean over every response token (or pair) of the
accumulated batch, identical with or without accumulation or packing. What a step holds comes
from one planner (`plan_steps`): `train.batch_examples` examples (or about `train.batch_tokens`
tokens of whole examples), packed and split into micro-batches of `data.batch_rows` rows, their
count fixed for the run; or, unset, `train.grad_accum` batches of packed rows. A run of fewer
than `train.min_steps` steps says so before it starts (`steps.json` records the count).
Parameters and optimizer state keep the shardings of the rules table (declared on the jit,
donated in place).

`fit` writes into the run directory: `checkpoints/<step>/` (orbax: parameters, optimizer state,
step and data position; the last `keep_checkpoints`), `metrics.jsonl`, TensorBoard events under
`tb/`, `loss.png`, `run.json`, `steps.json` and, at the end, `model/`. With a validation set, the
held-out loss of every epoch goes to `val.json`, `model/` is the best epoch (`keep_best`) and
`train.patience` stops a run whose validation loss has stopped improving. Killed at any moment
and restarted with the same command, training continues from the last good checkpoint and the
losses equal an uninterrupted run's: the data order is a pure function of (seed, epoch, step).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorboardX import SummaryWriter

from davir_jax.core import storage
from davir_jax.core.errors import UserError
from davir_jax.core.io import (
    dumps_json,
    progress_bar,
    publish_dir,
    write_atomic,
    write_json,
)
from davir_jax.core.losses import LM_HEAD_CHUNK, example_nll
from davir_jax.core.runs import _barrier, batching_identity, claim_run_dir
from davir_jax.core.schema import to_dict
from davir_jax.core.sharding import logical_to_spec, state_shardings
from davir_jax.data.batching import Batch, BatchPlan, assemble, bucket_widths, local_rows, pack_bfd
from davir_jax.data.config import DataConfig
from davir_jax.data.dataset import make_plans
from davir_jax.engine.config import OptimizerConfig
from davir_jax.engine.nll import NonFiniteLossError, name_examples
from davir_jax.models.decoder import cast_for_compute
from davir_jax.models.loading import (
    load_model,
    model_fingerprint,
    resolve_source,
    save_lora,
    save_model,
)
from davir_jax.models.lora import apply_lora, has_lora, seed_dropout

if TYPE_CHECKING:  # the whole config is joined above this floor; the trainer reads its sections
    from davir_jax.config import Config


METRICS_FILE = "metrics.jsonl"


_BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask", "weights")


class TrainRunError(ValueError):
    """No checkpoint in the output directory can be restored."""


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0, then cosine, linear or constant to `lr * end_lr_ratio`."""
    warmup = (
        cfg.warmup_steps
        if cfg.warmup_steps is not None
        else math.ceil(cfg.warmup_ratio * total_steps)  # as HF Trainer's get_warmup_steps
    )
    warmup = min(warmup, max(total_steps - 1, 0))
    end = cfg.lr * cfg.end_lr_ratio
    rest = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, rest)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params: Any, decay_norms_and_biases: bool = False) -> Any:
    """True for parameters that get weight decay: all but norm scales and biases by default."""

    def keep(path: tuple[Any, ...], _: Any) -> bool:
        name = jax.tree_util.keystr(path)
        return decay_norms_and_biases or not ("norm" in name or "bias" in name)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping (global norm) then AdamW with the schedule and the decay mask."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=lambda p: decay_mask(p, cfg.decay_norms_and_biases),
        )
    )
    return optax.chain(*parts)


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """`[accum, rows, ...]`: rows over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_spec((None, "batch", None), mesh=mesh))


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a training step minimises, over one micro-batch.

    `fn(model, micro, frozen_model) -> (loss_sum, denom, aux_sums, bad)`: the step adds these up
    over all micro-batches of the global batch and reports `loss_sum / denom` (and every aux sum
    divided by `denom`); `bad` `[rows, segments]` marks the real examples whose value is NaN or
    infinite (so a failing step names them). `frozen_model` is the frozen reference model, or
    None when it is not needed.
    `batch_keys` are the micro-batch arrays the step receives, `[accum, rows, ...]`.
    """

    name: str
    fn: Callable[..., tuple[jax.Array, jax.Array, dict[str, jax.Array]]]
    batch_keys: tuple[str, ...]
    aux: tuple[str, ...] = ()
    denom_name: str = "tokens"  # what `denom` counts, as reported in the metrics


def sft_objective(chunk: int = LM_HEAD_CHUNK) -> Objective:
    """The SFT loss: the mean over every response token of the global batch."""

    def fn(model: Any, micro: dict[str, jax.Array], _frozen: Any = None):
        # losses.sft_loss_sums, with the per-example NLLs kept to flag non-finite ones.
        w = micro["weights"]
        args = (micro[k] for k in _BATCH_KEYS[:4])
        nll, cnt = example_nll(model, *args, w.shape[1], chunk)
        bad = (w > 0) & ~jnp.isfinite(nll)
        return (nll * w).sum(), (cnt * w).sum(), {}, bad

    return Objective("sft", fn, _BATCH_KEYS)


# Folded into `key(dropout_seed)` first, so dropout masks do not reuse the stream that
# initialised the adapters (`apply_lora(model, cfg, key(seed))` folds in small indices).
DROPOUT_STREAM = 0x64726F70  # "drop"


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: Objective | int,
    shardings: tuple[Any, Any] | None = None,
    mesh: Mesh | None = None,
    frozen: tuple[nnx.GraphDef, Any] | None = None,
    fixed: Any | None = None,
    dropout_seed: int | None = None,
) -> Any:
    """Jitted `((params, opt_state), batch[, fixed_params][, frozen_params][, step]) ->
    ((params, opt_state), metrics)`.

    `batch` holds `[accum, rows, ...]` arrays; the micro-batches run in a `lax.scan` and the
    gradients of the summed loss are divided once by the global `denom` (tokens for SFT, pairs
    for DPO), so the result does not depend on how the batch was split. Besides the metrics, the
    step returns `_nonfinite` (a scalar: the count of non-finite example values, plus one for a
    non-finite loss or gradient norm; `fit` reads it every step) and `_bad` `[accum, rows,
    segments]` (which examples; read only when `_nonfinite` is not 0). An int `objective` is the
    SFT loss with that LM-head chunk. With a mesh, the state shardings are declared (and the state
    donated) and the batch is split over the data-parallel axes. `fixed` (the shardings of the
    model's untrained parameters, or True without a mesh) adds them as an argument after the
    batch: only `params` get gradients and optimizer state (LoRA: the adapters train, the base
    stays). `frozen = (graphdef, shardings)` adds a frozen model's parameters (an in-step
    reference). `dropout_seed` (LoRA dropout) adds the step's index `s` (int32) as the last
    argument: micro-batch `i` draws its masks from `fold_in(fold_in(fold_in(key(dropout_seed),
    DROPOUT_STREAM), s), i)`, so a resumed run draws what an uninterrupted one does.
    """
    if isinstance(objective, int):
        objective = sft_objective(objective)
    grad_fn = _grad_fn(graphdef, objective, None if frozen is None else frozen[0])

    def step(state: tuple[nnx.State, Any], batch: dict[str, jax.Array], *extra: Any):
        params, opt_state = state
        fixed_params, frozen_params, key = _step_extras(extra, fixed, frozen, dropout_seed)
        # The untrained parameters are cast once per step too, outside the gradient.
        compute, fixed_c = _compute_copies(graphdef, params, fixed_params)
        g, loss_sum, n, aux, bad = _accumulate(
            grad_fn, compute, batch, (frozen_params, fixed_c), objective.aux, key
        )
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda a, p: (a / denom).astype(p.dtype), g, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": loss_sum / denom,
            objective.denom_name: n,
            "grad_norm": optax.global_norm(grads),
        }
        metrics.update({k: v / denom for k, v in aux.items()})
        scalars_bad = (~jnp.isfinite(metrics["loss"])) | (~jnp.isfinite(metrics["grad_norm"]))
        metrics["_nonfinite"] = bad.sum(dtype=jnp.int32) + scalars_bad.astype(jnp.int32)
        metrics["_bad"] = bad
        return (params, opt_state), metrics

    if mesh is None or shardings is None:
        return jax.jit(step, donate_argnums=0)
    extra_sh = (() if fixed is None else (fixed,)) + (() if frozen is None else (frozen[1],))
    extra_sh += () if dropout_seed is None else (NamedSharding(mesh, P()),)
    return _jit_sharded(step, objective, shardings, mesh, extra_sh)


def _step_extras(
    extra: tuple, fixed: Any, frozen: Any, dropout_seed: int | None
) -> tuple[Any, Any, jax.Array | None]:
    """(untrained parameters, frozen reference parameters, dropout key), each None when the
    step does not take it, from the step's arguments after the batch (`make_train_step`)."""
    extra = list(extra)
    key = None
    if dropout_seed is not None:
        key = jax.random.fold_in(jax.random.key(dropout_seed), DROPOUT_STREAM)
        key = jax.random.fold_in(key, extra.pop())
    fixed_params = extra[0] if fixed is not None else None
    frozen_params = extra[-1] if frozen is not None else None
    return fixed_params, frozen_params, key


def _grad_fn(graphdef: nnx.GraphDef, objective: Objective, frozen_def: Any) -> Callable:
    """`(params, micro, frozen_params, fixed_params[, key]) -> ((loss_sum, (denom, aux, bad)),
    grads)`: the objective's value and its gradient with respect to `params` alone (`key`: the
    micro-batch's dropout key)."""

    def sums(
        params: nnx.State,
        micro: dict[str, jax.Array],
        frozen_params: Any,
        fixed_params: Any,
        key: jax.Array | None = None,
    ):
        if key is not None:  # this micro-batch's dropout masks (LoRA)
            fixed_params = seed_dropout(fixed_params, key)
        model = nnx.merge(graphdef, params, *(() if fixed_params is None else (fixed_params,)))
        ref = None
        if frozen_params is not None:
            ref = nnx.merge(frozen_def, jax.lax.stop_gradient(frozen_params))
        loss_sum, denom, aux, bad = objective.fn(model, micro, ref)
        return loss_sum, (denom, aux, bad)

    return jax.value_and_grad(sums, has_aux=True)


def _compute_copies(graphdef: nnx.GraphDef, params: Any, fixed: Any) -> tuple[Any, Any]:
    """`params` and `fixed` (or None) as the forward pass reads them (`cast_for_compute`)."""
    whole = (params,) if fixed is None else (params, fixed)
    run = getattr(nnx.merge(graphdef, *whole), "run", None)  # trace time only
    if run is None:
        return params, fixed
    cast = functools.partial(cast_for_compute, compute_dtype=run.compute_dtype)
    return cast(params), None if fixed is None else cast(fixed)


def _accumulate(
    grad_fn: Callable,
    params: Any,
    batch: dict[str, jax.Array],
    others: tuple,
    aux: tuple,
    key: jax.Array | None = None,
) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array], jax.Array]:
    """Sum the loss, its denominator, the aux sums and the float32 gradient over the
    micro-batches `[accum, ...]` of `batch` in a `lax.scan`; returns them with `bad`.
    `others`: `grad_fn`'s arguments after the micro-batch (not differentiated); `key`: the
    step's dropout key, folded with each micro-batch's index."""

    def micro_step(carry, xs):
        micro, i = xs
        if key is not None:
            others_i = (*others, jax.random.fold_in(key, i))
        else:
            others_i = others
        g_acc, l_acc, n_acc, aux_acc = carry
        # A micro-batch of padding rows only (a step of a batch stated in examples or tokens
        # that needs fewer rows than the run's fixed count) costs nothing: XLA runs one branch
        # of a cond, so the shapes stay fixed without computing the filler.
        shapes = jax.eval_shape(grad_fn, params, micro, *others_i)
        (loss_sum, (denom, aux, bad)), g = jax.lax.cond(
            jnp.any(micro["segment_ids"] > 0),
            lambda: grad_fn(params, micro, *others_i),
            lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
        )
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        aux_acc = {k: aux_acc[k] + aux[k] for k in aux_acc}
        return (g_acc, l_acc + loss_sum, n_acc + denom, aux_acc), bad

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    aux0 = {k: jnp.zeros((), jnp.float32) for k in aux}
    index = jnp.arange(jax.tree.leaves(batch)[0].shape[0], dtype=jnp.int32)
    carry0 = (zeros, 0.0, 0.0, aux0)
    (g, loss_sum, n, aux_sums), bad = jax.lax.scan(micro_step, carry0, (batch, index))
    return g, loss_sum, n, aux_sums, bad


def _jit_sharded(
    step: Callable, objective: Objective, shardings: Any, mesh: Mesh, extra_sh: tuple
) -> Any:
    """`step` jitted with the state's shardings declared (and donated), the batch split over
    the data-parallel axes, the extra arguments' shardings (`extra_sh`: untrained parameters,
    a frozen reference) declared and the metrics replicated."""
    rep = NamedSharding(mesh, P())
    batch_sh = {k: accum_batch_sharding(mesh) for k in objective.batch_keys}
    metric_keys = ("loss", objective.denom_name, "grad_norm", *objective.aux, "_nonfinite", "_bad")
    metric_sh = {k: rep for k in metric_keys}
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sh, *extra_sh),
        out_shardings=(shardings, metric_sh),
        donate_argnums=0,
    )


def optimizer_shardings(tx: optax.GradientTransformation, params: Any, param_sh: Any, mesh: Mesh):
    """Optimizer-state shardings: moments follow their parameter, scalars are replicated."""
    abstract = jax.eval_shape(tx.init, params)
    rep = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract,
        param_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


# One optimizer step's micro-batch plans: `accum` global batches of `data.batch_rows` rows.
Step = tuple[BatchPlan, ...]


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Every optimizer step of a run: `epochs[e][k]` is step k of epoch e, `accum` micro-batch
    plans of item indices (examples for SFT, pairs for DPO; `()` rows are zero-weight filler).

    A pure function of (lengths, data settings, train settings, seed), so a resumed run
    recomputes exactly the steps of the interrupted one. `batch` says in words how a step is
    sized (for messages).
    """

    epochs: tuple[tuple[Step, ...], ...]
    accum: int
    n_items: int
    batch: str

    @property
    def steps_per_epoch(self) -> list[int]:
        return [len(e) for e in self.epochs]

    @property
    def n_steps(self) -> int:
        return sum(self.steps_per_epoch)

    def epoch_ends(self) -> list[int]:
        """The global step number (1-based count of steps done) at which each epoch ends."""
        return np.cumsum(self.steps_per_epoch).tolist()

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index within it) of global step `step` (0-based)."""
        for e, n in enumerate(self.steps_per_epoch):
            if step < n:
                return e, step
            step -= n
        raise IndexError("step beyond the planned run")

    def step(self, step: int) -> Step:
        e, k = self.locate(step)
        return self.epochs[e][k]

    def map(self, fn: Callable[[BatchPlan], BatchPlan]) -> StepPlan:
        """The same steps with every micro-batch plan rewritten (e.g. pairs -> responses)."""
        epochs = tuple(tuple(tuple(fn(p) for p in st) for st in ep) for ep in self.epochs)
        return dataclasses.replace(self, epochs=epochs)


def _item_groups(lengths: np.ndarray, train: Any, order: np.ndarray) -> list[np.ndarray]:
    """Items (in `order`) split into consecutive steps: `batch_examples` each (the last step of
    the epoch keeps the remainder: no item is dropped), or whole items as close to
    `batch_tokens` tokens as they allow (an item is added while that brings the step's total no
    farther from the target; every step holds at least one item)."""
    if train.batch_examples is not None:
        b = train.batch_examples
        return [order[i : i + b] for i in range(0, len(order), b)]
    target, groups, cur, total = train.batch_tokens, [], [], 0
    for i in order.tolist():
        n = int(lengths[i])
        if cur and abs(total + n - target) > abs(total - target):
            groups.append(np.asarray(cur))
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        groups.append(np.asarray(cur))
    return groups


def _step_rows(lengths: np.ndarray, items: np.ndarray, data: DataConfig) -> list[BatchPlan]:
    """One step's items as micro-batches of `data.batch_rows` rows: packed into rows of
    `data.row_len` (best-fit decreasing), or one per row at the smallest bucket width that holds
    the step's longest item."""

    if data.pack:
        local = pack_bfd(lengths[items], data.packed_row_len, data.max_segments)
        rows = [tuple(int(items[j]) for j in r) for r in local]
        width = data.packed_row_len
    else:
        rows = [(int(i),) for i in items]
        longest = int(lengths[items].max())
        width = next(w for w in bucket_widths(data.max_len, data.bucket_min) if w >= longest)
    per = data.batch_rows
    out = []
    for i in range(0, len(rows), per):
        chunk = rows[i : i + per]
        out.append(BatchPlan(width, tuple(chunk) + ((),) * (per - len(chunk))))
    return out


def describe_batch(data: DataConfig, train: Any, noun: str = "examples") -> str:
    """How one optimizer step is sized, in words."""
    if train.batch_examples is not None:
        return f"{train.batch_examples:,} {noun} per step"
    if train.batch_tokens is not None:
        return f"about {train.batch_tokens:,} tokens of whole {noun} per step"
    rows = train.grad_accum * data.batch_rows
    if data.pack:
        return f"{rows} rows of {data.packed_row_len} tokens per step"
    return f"{rows} padded rows (one example each) per step"


def plan_steps(
    lengths: np.ndarray,
    data: DataConfig,
    train: Any,
    seed: int,
    noun: str = "examples",
) -> StepPlan:
    """The one planner of SFT and DPO steps: every epoch's optimizer steps over items of
    `lengths` (examples, or pairs with their pair-level `data` settings).

    Epoch e shuffles with seed `seed * 100_003 + e`. With `train.batch_examples` or
    `train.batch_tokens`, the permuted items are cut into steps (`_item_groups`) and each
    step is packed on its own (`_step_rows`); the accumulation count is the largest any step of
    the run needs, and shorter steps are completed with empty micro-batches (zero weight: they
    change no sum), so every step has the same shapes and nothing recompiles. Otherwise the
    epoch's packed batches (`make_plans`) are grouped `train.grad_accum` to a step, the last
    completed with empty batches.
    """

    lengths = np.asarray(lengths)
    epochs: list[list[list[BatchPlan]]] = []
    for e in range(train.epochs):
        s = seed * 100_003 + e
        if train.sized_batch:
            order = np.random.default_rng(s).permutation(len(lengths))
            steps = [
                _step_rows(lengths, g, data) for g in _item_groups(lengths, train, order) if len(g)
            ]
        else:
            plans = make_plans(lengths, data, shuffle=True, seed=s)
            a = train.grad_accum
            steps = [plans[i : i + a] for i in range(0, len(plans), a)]
        epochs.append(steps)
    accum = train.grad_accum
    if train.sized_batch:
        accum = max((len(st) for ep in epochs for st in ep), default=1)
    padded = tuple(
        tuple(
            tuple(st) + (BatchPlan(st[0].width, ((),) * data.batch_rows),) * (accum - len(st))
            for st in ep
        )
        for ep in epochs
    )
    return StepPlan(padded, accum, len(lengths), describe_batch(data, train, noun))


def step_batch(
    data: Any,
    plans: Sequence[BatchPlan],
    mesh: Mesh | None,
    process_index: int,
    process_count: int,
    keys: tuple[str, ...] = _BATCH_KEYS,
    extra: Callable[[list[Batch]], dict[str, np.ndarray]] | None = None,
) -> dict[str, jax.Array]:
    """This process's rows of `accum` micro-batches, stacked `[accum, rows, width]`, as global
    arrays. Micro-batches share the largest width among them (a fixed set of shapes). `data`
    needs `num_segments` and `get`; `extra(host batches)` adds more arrays (DPO: reference
    NLLs)."""
    width = max(p.width for p in plans)
    batches = [
        assemble(local_rows(p, process_index, process_count), width, data.num_segments, data.get)
        for p in plans
    ]
    host = {k: np.stack([getattr(b, k) for b in batches]) for k in keys}
    if extra is not None:
        host.update(extra(batches))
    if mesh is None:
        return {k: jnp.asarray(v) for k, v in host.items()}
    sh = accum_batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in host.items()}


def _manager(directory: Any, keep: int) -> Any:
    """Orbax's manager of `directory` (a local path, or a URL that orbax writes itself: gs://
    through tensorstore, with its own commit protocol)."""
    where = str(directory) if storage.is_url(directory) else Path(directory).absolute()
    return ocp.CheckpointManager(
        where,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True
        ),
        item_names=("state", "meta"),
    )


def save_checkpoint(mngr: Any, step: int, state: Any, meta: dict[str, Any]) -> None:

    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": state[0], "opt_state": state[1]}),
            meta=ocp.args.JsonSave(meta),
        ),
    )


def restore_latest(mngr: Any, target: Any, log: Any = print) -> tuple[int, Any, dict] | None:
    """Restore the newest checkpoint that reads back whole; report and skip broken ones.

    `target` is the abstract `{"params", "opt_state"}` tree with the shardings wanted now (so a
    checkpoint written on another mesh lands in this mesh's layout).
    """

    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            got = mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
                ),
            )
            return step, got["state"], dict(got["meta"])
        except Exception as e:  # orbax raises many types for missing or corrupt files
            log(
                f"checkpoint step {step} in {mngr.directory} cannot be restored "
                f"({type(e).__name__}: {str(e)[:200]}); trying the previous one"
            )
    if steps:
        raise TrainRunError(
            f"{mngr.directory}: none of the checkpoints {steps} can be restored; "
            "use --overwrite to start again"
        )
    return None


def abstract_arrays(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


class Metrics:
    """metrics.jsonl (truncated to the resumed step, so it holds one consistent history) and
    TensorBoard scalars (tensorboardX: event files without TensorFlow). Process 0 only.

    An object store cannot append: with a URL `out`, both are written to a local folder and
    uploaded (metrics.jsonl as one object, the event files each as one) by `sync`, which the
    loop calls with every checkpoint and at the end, so the bucket's history matches its
    checkpoints."""

    def __init__(self, out: Any, resume_step: int, enabled: bool) -> None:
        self.enabled, self.out = enabled, out
        self.path = out / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= resume_step:
                    kept.append(line)
        self.spool = None
        local = self.path
        if storage.is_url(out):
            self.spool = Path(tempfile.mkdtemp(prefix=".davir-metrics-"))
            local = self.spool / METRICS_FILE
        write_atomic(local, "".join(k + "\n" for k in kept))
        self.file = open(local, "a")
        tb = out / "tb" if self.spool is None else self.spool / "tb"
        self.tb = SummaryWriter(str(tb), purge_step=resume_step + 1)

    def sync(self) -> None:
        """Upload the local copies (a URL `out` only)."""
        if not self.enabled or self.spool is None:
            return
        self.file.flush()
        self.tb.flush()
        storage.upload_dir(self.spool, self.out)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(dumps_json(record) + "\n")
        self.file.flush()
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.sync()
            self.file.close()
            self.tb.close()
            if self.spool is not None:
                shutil.rmtree(self.spool, ignore_errors=True)


def plot_losses(metrics_path: Path, png: Path) -> None:
    """The loss curve of a run as a PNG next to its metrics."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    if not rows:
        return
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train")
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", lw=1, ms=3, label="validation (epoch end)")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / response token)")
    ax.set_title(f"SFT loss, {metrics_path.parent.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(png, buf.getvalue())


# Train settings that decide how often a run reports or where it writes, not what it computes.
_NOT_IDENTITY = (
    "out",
    "overwrite",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "min_steps",
    "strict_steps",
)


def run_identity(cfg: Config, data_identity: dict[str, Any], total_steps: int) -> dict[str, Any]:
    lo = cfg.model.lora  # as run.json reads back (a list, not a tuple)
    lora = {} if lo is None else {"lora": {**to_dict(lo), "targets": list(lo.targets)}}
    if lora and lo.quantize_base is None:  # added later: runs from before it still resume
        del lora["lora"]["quantize_base"]
    return {
        "model": model_fingerprint(cfg.model.source),
        **lora,
        "dtype": [cfg.model.dtype, cfg.model.compute_dtype or cfg.model.dtype],
        **data_identity,
        "batching": batching_identity(cfg),
        "optimizer": to_dict(cfg.optimizer),
        "train": {k: v for k, v in to_dict(cfg.train).items() if k not in _NOT_IDENTITY},
        "total_steps": total_steps,
        "seed": cfg.seed,
    }


@dataclasses.dataclass
class Job:
    """What `fit` trains: the objective and how to get each step's batch.

    `steps`: every step of the run (`plan_steps`); `batch(plans)` this process's micro-batches
    for one step as global arrays; `count(plans)` the (examples, real tokens) they hold.
    `validate(model)`: the held-out loss after every epoch (`nll.held_out_loss`'s dict), or
    None.
    """

    name: str
    objective: Objective
    steps: StepPlan
    batch: Callable[[Sequence[BatchPlan]], dict[str, jax.Array]]
    count: Callable[[Sequence[BatchPlan]], tuple[int, int]]
    tokenizer: Any
    identity: dict[str, Any]
    frozen: Any = None  # (graphdef, params) of an in-step reference model
    after: Callable[[Any, Path], dict[str, Any]] | None = None  # evaluation at the end
    example_ids: Any = None  # example index -> id (`<source>:<row>`), to name failing examples
    noun: str = "examples"  # what an item of `steps` is, for messages
    validate: Callable[[Any], dict[str, Any]] | None = None


def refuse_nonfinite(
    job: Job, step: int, plans: Sequence[BatchPlan], metrics: dict[str, Any], saved: int
) -> None:
    """Raise `NonFiniteLossError` for a step whose loss, gradient or any example's value was
    NaN or infinite, naming the examples (those flagged, else every example of the step)."""
    bad = np.asarray(metrics["_bad"])  # [accum, rows, segments], global rows in plan order
    flagged = [
        plans[a].rows[r][s] for a, r, s in zip(*np.nonzero(bad)) if s < len(plans[a].rows[r])
    ]
    which = flagged or [i for p in plans for row in p.rows for i in row]
    ids = [str(job.example_ids[i]) if job.example_ids is not None else str(i) for i in which]
    what = "examples" if flagged else "a batch of examples"
    raise NonFiniteLossError(
        f"{job.name} step {step}: non-finite loss {float(metrics['loss'])} (grad norm "
        f"{float(metrics['grad_norm'])}) from {what} {name_examples(ids)}; stopped before saving "
        f"anything of it (last checkpoint: step {saved or 'none'}, no final model)"
    )


STEPS_FILE = "steps.json"


VAL_FILE = "val.json"


BEST_DIR = "best"


def check_min_steps(cfg: Config, job: Job, total: int) -> str | None:
    """The warning line for a run of fewer than `train.min_steps` optimizer steps (None if it
    has enough); a `UserError` with `train.strict_steps`. Called before anything is written."""
    tc = cfg.train
    if total >= tc.min_steps:
        return None
    capped = f", train.max_steps={tc.max_steps}" if total < job.steps.n_steps else ""
    epochs = f"{tc.epochs} epoch{'s' if tc.epochs != 1 else ''}"
    msg = (
        f"davir {job.name}: this run takes {total:,} optimizer steps ({job.steps.n_items:,} "
        f"{job.noun}, {epochs}{capped}, {job.steps.batch}); fewer than "
        f"train.min_steps={tc.min_steps}: set train.batch_examples or more epochs"
    )
    if tc.strict_steps:
        raise UserError(msg + " (an error under --strict / train.strict_steps)")
    return msg


def _val_summary(hist: dict[str, Any], stopped: bool, job_val: dict[str, Any]) -> dict[str, Any]:
    losses = hist["val_loss"]
    best = int(np.argmin(losses)) + 1 if losses else None
    out = {
        "val_loss": losses,
        "val_step": hist["val_step"],
        "best_epoch": best,
        "best_step": hist["val_step"][best - 1] if best else None,
        "epochs_run": len(losses),
        "stopped_early": stopped,
        "initial_val_loss": hist.get("initial"),
        **job_val,
    }
    # keep_best never silently returns the untrained model: it picks among trained epochs,
    # and says when none of them beats the starting point.
    out["no_epoch_improved"] = bool(
        best is not None and hist.get("initial") is not None and losses[best - 1] >= hist["initial"]
    )
    return out


def _patience_spent(losses: list[float], patience: int | None) -> bool:
    if patience is None or not losses:
        return False
    return len(losses) - (int(np.argmin(losses)) + 1) >= patience


def _begin_run(cfg: Config, job: Job, say: Callable[..., None]) -> tuple[Path, int]:
    """Count the run's steps, refuse or warn about too few, claim the run directory and write
    `steps.json`: everything decided before a model is loaded. Returns (out, total steps)."""
    tc, plan, out = cfg.train, job.steps, storage.upath(cfg.train.out)
    if plan.n_steps == 0:
        raise ValueError("no training batches: the data set is empty after skipping bad rows")
    total = plan.n_steps if tc.max_steps is None else min(plan.n_steps, tc.max_steps)
    few = check_min_steps(cfg, job, total)  # strict: refused before anything is written
    claim_run_dir(
        out,
        {**run_identity(cfg, job.identity, total), "job": job.name},
        tc.overwrite,
        "training run",
    )
    if few:
        say(few)
    if jax.process_index() == 0:
        steps = {
            "total_steps": total,
            "planned_steps": plan.n_steps,
            "steps_per_epoch": plan.steps_per_epoch,
            "epochs": tc.epochs,
            "items": plan.n_items,
            "noun": job.noun,
            "batch": plan.batch,
            "micro_batches_per_step": plan.accum,
            "rows_per_micro_batch": cfg.data.batch_rows,
            "min_steps": tc.min_steps,
            "below_min_steps": few is not None,
        }
        write_json(out / STEPS_FILE, steps)
    return out, total


def _trainable(cfg: Config, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graph definition, trained parameters, untrained parameters or None) of the model a run
    starts from: every weight, or with `model.lora` fresh adapters (seeded by `cfg.seed`) on
    the frozen base (Hu et al. 2021, arXiv 2106.09685: only A and B are trained)."""
    m = cfg.model
    if m.lora is not None and resolve_source(m.source)[0] == "lora":
        raise UserError(
            f"model.source: {m.source} is a LoRA adapter directory; model.lora trains new "
            "adapters on a base model (merge these first: davir export --merged)"
        )
    model = load_model(m.source, m.dtype, mesh, **m.run_options())
    if m.lora is None:
        if has_lora(model):
            raise UserError(
                f"model.source: {m.source} holds LoRA adapters; set model.lora to train "
                "adapters on a base, or merge them first (davir export --merged)"
            )
        graphdef, params = nnx.split(model)
        return graphdef, params, None
    apply_lora(model, m.lora, jax.random.key(cfg.seed))
    return nnx.split(model, nnx.LoRAParam, ...)


class _Loop:
    """One run of `fit`: the state it carries from step to step (parameters and optimizer state,
    the step, the examples seen, the validation history) and what it does after each step
    (validate at epoch ends, log, checkpoint), so `fit` reads as the loop itself."""

    def __init__(self, cfg: Config, job: Job, mesh: Mesh, out: Path, total: int, say: Any):
        self.cfg, self.job, self.out, self.total, self.say = cfg, job, out, total, say
        self.primary = jax.process_index() == 0
        self.graphdef, params, self.fixed = _trainable(cfg, mesh)
        self.tx = make_optimizer(cfg.optimizer, total)
        self.schedule = lr_schedule(cfg.optimizer, total)  # the learning rate each record shows
        param_sh = state_shardings(params, mesh)
        self.shardings = (param_sh, optimizer_shardings(self.tx, params, param_sh, mesh))
        self.state = (params, jax.jit(self.tx.init, out_shardings=self.shardings[1])(params))
        self.mngr = _manager(out / "checkpoints", cfg.train.keep_checkpoints)
        self.step, self.examples_seen = 0, 0
        # The validation history lives in every checkpoint's metadata, so a resumed run carries
        # exactly the evaluations of the steps it restored.
        self.hist: dict[str, Any] = {"val_loss": [], "val_step": [], "initial": None}
        self.val_info: dict[str, Any] = {}  # the validation set's size, from its last evaluation
        self.ends = set(job.steps.epoch_ends())
        self._resume()
        if job.validate is not None and self.step == 0 and self.hist["initial"] is None:
            self.hist["initial"] = self.validate()  # epoch 0: is any epoch better than none?
        self.stopped = self.step < total and _patience_spent(
            self.hist["val_loss"], cfg.train.patience
        )
        self.saved = self.step
        # Every step's `_nonfinite` scalar is read on the host one step late (after the next
        # step is dispatched, when the device has finished it, so the host never waits for
        # it), and at once before anything is logged or saved: a NaN step is never stored.
        self.pending: tuple[int, Sequence[BatchPlan], dict[str, Any]] | None = None

    def _resume(self) -> None:
        p_sh, o_sh = self.shardings
        target = {
            "params": abstract_arrays(self.state[0], p_sh),
            "opt_state": abstract_arrays(self.state[1], o_sh),
        }
        restored = restore_latest(self.mngr, target, self.say)
        if restored is None:
            return
        self.step, got, meta = restored
        self.state, self.examples_seen = (got["params"], got["opt_state"]), meta["examples_seen"]
        self.hist = meta.get("val", self.hist)
        self.say(
            f"resumed from checkpoint step {self.step} (epoch {meta['epoch']}, "
            f"{self.examples_seen:,} examples seen)"
        )
        if (self.out / VAL_FILE).is_file():
            old = json.loads((self.out / VAL_FILE).read_text())
            self.val_info = {k: old[k] for k in ("n_val", "n_val_tokens") if k in old}

    def model(self) -> Any:
        fixed = () if self.fixed is None else (self.fixed,)
        return nnx.merge(self.graphdef, self.state[0], *fixed)

    def save(self, directory: Path) -> None:
        """The model now, as a model source: LoRA adapters (naming their base) or all weights."""
        m = self.cfg.model
        if m.lora is None:
            save_model(self.model(), directory, self.job.tokenizer)
        else:
            save_lora(self.model(), directory, m.source, m.lora, self.job.tokenizer)

    def validate(self) -> float:
        res = self.job.validate(self.model())
        self.val_info.update(n_val=res["n_examples"], n_val_tokens=res["n_tokens"])
        return res["loss"]

    def check(self) -> None:
        """Stop on the pending step's non-finite loss (see `pending`)."""
        if self.pending is not None and int(self.pending[2]["_nonfinite"]):
            self.mngr.wait_until_finished()  # earlier (finite) checkpoints stay whole
            refuse_nonfinite(self.job, *self.pending, self.saved)
        self.pending = None

    def end_of_epoch(self) -> float:
        """Validate, keep the best model so far, decide early stopping; returns the loss."""
        self.check()
        val = self.validate()
        losses = self.hist["val_loss"]
        losses.append(val)
        self.hist["val_step"].append(self.step)
        tc = self.cfg.train
        if tc.keep_best and all(val < v for v in losses[:-1]):
            # The best so far (the first of equals). Saved before this step's checkpoint: a
            # crash in between redoes the epoch, which reproduces the same parameters.
            self.save(self.out / BEST_DIR)
        self.stopped = self.step < self.total and _patience_spent(losses, tc.patience)
        if self.primary:
            write_json(self.out / VAL_FILE, _val_summary(self.hist, self.stopped, self.val_info))
        return val

    def record(
        self, epoch: int, mt: dict[str, Any], val: float | None, tokens_per_s: float
    ) -> dict:
        self.check()
        rec = {"step": self.step, "epoch": epoch}
        rec.update({k: float(v) for k, v in mt.items() if not k.startswith("_")})
        rec["lr"] = float(self.schedule(self.step - 1))
        rec["examples_seen"] = self.examples_seen
        rec["tokens_per_s"] = tokens_per_s
        if val is not None:
            rec["val_loss"] = val
        return rec

    def checkpoint(self) -> None:
        self.check()
        meta = {
            "step": self.step,
            "epoch": sum(1 for e in self.ends if e <= self.step),
            "seed": self.cfg.seed,
            "examples_seen": self.examples_seen,
            "steps_per_epoch": self.job.steps.steps_per_epoch,
            "val": self.hist,
        }
        if self.cfg.model.lora is not None:  # the checkpoint holds the adapters only
            meta["lora_base"] = {
                "source": self.cfg.model.source,
                "fingerprint": model_fingerprint(self.cfg.model.source),
            }
        save_checkpoint(self.mngr, self.step, self.state, meta)
        self.saved = self.step

    def finish(self) -> None:
        """After the last step: the evaluation, `val.json` and the final (or best) model."""
        tc, out, job, say = self.cfg.train, self.out, self.job, self.say
        if self.stopped:
            say(
                f"stopped early after epoch {len(self.hist['val_loss'])} (step {self.step} of "
                f"{self.total}): no better validation loss for train.patience={tc.patience} epochs"
            )
        final = self.model()
        if job.after is not None:
            summary = job.after(final, out)
            if self.primary:
                write_json(out / "eval.json", summary)
        validated = job.validate is not None and bool(self.hist["val_loss"])
        if validated:
            self._write_val_summary()
        if validated and tc.keep_best:
            best = out / BEST_DIR
            if self.primary:
                # On a bucket a folder exists as soon as any object does: only a complete
                # (published) copy counts.
                if storage.is_published(best):
                    publish_dir(best, out / "model")
                elif not storage.is_published(out / "model"):
                    raise TrainRunError(
                        f"{best}: the best epoch's model is missing; use --overwrite to start again"
                    )
            _barrier("davir best model")
        else:
            self.save(out / "model")

    def _write_val_summary(self) -> None:
        hist, tc = self.hist, self.cfg.train
        summary = _val_summary(hist, self.stopped, self.val_info)
        summary["keep_best"] = tc.keep_best
        summary["exported_epoch"] = summary["best_epoch"] if tc.keep_best else len(hist["val_loss"])
        if not self.primary:
            return
        write_json(self.out / VAL_FILE, summary)
        if summary["no_epoch_improved"]:
            self.say(
                f"validation: no epoch improved on the starting model "
                f"({summary['initial_val_loss']:.4f}); the best epoch "
                f"{summary['best_epoch']} ({min(hist['val_loss']):.4f}) is exported"
            )


def fit(cfg: Config, job: Job, mesh: Mesh, progress: bool = True) -> Path:
    """The training loop shared by `davir sft` and `davir dpo`: optimizer, sharded jitted step,
    orbax checkpoints with exact resume, metrics, per-epoch validation, and the final model in
    `train.out/model`."""
    tc, primary = cfg.train, jax.process_index() == 0
    say = (lambda *a: print(*a, file=sys.stderr)) if primary else (lambda *a: None)
    out, total = _begin_run(cfg, job, say)
    run = _Loop(cfg, job, mesh, out, total, say)
    frozen_sh = None
    if job.frozen is not None:
        frozen_sh = (job.frozen[0], state_shardings(job.frozen[1], mesh))
    fixed_sh = None if run.fixed is None else state_shardings(run.fixed, mesh)
    lora = cfg.model.lora
    dropout_seed = cfg.seed if lora is not None and lora.dropout > 0 else None
    train_step = make_train_step(
        run.graphdef, run.tx, job.objective, run.shardings, mesh, frozen_sh, fixed_sh, dropout_seed
    )
    extra = () if run.fixed is None else (run.fixed,)
    extra += () if job.frozen is None else (job.frozen[1],)
    metrics = Metrics(out, run.step, primary)
    bar = progress_bar(total, job.name, "step", progress and primary, run.step)
    t0, tokens_run = time.time(), 0
    while run.step < total and not run.stopped:
        epoch, _ = job.steps.locate(run.step)
        plans = job.steps.step(run.step)
        step_index = () if dropout_seed is None else (np.int32(run.step),)
        run.state, mt = train_step(run.state, job.batch(plans), *extra, *step_index)
        run.step += 1
        run.check()
        run.pending = (run.step, plans, mt)
        n_ex, n_tok = job.count(plans)
        run.examples_seen += n_ex
        tokens_run += n_tok
        # Validation after every epoch, and after a last step that ends the run mid-epoch.
        epoch_end = job.validate is not None and (run.step in run.ends or run.step == total)
        val = run.end_of_epoch() if epoch_end else None
        last = run.step == total or run.stopped
        if run.step % tc.log_every == 0 or last or epoch_end:
            rec = run.record(epoch, mt, val, tokens_run / max(time.time() - t0, 1e-9))
            metrics.log(rec)
            bar.set_postfix_str(
                f"loss {rec['loss']:.4f} {rec['tokens_per_s']:,.0f} tok/s", refresh=False
            )
        bar.update(1)
        if run.step % tc.checkpoint_every == 0 or last or epoch_end:
            run.checkpoint()
            metrics.sync()
    run.check()
    bar.close()
    run.mngr.wait_until_finished()
    run.mngr.close()
    metrics.close()
    run.finish()
    if primary:
        plot_losses(out / METRICS_FILE, out / "loss.png")
        say(f"wrote {out / 'model'} (a load_model source) after {run.step} steps")
    return out
