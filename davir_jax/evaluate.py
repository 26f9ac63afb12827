"""Evaluation: per-sequence language-model loss (held-out loss). Generation lives in
`generation.py`."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from davir_jax.losses import masked_nll, shift_targets, token_logprobs
from davir_jax.models.decoder import Decoder


def _nll_fn(graphdef: nnx.GraphDef):
    @jax.jit
    def f(state: nnx.State, ids_bt: jax.Array, seg_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, state)
        targets, mask = shift_targets(ids_bt, seg_bt > 0)
        lp = token_logprobs(model.logits, model.hidden_states(ids_bt, seg_bt), targets)
        return masked_nll(lp, mask)

    return f


def sequence_losses(
    model: Decoder, sequences: Sequence[Sequence[int]], bucket: int = 64
) -> list[float]:
    """Mean NLL (nats per token) of each whole sequence, every token after the first scored."""
    b = len(sequences)
    width = -(-max(len(s) for s in sequences) // bucket) * bucket
    ids = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)  # 0 marks padding
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        seg[i, : len(s)] = 1
    graphdef, state = nnx.split(model)
    nll, n = _nll_fn(graphdef)(state, jnp.asarray(ids), jnp.asarray(seg))
    return [float(a) / max(float(c), 1.0) for a, c in zip(np.asarray(nll), np.asarray(n))]
