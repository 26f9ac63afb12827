"""Evaluation: per-sequence language-model loss (held-out loss). Generation lives in
`generation.py`."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from davir_jax.losses import masked_nll, shift_targets, token_logprobs
from davir_jax.models.arch import ArchConfig
from davir_jax.models.decoder import Decoder, RunConfig
from davir_jax.models.weights import abstract_model
from davir_jax.sharding import batch_sharding, logical_to_spec, state_shardings


@functools.lru_cache(maxsize=16)
def _nll_fn(arch: ArchConfig, run: RunConfig):
    """Jitted per-row (summed NLL, token count), built once per model configuration, with the
    parameter and batch shardings declared when the model lives on a mesh."""
    graphdef, abs_state = abstract_model(arch, run)

    def f(state: nnx.State, ids_bt: jax.Array, seg_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state)
        targets, mask = shift_targets(ids_bt, seg_bt > 0)
        lp = token_logprobs(model.logits, model.hidden_states(ids_bt, seg_bt), targets)
        return masked_nll(lp, mask)

    mesh = run.sharder.mesh
    if mesh is None:
        return jax.jit(f)
    rows = NamedSharding(mesh, logical_to_spec(("batch",), mesh=mesh))
    return jax.jit(
        f,
        in_shardings=(state_shardings(abs_state, mesh), batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(rows, rows),
    )


def sequence_losses(
    model: Decoder, sequences: Sequence[Sequence[int]], bucket: int = 64
) -> list[float]:
    """Mean NLL (nats per token) of each whole sequence, every token after the first scored."""
    mesh = model.run.sharder.mesh
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    b = -(-len(sequences) // dp) * dp  # rows padded to the data-parallel size (zero weight)
    width = -(-max(len(s) for s in sequences) // bucket) * bucket
    ids = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)  # 0 marks padding
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        seg[i, : len(s)] = 1
    _, state = nnx.split(model)
    nll, n = _nll_fn(model.arch, model.run)(state, jnp.asarray(ids), jnp.asarray(seg))
    nll, n = np.asarray(nll)[: len(sequences)], np.asarray(n)[: len(sequences)]
    return [float(a) / max(float(c), 1.0) for a, c in zip(nll, n)]
