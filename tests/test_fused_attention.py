"""The fused attention kernels (`model.attention`: splash for TPU, the Pallas Triton kernel for
GPU) equal `dense` attention in Pallas interpret mode on CPU: values and q/k/v gradients on packed
rows with several segments and padding, grouped-query heads, sliding windows and soft-capping
(where the kernel has them), unsharded and inside `shard_map` over 8 fake devices; the switch
chooses and falls back as documented; a whole model gives the same logits under every
implementation; the remat policies change memory, not gradients; and the training step casts
float32 master weights to the compute dtype once per optimizer step, not per micro-batch."""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from davir_jax.core.sharding import Sharder, make_mesh
from davir_jax.models import attention as attn_impl
from davir_jax.models.arch import ArchConfig
from davir_jax.models.decoder import attention_mask, dense_attention

T = 128  # one kernel block per row (splash tiles are multiples of 128, in interpret mode too)
# Row 0: eight examples then padding; row 1: one example across the row; row 2: two.
LENGTHS = [[5, 3, 9, 2, 7, 6, 10, 40], [128], [60, 68]]
PAD_FROM = 82  # row 0's padding


def _packed(lengths: list[list[int]], t: int = T) -> tuple[np.ndarray, np.ndarray]:
    seg = np.zeros((len(lengths), t), np.int32)
    pos = np.zeros((len(lengths), t), np.int32)
    for r, lens in enumerate(lengths):
        at = 0
        for k, n in enumerate(lens, start=1):
            seg[r, at : at + n], pos[r, at : at + n] = k, np.arange(n)
            at += n
    return seg, pos


def _inputs(seed: int, b: int, kv: int = 2, g: int = 2, hd: int = 16):
    rng = np.random.default_rng(seed)
    shapes = ((b, T, kv, g, hd), (b, T, kv, hd), (b, T, kv, hd), (b, T, kv, g, hd))
    return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _value_and_grads(fn, q, k, v, w, real):
    """Attention and the gradients of sum(attention * w) over non-padding queries only (a
    padding query's output is never used, and the kernels compute it differently)."""

    def loss(q, k, v):
        return (fn(q, k, v) * w * real[:, :, None, None, None]).sum()

    return fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _compare(impl, window, softcap, sharder=None, lengths=LENGTHS, kv=2, g=2):
    seg, pos = _packed(lengths)
    q, k, v, w = _inputs(0, len(lengths), kv, g)
    real = jnp.asarray(seg > 0, jnp.float32)
    scale = 0.25
    mask = attention_mask(jnp.asarray(seg), jnp.asarray(pos), window)
    sharder = sharder or Sharder()

    def dense(q, k, v):
        return dense_attention(q, k, v, mask, scale, softcap)

    def fused(q, k, v):
        return attn_impl.fused_attention(
            impl, q, k, v, jnp.asarray(seg), window, scale, softcap, sharder
        )

    out_d, g_d = _value_and_grads(dense, q, k, v, w, real)
    out_f, g_f = _value_and_grads(jax.jit(fused), q, k, v, w, real)
    keep = np.asarray(seg > 0)
    np.testing.assert_allclose(np.asarray(out_f)[keep], np.asarray(out_d)[keep], atol=2e-5)
    for name, a, b in zip("qkv", g_f, g_d):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, err_msg=f"d{name}")
    # The padding tail of row 0 never reaches a real query's gradient.
    assert np.all(np.asarray(g_f[1])[0, PAD_FROM:] == 0)


@pytest.mark.parametrize(
    "impl,window,softcap",
    [
        ("splash", None, None),
        ("splash", 6, None),
        ("splash", None, 5.0),
        ("splash", 6, 5.0),
        ("pallas_gpu", None, None),
    ],
)
def test_fused_kernel_equals_dense_in_interpret_mode(impl, window, softcap):
    _compare(impl, window, softcap)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_fused_kernel_multi_head_attention_and_one_kv_head(impl):
    _compare(impl, None, None, kv=4, g=1)  # MHA
    _compare(impl, None, None, kv=1, g=4)  # MQA


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_fused_kernel_inside_shard_map_on_eight_devices(impl):
    """Batch over the data-parallel axes, KV heads over the tensor axis, as the rules map them:
    the same values and gradients as dense attention on one device. Then one KV head (the
    tensor axis splits the query heads of its group instead) and 3 rows (the data-parallel
    axes do not divide the batch: it stays whole)."""
    sharder = Sharder(make_mesh(data=2, fsdp=2, tensor=2))
    lengths = LENGTHS + [[40, 40, 48]]  # 4 rows: one per data-parallel shard
    _compare(impl, 6 if impl == "splash" else None, None, sharder, lengths)
    q_spec = sharder.spec(("batch", "seq", None, "heads", "head_dim"), (3, T, 1, 4, 16))
    assert q_spec[3] == "tensor" and q_spec[0] is None
    _compare(impl, None, None, sharder, LENGTHS, kv=1, g=4)


def test_choose_picks_the_platform_kernel_and_falls_back(caplog):
    choose = attn_impl.choose
    assert choose("auto", 1024, None, None, 64, "cpu") == "blocked"
    assert choose("auto", 1024, 4096, 50.0, 64, "tpu") == "splash"
    assert choose("auto", 1024, None, None, 64, "gpu") == "pallas_gpu"
    assert choose("auto", 48, None, None, 64, "cpu") == "dense"  # no block divides: as before
    assert choose("dense", 1024, None, None, 64, "tpu") == "dense"
    attn_impl._say_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert choose("auto", 1024, 4096, None, 64, "gpu") == "blocked"
        assert choose("auto", 1024, 4096, None, 64, "gpu") == "blocked"
        assert choose("auto", 1024, None, None, 64, "gpu", head_dim=256) == "blocked"
    said = [r.message for r in caplog.records if "sliding window" in r.message]
    assert len(said) == 1  # once per process
    assert any("head_dim 128 (here 256)" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="pallas_gpu.*soft-capping"):
        choose("pallas_gpu", 1024, None, 30.0, 64, "gpu")
    with pytest.raises(ValueError, match="splash.*no kernel block divides the sequence length"):
        choose("splash", 1000, None, None, 64, "tpu")
    with pytest.raises(ValueError, match="'flash' is not one of"):
        choose("flash", 1024, None, None, 64, "cpu")
    assert attn_impl.kernel_block("splash", 4096) == 512
    assert attn_impl.kernel_block("splash", 640) == 128
    assert attn_impl.kernel_block("pallas_gpu", 4096) == 128


ARCH = ArchConfig(
    family="gemma2",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    sliding_window=8,
    layer_types=("sliding_attention", "full_attention"),
    attn_logit_softcap=20.0,
    final_logit_softcap=30.0,
)


# The same shapes as a Llama: no window, no soft-capping.
LLAMA = dataclasses.replace(
    ARCH,
    family="llama",
    sliding_window=None,
    layer_types=(),
    attn_logit_softcap=None,
    final_logit_softcap=None,
)


def _logits(impl: str, arch: ArchConfig, mesh=None) -> np.ndarray:
    from davir_jax.models import random_model

    seg, pos = _packed(LENGTHS[:2] + [[40, 40, 48]])
    ids = np.random.default_rng(1).integers(1, arch.vocab_size, seg.shape).astype(np.int32)
    model = random_model(arch, mesh=mesh, attention=impl, scan_layers=True, seed=3)
    return np.asarray(jax.jit(lambda m: m(ids, seg, pos))(model)), seg > 0


@pytest.mark.parametrize("impl", ["blocked", "splash"])
def test_model_logits_equal_dense_with_every_implementation(impl):
    """Gemma2 shapes (alternating sliding-window layers, soft-capping, GQA) on packed rows."""
    dense, real = _logits("dense", ARCH)
    got, _ = _logits(impl, ARCH, make_mesh(data=2, fsdp=2, tensor=2))
    np.testing.assert_allclose(got[real], dense[real], atol=1e-4)


def test_model_with_pallas_gpu_equals_dense_on_llama_shapes():
    dense, real = _logits("dense", LLAMA)
    got, _ = _logits("pallas_gpu", LLAMA)
    np.testing.assert_allclose(got[real], dense[real], atol=1e-4)


def _sft_grads(remat: str, arch: ArchConfig, compute_dtype: str | None = None):
    from davir_jax.core.losses import example_nll
    from davir_jax.models import random_model

    seg, pos = _packed([[40, 40, 48], [128]])
    ids = np.random.default_rng(2).integers(1, arch.vocab_size, seg.shape).astype(np.int32)
    model = random_model(arch, remat=remat, scan_layers=True, seed=4, compute_dtype=compute_dtype)
    graphdef, params = nnx.split(model)

    def loss(p):
        nll, _ = example_nll(nnx.merge(graphdef, p), ids, seg, pos, np.ones_like(ids), 4, 128)
        return nll.sum()

    return jax.jit(jax.grad(loss))(params)


def test_remat_policies_change_memory_not_gradients():
    ref = _sft_grads("none", ARCH)
    for policy in ("dots", "attention"):  # full: tests/test_scan_layers.py
        got = _sft_grads(policy, ARCH)
        # Recomputation reorders float32 sums: agreement to float32 rounding, not bit-exact.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), got, ref)


def _count(jaxpr, name: str) -> int:
    n = sum(eqn.primitive.name == name for eqn in jaxpr.eqns)
    return n + sum(_count(sub, name) for e in jaxpr.eqns for sub in jaxprs_in_params(e.params))


def _remat_case(impl: str, remat: str):
    from davir_jax.core.losses import example_nll
    from davir_jax.models import random_model

    arch = dataclasses.replace(LLAMA, num_layers=1)
    seg, pos = _packed([[40, 40, 48]])
    ids = np.ones(seg.shape, np.int32)
    model = random_model(arch, remat=remat, attention=impl, attn_block=32, seed=0)
    graphdef, params = nnx.split(model)

    def loss(p):
        return example_nll(nnx.merge(graphdef, p), ids, seg, pos, ids, 4, 128)[0].sum()

    return loss, params


def test_remat_attention_keeps_the_blocked_kernel_residuals():
    """Under `attention` the backward does not rerun the blocked attention forward (its loops
    number as without remat); under `full` it does (one loop more)."""

    def loops(remat: str) -> int:
        loss, params = _remat_case("blocked", remat)
        return _count(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, "while")

    none, full, attention = loops("none"), loops("full"), loops("attention")
    assert full > none, (none, full)
    assert attention == none, (none, attention)


def test_remat_attention_saves_the_splash_log_sum_exp():
    """Splash names its residuals: `attention` saves its log-sum-exp `[B, KV, G, T]`, `full`
    does not. (The interpret-mode jaxpr still holds a forward kernel call in the recomputation;
    whether XLA removes it on TPU is unverified: no session had a TPU.)"""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    def lse_saved(remat: str) -> bool:
        loss, params = _remat_case("splash", remat)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            print_saved_residuals(loss, params)
        return f"f32[1,2,2,{T}] output of jitted function '_splash_attention'" in printed.getvalue()

    assert lse_saved("attention") and not lse_saved("full")


def test_cast_once_gives_the_gradients_of_casting_at_each_use():
    """bf16 compute over f32 master weights: the gradients through `cast_for_compute` (cast
    once) equal those of the model's own casts at each use, with a frequent token (whose
    embedding gradient sums many rows) and a tied embedding."""
    from davir_jax.core.losses import example_nll
    from davir_jax.models import random_model
    from davir_jax.models.decoder import cast_for_compute

    seg, pos = _packed([[40, 40, 48], [128]])
    ids = np.random.default_rng(5).integers(1, 4, seg.shape).astype(np.int32)  # 3 token ids
    for tied in (False, True):
        arch = dataclasses.replace(ARCH, tie_embeddings=tied)
        model = random_model(arch, compute_dtype="bfloat16", scan_layers=True, seed=6)
        graphdef, params = nnx.split(model)

        def loss(p, graphdef=graphdef):
            return example_nll(nnx.merge(graphdef, p), ids, seg, pos, ids, 4, 32)[0].sum()

        at_use = jax.jit(jax.grad(loss))(params)
        once = jax.jit(jax.grad(lambda p: loss(cast_for_compute(p, "bfloat16"))))(params)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), once, at_use)


def test_remat_names_in_the_config():
    from davir_jax.config import ConfigError, load_config

    base = "tests/../configs/tiny.yaml"
    assert load_config(base, ["--model.remat=attention"]).model.remat == "attention"
    assert load_config(base, ["--model.remat=true"]).model.remat == "full"
    assert load_config(base, ["--model.remat=false"]).model.remat == "none"
    assert load_config(base, ["--model.attention=splash"]).model.attention == "splash"
    with pytest.raises((ConfigError, ValueError), match="remat.*'some'"):
        load_config(base, ["--model.remat=some"])
    with pytest.raises((ConfigError, ValueError), match="attention.*'flash'"):
        load_config(base, ["--model.attention=flash"])


def _param_casts(jaxpr, shapes: set, inside_scan: bool = False) -> tuple[int, int]:
    """(outside, inside) counts of float32 -> bfloat16 conversions of parameter-shaped arrays,
    inside meaning within a `scan` body (the micro-batch loop)."""
    out = [0, 0]
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "convert_element_type":
            src = eqn.invars[0].aval
            if (
                src.dtype == jnp.float32
                and eqn.params["new_dtype"] == jnp.bfloat16
                and src.shape in shapes
            ):
                out[int(inside_scan)] += 1
        for sub in jaxprs_in_params(eqn.params):
            o, i = _param_casts(sub, shapes, inside_scan or eqn.primitive.name == "scan")
            out[0] += o
            out[1] += i
    return out[0], out[1]


def test_master_weights_are_cast_once_per_optimizer_step():
    import optax

    from davir_jax.engine.trainer import make_train_step
    from davir_jax.models import random_model

    model = random_model(LLAMA, compute_dtype="bfloat16", scan_layers=False)
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-3)
    step = make_train_step(graphdef, tx, 16)
    seg, pos = _packed([[40, 40, 48], [128]])
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, seg.shape).astype(np.int32)
    micro = {
        "input_ids": ids,
        "segment_ids": seg,
        "positions": pos,
        "loss_mask": np.ones_like(ids),
        "weights": np.ones((2, 4), np.float32),
    }
    batch = {k: np.stack([v, v]) for k, v in micro.items()}  # 2 micro-batches
    jaxpr = jax.make_jaxpr(step)((params, tx.init(params)), batch).jaxpr
    # The layers' matrices are cast; the embedding and LM head stay float32 (`_KEEP_STORED`).
    from davir_jax.models.decoder import cast_for_compute

    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(cast_for_compute(params, "bfloat16")))
    moved = [p for p, c in pairs if p.dtype != c.dtype]
    assert len(moved) == 2 * 7  # q, k, v, o, gate, up, down per layer
    outside, inside = _param_casts(jaxpr, {tuple(p.shape) for p in moved})
    assert inside == 0, f"{inside} parameter casts inside the micro-batch loop"
    assert outside >= len(moved)
