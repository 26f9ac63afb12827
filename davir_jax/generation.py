"""Greedy decoding with fixed shapes (one compilation per buffer length).

This first version recomputes the prefix each step (no KV cache): exact, and fast enough for the
demo's short answers; the cached decoder arrives with `davir eval`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from davir_jax.models.decoder import Decoder


@functools.lru_cache(maxsize=16)
def _next_token_fn(graphdef: nnx.GraphDef):  # one jitted step per model structure
    @jax.jit
    def step(state: nnx.State, ids_bt: jax.Array, last_b: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, state)
        h = model.hidden_states(ids_bt)
        h_last = jnp.take_along_axis(h, last_b[:, None, None], axis=1)[:, 0]
        return jnp.argmax(model.logits(h_last), axis=-1).astype(jnp.int32)

    return step


def greedy_generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    bucket: int = 64,
) -> list[list[int]]:
    """Greedy continuations (new tokens only, stopping after an EOS) for a batch of prompts."""
    graphdef, state = nnx.split(model)
    step = _next_token_fn(graphdef)
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    total = int(lengths.max()) + max_new_tokens
    width = -(-total // bucket) * bucket
    buf = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        buf[i, : len(p)] = p
    cur = lengths.copy()
    done = np.zeros(b, bool)
    out: list[list[int]] = [[] for _ in range(b)]
    for _ in range(max_new_tokens):
        # Right-padded rows: causal attention never sees the zeros after `cur`.
        nxt = np.asarray(step(state, jnp.asarray(buf), jnp.asarray(cur - 1, jnp.int32)))
        for i in range(b):
            if done[i]:
                continue
            buf[i, cur[i]] = nxt[i]
            out[i].append(int(nxt[i]))
            cur[i] += 1
            done[i] = int(nxt[i]) in eos_ids
        if done.all():
            break
    return out
