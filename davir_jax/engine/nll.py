"""The NLL engine: every example's summed response NLL under a model, batched, sharded and
streamed; what scoring, evaluation, validation and DPO's reference pass all run.

`nll_step` is the jitted step (built once per model configuration, declared shardings);
`stream_nll` overlaps the host's batch assembly with the device's work; `dataset_nll` covers a
whole prepared data set on every process; `held_out_loss` and `sequence_losses` are the
evaluation views of it. The per-example NLL itself is `davir_jax.core.losses.example_nll`, the
same function the trainer's SFT objective uses.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from davir_jax.core.io import progress_bar
from davir_jax.core.losses import LM_HEAD_CHUNK, example_nll, example_nll_and_embedding
from davir_jax.core.sharding import batch_sharding, data_parallel_size, state_shardings
from davir_jax.data.batching import Batch, assemble, local_rows
from davir_jax.models.arch import ArchConfig
from davir_jax.models.decoder import Decoder, RunConfig
from davir_jax.models.lora import abstract_lora_model
from davir_jax.models.weights import abstract_model

_BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


class NonFiniteLossError(FloatingPointError, ValueError):
    """A model gave a NaN or infinite loss: nothing computed from it is written."""


def name_examples(ids: list[str], limit: int = 8) -> str:
    """`a, b, c (+N more)`: example ids for a one-line error."""
    more = f" (+{len(ids) - limit} more)" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more


def nonfinite_examples(batch: Batch, nll: np.ndarray, example_ids: Any) -> list[str]:
    """Ids of the real examples of a host batch whose NLL (`[R, S]`) is NaN or infinite."""
    bad = (batch.example_index >= 0) & ~np.isfinite(nll)
    return [str(example_ids[i]) for i in batch.example_index[bad]]


def nll_step(
    arch: ArchConfig,
    run: RunConfig,
    num_segments: int,
    chunk: int,
    lora: Any = None,
    embed: bool = False,
) -> Any:
    """The jitted NLL step of a model configuration (`_nll_step`), the same object however
    the optional arguments are passed (one cache key per configuration, so no recompile)."""
    return _nll_step(arch, run, num_segments, chunk, lora, bool(embed))


@functools.lru_cache(maxsize=32)
def _nll_step(
    arch: ArchConfig,
    run: RunConfig,
    num_segments: int,
    chunk: int,
    lora: Any,
    embed: bool,
) -> Any:
    """Jitted `(state, ids, segment_ids, positions, loss_mask) -> (nll [B, S], count [B, S])`,
    with `embed` also each example's mean-pooled response hidden states `[B, S, D]`.

    Built once per model configuration (`lora`: the model's `LoraConfig`, for a model with
    adapters). On a mesh, the parameter shardings come from the rules table, the batch is split
    over the data-parallel axes, and the (small) outputs are replicated so every process can
    read its own rows.
    """
    if lora is None:
        graphdef, abs_state = abstract_model(arch, run)
    else:
        graphdef, abs_state = abstract_lora_model(arch, run, lora)
    fn = example_nll_and_embedding if embed else example_nll

    def step(state: nnx.State, ids: jax.Array, seg: jax.Array, pos: jax.Array, mask: jax.Array):
        model = nnx.merge(graphdef, state)
        return fn(model, ids, seg, pos, mask, num_segments, chunk)

    mesh = run.sharder.mesh
    if mesh is None:
        return jax.jit(step)
    rows = batch_sharding(mesh, 2)
    rep = NamedSharding(mesh, P())
    return jax.jit(
        step,
        in_shardings=(state_shardings(abs_state, mesh), rows, rows, rows, rows),
        out_shardings=(rep,) * (3 if embed else 2),
    )


def device_batch(batch: Batch, mesh: Mesh | None) -> list[jax.Array]:
    """This process's host rows -> global arrays sharded over the data-parallel axes."""
    arrays = [getattr(batch, k) for k in _BATCH_KEYS]
    if mesh is None:
        return [jnp.asarray(a) for a in arrays]
    sharding = batch_sharding(mesh, 2)
    return [jax.make_array_from_process_local_data(sharding, a) for a in arrays]


def _launch_nll(
    model: Decoder, batch: Batch, num_segments: int, chunk: int, embed: bool = False
) -> tuple[jax.Array, ...]:
    """Dispatch one batch's step; JAX returns before the device has finished it."""
    _, state = nnx.split(model)
    lora = getattr(model, "lora_config", None)
    fn = nll_step(model.arch, model.run, num_segments, chunk, lora, embed)
    return fn(state, *device_batch(batch, model.run.sharder.mesh))


def _local_rows(batch: Batch, out: tuple[jax.Array, ...]) -> tuple[np.ndarray, ...]:
    """This process's rows of a step's global `[R, S, ...]` outputs, on the host (waits for
    them)."""
    r = batch.input_ids.shape[0]
    lo = jax.process_index() * r if jax.process_count() > 1 else 0
    return tuple(np.asarray(o)[lo : lo + r] for o in out)


def batch_nll(
    model: Decoder, batch: Batch, num_segments: int, chunk: int = LM_HEAD_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(summed NLL, token count) `[R_local, S]` of this process's rows of one batch."""
    return _local_rows(batch, _launch_nll(model, batch, num_segments, chunk))


def stream_nll(
    models: dict[str, Decoder],
    batches: Iterable[Batch],
    num_segments: int,
    chunk: int = LM_HEAD_CHUNK,
    embed: Iterable[str] = (),
) -> Iterator[tuple[Batch, dict[str, tuple[np.ndarray, ...]]]]:
    """Every batch, in order, with each model's `batch_nll` of it (and, for the models named in
    `embed`, the mean-pooled response hidden states `[R, S, D]` as a third array). The next
    batch's steps are dispatched before this batch's results are read back, so the host's work
    (assembling and sending the next batch, and the caller's: shards, progress) overlaps the
    device's."""
    embed = set(embed)

    def read(batch: Batch, launched: dict[str, Any]) -> tuple[Batch, dict[str, Any]]:
        return batch, {m: _local_rows(batch, out) for m, out in launched.items()}

    pending = None
    for batch in batches:
        launched = {
            m: _launch_nll(md, batch, num_segments, chunk, m in embed) for m, md in models.items()
        }
        if pending is not None:
            yield read(*pending)
        pending = (batch, launched)
    if pending is not None:
        yield read(*pending)


def dataset_nll(
    model: Decoder,
    plans: list[Any],
    num_segments: int,
    get: Any,
    n_examples: int,
    chunk: int = LM_HEAD_CHUNK,
    desc: str | None = None,
    example_ids: Any = None,
    what: str = "the model",
) -> tuple[np.ndarray, np.ndarray]:
    """Every example's summed response NLL and token count `([N], [N])` over global batch
    `plans`: each process runs its own rows of every batch, and the arrays are gathered so every
    process gets all of them. `get(indices)` gives (input_ids, loss_mask) per example.

    A NaN or infinite NLL raises `NonFiniteLossError` naming the examples (`example_ids[i]`, or
    the indices): at its batch on one process, after the gather (so every process raises
    together) on several."""
    pi, pc = jax.process_index(), jax.process_count()
    nll, cnt = np.zeros(n_examples), np.zeros(n_examples)
    bar = progress_bar(len(plans), desc or "nll", "batch", desc is not None and pi == 0)
    batches = (assemble(local_rows(p, pi, pc), p.width, num_segments, get) for p in plans)
    names = example_ids if example_ids is not None else range(n_examples)

    def refuse(bad: list[str]) -> None:
        raise NonFiniteLossError(
            f"{what} gives a non-finite NLL for example(s) {name_examples(bad)}; "
            "nothing was written"
        )

    for batch, out in stream_nll({"model": model}, batches, num_segments, chunk):
        a, c = out["model"]
        if pc == 1 and (bad := nonfinite_examples(batch, a, names)):
            refuse(bad)
        sel = batch.example_index >= 0
        nll[batch.example_index[sel]] = a[sel]
        cnt[batch.example_index[sel]] = c[sel]
        bar.update(1)
    bar.close()
    if pc > 1:  # rows scored elsewhere are 0 here; NLLs and counts are >= 0
        nll = np.max(multihost_utils.process_allgather(nll), axis=0)  # NaN wins the max
        cnt = np.max(multihost_utils.process_allgather(cnt), axis=0)
        if not np.isfinite(nll).all():
            refuse([str(names[i]) for i in np.flatnonzero(~np.isfinite(nll))])
    return nll, cnt


def sequence_losses(
    model: Decoder, sequences: Sequence[Sequence[int]], bucket: int = 64
) -> list[float]:
    """Mean NLL (nats per token) of each whole sequence, every token after the first scored.

    Uses the scoring step (`davir_jax.jobs.score.nll_step`): one row per sequence, rows padded to
    the data-parallel size with zero-weight filler, width rounded up to `bucket`.
    """
    dp = data_parallel_size(model.run.sharder.mesh)
    n_rows = -(-len(sequences) // dp) * dp
    width = -(-max(len(s) for s in sequences) // bucket) * bucket
    items = [(np.asarray(s, np.int32), np.ones(len(s), np.int32)) for s in sequences]
    rows = [(i,) for i in range(len(sequences))] + [()] * (n_rows - len(sequences))
    batch = assemble(rows, width, 1, lambda idx: [items[i] for i in idx])
    nll, n = batch_nll(model, batch, num_segments=1)
    return [float(a) / max(float(c), 1.0) for a, c in zip(nll[: len(sequences), 0], n[:, 0])]


def held_out_loss(
    model: Decoder, data: Any, chunk: int = LM_HEAD_CHUNK, what: str = "the model"
) -> dict[str, Any]:
    """Response NLL of every example of a prepared data set: the token-weighted mean (nats per
    response token, the SFT loss) and the mean of per-example means; and the per-example rows.
    A NaN or infinite NLL raises `NonFiniteLossError` naming the examples."""
    nll, cnt = dataset_nll(
        model,
        data.plans(),
        data.num_segments,
        data.get,
        len(data),
        chunk,
        example_ids=data.example_ids,
        what=what,
    )
    return {
        "loss": float(nll.sum() / max(cnt.sum(), 1.0)),
        "mean_example_loss": float(np.mean(nll / np.maximum(cnt, 1.0))),
        "n_examples": len(data),
        "n_tokens": int(cnt.sum()),
        "nll": nll,
        "n_tokens_each": cnt,
    }
