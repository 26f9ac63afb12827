"""Batched generation with a KV cache, jitted with fixed shapes: greedy or sampled (temperature,
top-p), stopping at EOS.

Prompts are left-padded to a bucketed width (padding has segment id 0 and is never attended), one
prefill pass writes the prompt's keys and values into the cache, and a `lax.while_loop` decodes one
token per step until every row has produced an EOS or `max_new_tokens`. One compilation per
(batch, prompt width, new tokens, sampling settings).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from davir_jax.models.decoder import Decoder, KVCache, to_dtype


def sample_next(
    logits_bv: jax.Array, key: jax.Array, temperature: float, top_p: float
) -> jax.Array:
    """Next token ids `[B]`: argmax when `temperature == 0`, else nucleus sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / temperature
    if top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p.
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        logits = (
            jnp.full_like(logits, -jnp.inf)
            .at[jnp.arange(logits.shape[0])[:, None], order]
            .set(sorted_logits)
        )
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=16)
def _generate_fn(
    graphdef: nnx.GraphDef,
    slots: int,
    max_new: int,
    eos: tuple[int, ...],
    temperature: float,
    top_p: float,
):
    @jax.jit
    def run(state, ids_bt, seg_bt, pos_bt, key):
        model = nnx.merge(graphdef, state)
        b = ids_bt.shape[0]
        cache = KVCache.empty(model.arch, b, slots, to_dtype(model.run.compute_dtype))
        h, cache = model.hidden_states(ids_bt, seg_bt, pos_bt, cache)
        key, sub = jax.random.split(key)
        tok = sample_next(model.logits(h[:, -1]), sub, temperature, top_p)
        pos = pos_bt[:, -1] + 1
        out = jnp.zeros((b, max_new), jnp.int32)
        eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

        def cond(c):
            i, _, _, _, done, _, _ = c
            return (i < max_new) & ~jnp.all(done)

        def body(c):
            i, tok, pos, cache, done, out, key = c
            out = out.at[:, i].set(tok)
            done = done | jnp.isin(tok, eos_arr)
            h, cache = model.hidden_states(
                tok[:, None], jnp.ones((b, 1), jnp.int32), pos[:, None], cache
            )
            key, sub = jax.random.split(key)
            nxt = sample_next(model.logits(h[:, 0]), sub, temperature, top_p)
            return i + 1, nxt, pos + 1, cache, done, out, key

        done0 = jnp.zeros((b,), bool)
        _, _, _, _, _, out, _ = jax.lax.while_loop(
            cond, body, (jnp.int32(0), tok, pos, cache, done0, out, key)
        )
        return out

    return run


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    bucket: int = 64,
) -> list[list[int]]:
    """Continuations (new tokens only, cut after the first EOS) for a batch of prompts."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    b = len(prompts)
    width = -(-max(len(p) for p in prompts) // bucket) * bucket
    ids = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        seg[i, width - len(p) :] = 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    new = -(-max_new_tokens // 16) * 16  # fewer distinct compilations
    graphdef, state = nnx.split(model)
    fn = _generate_fn(
        graphdef,
        width + new,
        new,
        tuple(sorted(set(int(e) for e in eos_ids))),
        float(temperature),
        float(top_p),
    )
    out = np.asarray(
        fn(state, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos), jax.random.key(seed))
    )
    result = []
    eos = set(int(e) for e in eos_ids)
    for row in out[:, :max_new_tokens].tolist():
        cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        result.append(row[:cut])
    return result


def greedy_generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    bucket: int = 64,
) -> list[list[int]]:
    """Greedy continuations (new tokens only, stopping after an EOS)."""
    return generate(model, prompts, max_new_tokens, eos_ids, 0.0, 1.0, 0, bucket)
