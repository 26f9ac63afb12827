"""Chunked token log-probs equal the naive full log-softmax (NumPy oracle)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from davir_jax.core.losses import masked_nll, shift_targets, token_logprobs


def _np_logprobs(hidden, w, targets):
    logits = hidden.astype(np.float64) @ w.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
    return np.take_along_axis(logits, targets[..., None], -1)[..., 0] - lse


@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 64])
def test_chunked_equals_naive(chunk):
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 13, 8)).astype(np.float32)
    w = rng.normal(size=(8, 50)).astype(np.float32)
    y = rng.integers(0, 50, (3, 13))
    lp = token_logprobs(lambda x: x @ jnp.asarray(w), jnp.asarray(h), jnp.asarray(y), chunk)
    np.testing.assert_allclose(np.asarray(lp), _np_logprobs(h, w, y), rtol=1e-5, atol=1e-5)


def test_shift_and_masked_nll():
    ids = jnp.array([[5, 6, 7, 8]])
    mask = jnp.array([[0, 0, 1, 1]])
    targets, m = shift_targets(ids, mask)
    assert targets.tolist() == [[6, 7, 8, 0]] and m.tolist() == [[0, 1, 1, 0]]
    lp = jnp.array([[-1.0, -2.0, -3.0, -4.0]])
    nll, n = masked_nll(lp, m)
    assert float(nll[0]) == 5.0 and float(n[0]) == 2.0


def test_segment_nll_equals_numpy_per_segment_sums():
    from davir_jax.core.losses import segment_nll

    rng = np.random.default_rng(1)
    lp = -rng.random((3, 10)).astype(np.float32)
    mask = rng.integers(0, 2, (3, 10)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 0, 0], [1] * 10, [0] * 10])
    nll, cnt = segment_nll(jnp.asarray(lp), jnp.asarray(mask), jnp.asarray(seg), 4)
    want = np.zeros((3, 4))
    want_n = np.zeros((3, 4))
    for b in range(3):
        for t in range(10):
            if seg[b, t]:
                want[b, seg[b, t] - 1] -= lp[b, t] * mask[b, t]
                want_n[b, seg[b, t] - 1] += mask[b, t]
    np.testing.assert_allclose(np.asarray(nll), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(cnt), want_n)


def test_shift_targets_never_crosses_segments():
    ids = jnp.array([[5, 6, 7, 8, 9, 0]])
    mask = jnp.array([[0, 1, 1, 1, 1, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    _, m = shift_targets(ids, mask, seg)
    # token 8 starts segment 2: it is not predicted from token 7 of segment 1
    assert m.tolist() == [[1, 1, 0, 1, 0, 0]]


def _masked_case(seed: int = 2):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(4, 21, 8)).astype(np.float32)
    w = rng.normal(size=(8, 50)).astype(np.float32)
    y = rng.integers(0, 50, (4, 21))
    mask = (rng.random((4, 21)) < 0.5).astype(np.float32)
    mask[1] = 0  # a row without a response token
    mask[2, 3:] = 1  # the longest row sets how many chunks run
    return h, w, y, mask


@pytest.mark.parametrize("chunk", [1, 4, 5, 16, 64])
def test_masked_positions_only_equal_naive(chunk):
    """With a mask, masked positions equal the full log-softmax and the rest are exactly 0."""
    h, w, y, mask = _masked_case()
    lp = token_logprobs(
        lambda x: x @ jnp.asarray(w), jnp.asarray(h), jnp.asarray(y), chunk, jnp.asarray(mask)
    )
    want = np.where(mask > 0, _np_logprobs(h, w, y), 0.0)
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)
    assert not np.asarray(lp)[mask == 0].any()


def test_masked_gradients_equal_unmasked():
    """The compacted path is what SFT differentiates: its gradients (hidden states and head)
    equal those of the plain path on the same masked sum."""
    import jax

    h, w, y, mask = _masked_case(3)
    m = jnp.asarray(mask)

    def loss(hw, use_mask):
        hh, ww = hw
        lp = token_logprobs(lambda x: x @ ww, hh, jnp.asarray(y), 4, m if use_mask else None)
        return -(lp * m).sum()

    args = (jnp.asarray(h), jnp.asarray(w))
    ga = jax.grad(loss)(args, True)
    gb = jax.grad(loss)(args, False)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _sliced_head(w):
    """`x @ w`, or with `vocab=(start, size)` its columns start .. start + size - 1 (the
    contract of `Decoder.logits`)."""
    import jax

    def head(x, vocab=None):
        cols = jnp.asarray(w)
        if vocab is not None:
            cols = jax.lax.dynamic_slice_in_dim(cols, vocab[0], vocab[1], axis=1)
        return x @ cols

    return head


@pytest.mark.parametrize("block", [7, 16, 25, 50, 64])
@pytest.mark.parametrize("masked", [False, True])
def test_vocab_blocked_equals_naive(block, masked):
    """The online log-sum-exp over vocabulary blocks (50 entries: blocks that divide it, that
    leave a partial last block, and one block or more than the vocabulary) equals the full
    log-softmax; the targets fall in every block."""
    h, w, y, mask = _masked_case(4)
    m = jnp.asarray(mask) if masked else None
    lp = token_logprobs(_sliced_head(w), jnp.asarray(h), jnp.asarray(y), 4, m, block)
    want = _np_logprobs(h, w, y)
    if masked:
        want = np.where(mask > 0, want, 0.0)
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)


def test_vocab_blocked_gradients_equal_full_vocabulary():
    """SFT differentiates the blocked log-sum-exp: gradients (hidden states and head) equal
    those over the whole vocabulary at once."""
    import jax

    h, w, y, mask = _masked_case(5)
    m = jnp.asarray(mask)

    def loss(hw, block):
        hh, ww = hw
        lp = token_logprobs(_sliced_head(ww), hh, jnp.asarray(y), 4, m, block)
        return -(lp * m).sum()

    args = (jnp.asarray(h), jnp.asarray(w))
    ga = jax.jit(jax.grad(loss), static_argnums=1)(args, 16)
    gb = jax.jit(jax.grad(loss), static_argnums=1)(args, 0)
    for a, b in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied,softcap", [(True, None), (False, None), (True, 3.0)])
def test_model_head_vocabulary_slice(tied, softcap):
    """`Decoder.logits(h, vocab=(start, size))` is the slice of the full logits (tied and untied
    heads, final soft-capping), and the vocabulary is taken in blocks only where it is not split
    over devices."""
    import jax

    from davir_jax.core.sharding import make_mesh
    from davir_jax.models import ArchConfig, random_model

    arch = ArchConfig(
        family="llama",
        vocab_size=96,
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        tie_embeddings=tied,
        final_logit_softcap=softcap,
    )
    model = random_model(arch, seed=3)
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 16)).astype(np.float32))
    full = np.asarray(model.logits(h))
    part = jax.jit(lambda h, s: model.logits(h, vocab=(s, 32)))(h, jnp.int32(40))
    np.testing.assert_allclose(np.asarray(part), full[..., 40:72], rtol=1e-6, atol=1e-6)
    assert model.vocab_block(32) == 32
    split = random_model(arch, mesh=make_mesh(1, 4, 2), seed=3)  # vocab over tensor = 2
    assert split.vocab_block(32) == 0


def test_masked_head_gradient_memory_does_not_grow_with_the_chunk_count():
    """Under a gradient, the response-only LM head (chunks skipped by `lax.cond`) must keep one
    `[V, D]` weight cotangent, not one per chunk: a `cond` inside the chunk map made XLA hold
    every chunk's (4.8 GB of temporaries for SmolLM2 at one row of 1024; 1.1 GB without)."""
    v, d, t = 4096, 64, 512
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(v, d)).astype(np.float32) * 0.02)
    h = jnp.asarray(rng.normal(size=(1, t, d)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, v, (1, t)), jnp.int32)

    def temp(mask: jnp.ndarray | None) -> int:
        def f(w: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
            head = lambda hh: jnp.einsum("...d,vd->...v", hh, w)  # noqa: E731
            return token_logprobs(head, h, y, 16, mask).sum()

        compiled = jax.jit(jax.grad(f, argnums=(0, 1))).lower(w, h).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    weight = v * d * 4
    masked, unmasked = temp(jnp.ones((1, t), jnp.float32)), temp(None)
    # 32 chunks: one weight cotangent per chunk would be 32 * 1 MiB.
    assert masked <= unmasked + 4 * weight, (masked, unmasked)
