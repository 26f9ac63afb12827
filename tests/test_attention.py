"""Blocked attention (key blocks skipped) equals dense attention and a NumPy softmax oracle,
values and gradients, on packed rows with causal, segment and sliding-window masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from davir_jax.models.decoder import attention_mask, blocked_attention, dense_attention


def _packed(b: int, t: int, lengths: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    seg = np.zeros((b, t), np.int32)
    pos = np.zeros((b, t), np.int32)
    for r, lens in enumerate(lengths):
        at = 0
        for k, n in enumerate(lens, start=1):
            seg[r, at : at + n] = k
            pos[r, at : at + n] = np.arange(n)
            at += n
    return seg, pos


def _np_attention(q, k, v, mask, scale, softcap):
    b, t, kv, g, hd = q.shape
    s = np.einsum("btkgd,bskd->bkgts", q.astype(np.float64), k.astype(np.float64)) * scale
    if softcap is not None:
        s = np.tanh(s / softcap) * softcap
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bkgts,bskd->btkgd", p, v.astype(np.float64))


# Rows: short examples (most key blocks skipped), one long example across every block, and a
# row ending in padding (segment 0, which only sees itself).
LENGTHS = [[5, 3, 9, 2, 7, 6], [32], [12, 11]]


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 5.0)])
def test_blocked_equals_dense_and_numpy(block, window, softcap):
    rng = np.random.default_rng(block)
    b, t, kv, g, hd = 3, 32, 2, 3, 8
    seg, pos = _packed(b, t, LENGTHS)
    mask = attention_mask(jnp.asarray(seg), jnp.asarray(pos), window)
    q, k, v = (
        rng.normal(size=s).astype(np.float32)
        for s in ((b, t, kv, g, hd), (b, t, kv, hd), (b, t, kv, hd))
    )
    want = _np_attention(q, k, v, np.asarray(mask), 0.3, softcap)
    dense = jax.jit(dense_attention, static_argnums=(4, 5))(q, k, v, mask, 0.3, softcap)
    blocked = jax.jit(blocked_attention, static_argnums=(4, 5), static_argnames="block")(
        q, k, v, mask, 0.3, softcap, block=block
    )
    np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(blocked), want, rtol=1e-5, atol=1e-5)

    # Gradients flow through the switch over each query block's first visible key block exactly
    # as through dense scores.
    w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

    def loss(fn, q, k, v):
        return (fn(q, k, v) * w).sum()

    dense_fn = lambda q, k, v: dense_attention(q, k, v, mask, 0.3, softcap)  # noqa: E731
    blocked_fn = lambda q, k, v: blocked_attention(  # noqa: E731
        q, k, v, mask, 0.3, softcap, block=block
    )
    gd = jax.jit(jax.grad(lambda *a: loss(dense_fn, *a), argnums=(0, 1, 2)))(q, k, v)
    gb = jax.jit(jax.grad(lambda *a: loss(blocked_fn, *a), argnums=(0, 1, 2)))(q, k, v)
    for a, c in zip(gb, gd):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)


def test_skipped_blocks_are_the_invisible_ones():
    """The block table the switch reads: packed short examples leave most of the causal lower
    triangle invisible, no block above the diagonal is ever visited, and the visible key blocks
    of each query block are one run ending at the diagonal (what a query block computes)."""
    seg, pos = _packed(1, 32, [[5, 3, 9, 2, 7, 6]])
    mask = np.asarray(attention_mask(jnp.asarray(seg), jnp.asarray(pos), None))
    needed = mask.reshape(1, 8, 4, 8, 4).any(axis=(0, 2, 4))
    assert not np.triu(needed, 1).any() and np.diag(needed).all()
    assert needed.sum() < 8 * 9 // 2  # fewer than every causal block
    seg, pos = _packed(3, 32, LENGTHS)
    for window in (None, 6):
        mask = np.asarray(attention_mask(jnp.asarray(seg), jnp.asarray(pos), window))
        needed = mask.reshape(3, 8, 4, 8, 4).any(axis=(0, 2, 4))
        for i in range(8):
            first = int(np.argmax(needed[i]))
            assert needed[i, first : i + 1].all() and not needed[i, :first].any()
    # A filler row (all padding) costs only the diagonal blocks, not its causal triangle.
    filler = jnp.zeros((1, 32), jnp.int32)
    mask = np.asarray(attention_mask(filler, filler, None))
    assert (mask[0] == np.eye(32, dtype=bool)).all()


def test_model_blocked_equals_dense_on_packed_rows():
    """The whole decoder with blocked attention equals the dense one on packed rows."""
    from davir_jax.models import ArchConfig, random_model

    arch = ArchConfig(
        family="llama",
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    seg, pos = _packed(3, 32, LENGTHS)
    ids = np.random.default_rng(0).integers(0, 97, (3, 32)).astype(np.int32)
    dense = random_model(arch, attn_block=0, seed=1)(ids, seg, pos)
    blocked = random_model(arch, attn_block=8, seed=1)(ids, seg, pos)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(dense)[real], atol=1e-5)
