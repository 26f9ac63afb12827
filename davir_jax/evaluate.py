"""Evaluation: per-sequence language-model loss (held-out loss). Generation lives in
`generation.py`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from davir_jax.data.batching import assemble
from davir_jax.models.decoder import Decoder
from davir_jax.scoring import batch_nll, data_parallel_size


def sequence_losses(
    model: Decoder, sequences: Sequence[Sequence[int]], bucket: int = 64
) -> list[float]:
    """Mean NLL (nats per token) of each whole sequence, every token after the first scored.

    Uses the scoring step (`davir_jax.scoring.nll_step`): one row per sequence, rows padded to
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
