"""Blocked (flash) attention equals dense attention and a NumPy softmax oracle, values and
gradients, on packed rows with causal, segment and sliding-window masks; it skips the invisible
key blocks; its program and memory do not grow quadratically with the row length."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from davir_jax.models.decoder import (
    attention_mask,
    blocked_attention,
    dense_attention,
    first_key_blocks,
)


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


def _np_attention_grads(q, k, v, mask, scale, softcap, w):
    """Gradients of sum(attention * w) w.r.t. q, k, v, by hand in float64 (the oracle of the
    hand-written backward)."""
    q, k, v, w = (x.astype(np.float64) for x in (q, k, v, w))
    raw = np.einsum("btkgd,bskd->bkgts", q, k) * scale
    s = np.tanh(raw / softcap) * softcap if softcap is not None else raw
    s = np.where(mask[:, None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = np.einsum("btkgd,bskd->bkgts", w, v)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    if softcap is not None:
        ds = ds * (1 - np.tanh(raw / softcap) ** 2)
    ds *= scale
    return (
        np.einsum("bkgts,bskd->btkgd", ds, k),
        np.einsum("bkgts,btkgd->bskd", ds, q),
        np.einsum("bkgts,btkgd->bskd", p, w),
    )


# Rows: short examples (most key blocks skipped), one long example across every block, and a
# row ending in padding (segment 0, which only sees itself).
LENGTHS = [[5, 3, 9, 2, 7, 6], [32], [12, 11]]


def _qkv(rng, b, t, kv=2, g=3, hd=8):
    return tuple(
        rng.normal(size=s).astype(np.float32)
        for s in ((b, t, kv, g, hd), (b, t, kv, hd), (b, t, kv, hd))
    )


def _check(seg, pos, window, softcap, block, rng, kv=2, g=3):
    """Blocked attention against dense and the NumPy oracles: values and q/k/v gradients."""
    b, t = seg.shape
    mask = attention_mask(jnp.asarray(seg), jnp.asarray(pos), window)
    q, k, v = _qkv(rng, b, t, kv, g)
    want = _np_attention(q, k, v, np.asarray(mask), 0.3, softcap)
    dense = jax.jit(dense_attention, static_argnums=(4, 5))(q, k, v, mask, 0.3, softcap)

    def blocked_fn(q, k, v):
        return blocked_attention(q, k, v, seg, pos, window, 0.3, softcap, block=block)

    blocked = jax.jit(blocked_fn)(q, k, v)
    np.testing.assert_allclose(np.asarray(dense), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(blocked), want, rtol=1e-5, atol=1e-5)

    # The hand-written backward (recomputed probabilities, soft-cap derivative) against JAX's
    # derivative of the dense form and a float64 oracle.
    w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

    def loss(fn, q, k, v):
        return (fn(q, k, v) * w).sum()

    dense_fn = lambda q, k, v: dense_attention(q, k, v, mask, 0.3, softcap)  # noqa: E731
    gd = jax.jit(jax.grad(lambda *a: loss(dense_fn, *a), argnums=(0, 1, 2)))(q, k, v)
    gb = jax.jit(jax.grad(lambda *a: loss(blocked_fn, *a), argnums=(0, 1, 2)))(q, k, v)
    oracle = _np_attention_grads(q, k, v, np.asarray(mask), 0.3, softcap, np.asarray(w))
    for a, c, o in zip(gb, gd, oracle):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(a), o, rtol=1e-4, atol=1e-5)


# block 2: 16 key blocks, more than one chunk's worth (`ATTN_CHUNK_BLOCKS`), so long runs take
# several chunks; 4: runs of 1-8 blocks, every chunk size; 16: two blocks.
@pytest.mark.parametrize("block", [2, 4, 8, 16])
@pytest.mark.parametrize("window,softcap", [(None, None), (6, None), (None, 5.0), (6, 5.0)])
def test_blocked_equals_dense_and_numpy(block, window, softcap):
    seg, pos = _packed(3, 32, LENGTHS)
    _check(seg, pos, window, softcap, block, np.random.default_rng(block))


@pytest.mark.parametrize("window", [None, 5])
def test_blocked_exact_on_irregular_layouts(window):
    """Layouts the packer does not make stay exact (the skipped blocks are a lower bound, not a
    guess): a segment id that reappears later in its row, positions that do not rise by one, a
    filler row of padding, and one query group with a single KV head."""
    seg, pos = _packed(4, 32, [[10, 10, 12], [32], [], [3, 29]])
    seg[0, 20:] = 1  # segment 1 again after segment 2: its keys are not one run
    pos[1] = np.arange(32)[::-1]  # falling positions: the window bound must not apply
    pos[3, 3:] = np.arange(29) // 2  # repeated positions
    rng = np.random.default_rng(7)
    for block in (4, 8):
        _check(seg, pos, window, None, block, rng)
    _check(seg, pos, window, None, 4, rng, kv=1, g=4)


def test_blocked_bfloat16_inputs_softmax_in_float32():
    """bf16 q/k/v: scores, softmax and accumulation in float32, so the result is as close to the
    float64 oracle as bf16 inputs and output allow."""
    seg, pos = _packed(3, 32, LENGTHS)
    mask = np.asarray(attention_mask(jnp.asarray(seg), jnp.asarray(pos), None))
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _qkv(np.random.default_rng(3), 3, 32))
    out = jax.jit(lambda q, k, v: blocked_attention(q, k, v, seg, pos, None, 0.3, block=8))(q, k, v)
    assert out.dtype == jnp.bfloat16
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]
    want = _np_attention(*f32, mask, 0.3, None)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2)
    g = jax.grad(
        lambda q: blocked_attention(q, k, v, seg, pos, None, 0.3, block=8).astype(jnp.float32).sum()
    )(q)
    assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all())


def test_skipped_blocks_are_the_invisible_ones():
    """The first key block each query block visits: every earlier key block is invisible to all
    its queries (exactness), and on packer layouts it is the first visible one (nothing visible
    is computed late, nothing invisible early: the causal upper triangle, earlier examples and
    keys outside the window are skipped)."""

    def needed(seg, pos, window, block):
        mask = np.asarray(attention_mask(jnp.asarray(seg), jnp.asarray(pos), window))
        b, t = seg.shape
        nb = t // block
        return mask.reshape(b, nb, block, nb, block).any(axis=(0, 2, 4))

    seg, pos = _packed(1, 32, [[5, 3, 9, 2, 7, 6]])
    first = np.asarray(first_key_blocks(jnp.asarray(seg), jnp.asarray(pos), None, 4))
    table = needed(seg, pos, None, 4)
    assert (first == table.argmax(axis=1)).all()
    assert sum(i + 1 - f for i, f in enumerate(first)) < 8 * 9 // 2  # fewer than causal
    seg, pos = _packed(3, 32, LENGTHS)
    for window in (None, 6):
        for block in (2, 4, 8):
            first = np.asarray(first_key_blocks(jnp.asarray(seg), jnp.asarray(pos), window, block))
            table = needed(seg, pos, window, block)
            for i, f in enumerate(first):
                assert table[i, f : i + 1].all() and not table[i, :f].any()
    # Window 6 on the 32-token example: block 7 (tokens 28-31) sees keys from 23 on, block 5.
    first = first_key_blocks(jnp.asarray(seg[1:2]), jnp.asarray(pos[1:2]), 6, 4)
    assert np.asarray(first)[7] == 5
    # A filler row (all padding) costs only the diagonal blocks, not its causal triangle.
    filler = jnp.zeros((1, 32), jnp.int32)
    mask = np.asarray(attention_mask(filler, filler, None))
    assert (mask[0] == np.eye(32, dtype=bool)).all()
    assert (np.asarray(first_key_blocks(filler, filler, None, 4)) == np.arange(8)).all()


def _layer_program(t: int) -> tuple[int, int]:
    """Lowered program text size and compiled temporary bytes of one layer's blocked attention,
    forward and gradient, on a `t`-token row of 64-token blocks."""
    seg = jnp.ones((1, t), jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def loss(q, k, v):
        return blocked_attention(q, k, v, seg, pos, None, 0.25, None, block=64).sum()

    shapes = [
        jax.ShapeDtypeStruct(s, jnp.float32)
        for s in ((1, t, 1, 2, 16), (1, t, 1, 16), (1, t, 1, 16))
    ]
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*shapes)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    return len(lowered.as_text()), temp


def test_program_and_memory_do_not_grow_with_the_row():
    """4x the row length: the same program (loop bounds are read at run time; a switch per query
    block over its first key block grew 16x) and temporaries linear at most (no [T, T] mask or
    scores: 16x for those)."""
    text_512, temp_512 = _layer_program(512)
    text_2048, temp_2048 = _layer_program(2048)
    assert text_2048 <= 1.3 * text_512, (text_512, text_2048)
    assert temp_2048 <= 4.5 * temp_512, (temp_512, temp_2048)


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
