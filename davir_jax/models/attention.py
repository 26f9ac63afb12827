"""The attention implementation switch (`model.attention`) and the fused kernels behind it.

Every implementation computes causal softmax attention within each packed segment (segment ids
1, 2, ...; 0 = padding), with grouped-query heads, an optional sliding window and Gemma2's
optional logit soft-capping, over a whole sequence (no KV cache; decoding always runs `dense`):

- `dense`: one `[T, T]` score matrix per head (`decoder.dense_attention`); memory O(T^2).
- `blocked`: `decoder.blocked_attention`, a flash attention written in XLA that skips the key
  blocks no query of a block may see; memory O(T * block). The CPU path.
- `splash`: the Pallas splash attention kernel for TPU
  (`jax.experimental.pallas.ops.tpu.splash_attention`), with `SegmentIds` and a causal or local
  mask, one multi-query kernel per KV head (grouped-query attention as MaxText runs it).
- `pallas_gpu`: the Pallas Triton flash attention for GPU
  (`jax.experimental.pallas.ops.gpu.attention.mha`) with `segment_ids`; KV heads are repeated to
  the query heads. It has no sliding window and no soft-capping, and is not used above head_dim
  128.
- `auto`: `splash` on TPU, `pallas_gpu` on GPU, `blocked` elsewhere; where the platform's kernel
  cannot run a layer (a window or soft-capping it lacks, a length no kernel block divides) that
  layer runs `blocked` and the fallback is logged once.

The GPU choice: cuDNN's packed (THD) fused attention is reachable on the pinned JAX (0.10.2)
only through the private `jax._src.cudnn` module (`jax.nn.dot_product_attention` takes sequence
lengths, not segment ids), so the public Pallas Triton kernel is the fused GPU path here. No
session of this project has had a GPU to measure either; `benchmarks/train_mfu.py --attention`
is the measurement to make.

A kernel named explicitly on a platform that is not its own runs in Pallas interpret mode: slow,
but the same kernel code, which is how the tests check it against `dense` on CPU. Under a mesh,
the kernels run inside `shard_map` over the batch (data-parallel axes) and KV heads (tensor
axis), the layout `core.sharding`'s rules give those axes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from davir_jax.core.sharding import Sharder

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "dense", "blocked", "splash", "pallas_gpu")
FUSED = {"splash": "tpu", "pallas_gpu": "gpu"}  # kernel -> the platform it compiles for
_AUTO = {"tpu": "splash", "gpu": "pallas_gpu"}
# Kernel blocks tried, largest first: splash tiles are multiples of TPU's 128 lanes (its
# interpret mode checks that too); Triton programs take smaller powers of two.
_KERNEL_BLOCKS = {"splash": (512, 256, 128), "pallas_gpu": (128, 64, 32, 16)}


def kernel_block(impl: str, seq: int) -> int | None:
    """The query/key block of fused kernel `impl` over `seq` tokens: the largest candidate
    dividing `seq`, or None when none does."""
    for b in _KERNEL_BLOCKS[impl]:
        if b <= seq and seq % b == 0:
            return b
    return None


def unsupported(
    impl: str, seq: int, window: int | None, softcap: float | None, head_dim: int = 0
) -> str | None:
    """Why fused kernel `impl` cannot run a layer (a sentence), or None when it can."""
    if impl == "pallas_gpu" and window is not None:
        return "the Pallas GPU kernel has no sliding window"
    if impl == "pallas_gpu" and softcap is not None:
        return "the Pallas GPU kernel has no logit soft-capping"
    if impl == "pallas_gpu" and head_dim > 128:
        # Its programs hold whole head_dim-wide tiles in shared memory; JAX tests it up to 128.
        return f"the Pallas GPU kernel is not used above head_dim 128 (here {head_dim})"
    if kernel_block(impl, seq) is None:
        return f"no kernel block divides the sequence length {seq}"
    return None


def attention_name(value: str) -> str:
    """`value` if it names an implementation, else the error every config layer raises."""
    if value not in IMPLEMENTATIONS:
        raise ValueError(f"attention: {value!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return value


@functools.cache
def _say_once(message: str) -> None:
    log.warning(message)


def choose(
    impl: str,
    seq: int,
    window: int | None,
    softcap: float | None,
    block: int,
    platform: str | None = None,
    head_dim: int = 0,
) -> str:
    """The implementation one layer runs: `dense`, `blocked`, `splash` or `pallas_gpu`.

    `auto` falls back to `blocked` (and says so once) where the platform's kernel cannot run the
    layer; a kernel named explicitly that cannot run it is an error naming the reason. `blocked`
    runs `dense` when `block` does not divide `seq` (or is 0), as it always has.
    """
    attention_name(impl)
    platform = platform or jax.default_backend()
    if impl == "auto":
        impl = _AUTO.get(platform, "blocked")
        reason = impl in FUSED and unsupported(impl, seq, window, softcap, head_dim)
        if reason:
            _say_once(f"attention auto: {reason}; those layers run 'blocked'")
            impl = "blocked"
    elif impl in FUSED:
        reason = unsupported(impl, seq, window, softcap, head_dim)
        if reason:
            raise ValueError(f"attention {impl}: {reason}; use model.attention=auto or blocked")
        if platform != FUSED[impl]:
            _say_once(f"attention {impl} on {platform}: Pallas interpret mode (slow; for tests)")
    if impl == "blocked" and not (0 < block < seq and seq % block == 0):
        return "dense"
    return impl


def fused_attention(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids_bt: jax.Array,
    window: int | None,
    scale: float,
    softcap: float | None,
    sharder: Sharder,
    platform: str | None = None,
) -> jax.Array:
    """Attention `[B, T, KV, G, hd]` of `q` `[B, T, KV, G, hd]` over `k`, `v` `[B, T, KV, hd]`
    by fused kernel `impl`, split over the mesh of `sharder` (if any) with `shard_map`.

    Padding (segment 0) attends causally to the padding before it: its output differs from
    `dense` (where a padding query sees only itself) and is never used; every non-padding output
    and every gradient reaching a non-padding input equals `dense`'s.
    """
    platform = platform or jax.default_backend()
    kernel = functools.partial(
        _splash if impl == "splash" else _triton,
        window=window,
        scale=scale,
        softcap=softcap,
        block=kernel_block(impl, q.shape[1]),
        interpret=platform != FUSED[impl],
    )
    if sharder.mesh is None:
        return kernel(q, k, v, segment_ids_bt)
    q_spec = sharder.spec(("batch", "seq", "kv_heads", None, "head_dim"), q.shape)
    kv_spec = sharder.spec(("batch", "seq", "kv_heads", "head_dim"), k.shape)
    seg_spec = sharder.spec(("batch", "seq"), segment_ids_bt.shape)
    if kv_spec[2] is None:
        # KV heads that the tensor axis does not divide (e.g. 1 or 3 of them) stay whole on
        # every device; the query heads of each group are split instead where they divide,
        # so the tensor shards still share the work.
        q_spec = sharder.spec(("batch", "seq", None, "heads", "head_dim"), q.shape)
    return jax.shard_map(
        kernel,
        mesh=sharder.mesh,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids_bt)


@functools.cache
def _splash_kernel(
    seq: int, group: int, window: int | None, softcap: float | None, block: int, interpret: bool
) -> Any:
    """A multi-query splash kernel (q `[G, T, hd]`, k and v `[T, hd]`), cached per shape."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (seq, seq)
    # `decoder.attention_mask`'s window: a query sees keys fewer than `window` positions back.
    one = sm.CausalMask(shape) if window is None else sm.LocalMask(shape, (window - 1, 0), 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # Built once per shape and cached: its mask tables must be constants, not values of the
    # trace that first asked for it.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa(
            sm.MultiHeadMask([one] * group),
            block_sizes=sizes,
            attn_logits_soft_cap=softcap,
            residual_checkpoint_name=ATTENTION_RESIDUALS,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )


def _splash(q, k, v, segment_ids_bt, *, window, scale, softcap, block, interpret):  # noqa: ANN001, ANN202
    """Splash attention on one shard: vmapped over the batch and the KV heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import (
        SegmentIds,
    )

    b, t, kv, g, hd = q.shape
    kernel = _splash_kernel(t, g, window, softcap, block, interpret)
    # The kernel takes unscaled logits (soft-capping applies to q.k), so scale q first.
    qh = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, hd]

    def one_row(qr, kr, vr, seg):  # noqa: ANN001, ANN202
        ids = SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh_, kh_, vh_: kernel(qh_, kh_, vh_, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qh, kh, vh, segment_ids_bt.astype(jnp.int32))
    return out.transpose(0, 3, 1, 2, 4).astype(q.dtype)


def _triton(q, k, v, segment_ids_bt, *, window, scale, softcap, block, interpret):  # noqa: ANN001, ANN202
    """The Pallas Triton flash attention on one shard, KV heads repeated to the query heads."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    del window, softcap  # `unsupported` keeps layers that need them off this kernel
    b, t, kv, g, hd = q.shape
    bwd = min(block, 32)  # JAX's own backward tiles (its defaults): smaller than the forward's
    sizes = gpu_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=bwd,
        block_kv_dkv=bwd,
        block_q_dq=bwd,
        block_kv_dq=bwd,
    )
    out = gpu_attention.mha(
        q.reshape(b, t, kv * g, hd),
        jnp.repeat(k, g, axis=2),
        jnp.repeat(v, g, axis=2),
        segment_ids=segment_ids_bt.astype(jnp.int32),
        sm_scale=float(scale),
        causal=True,
        block_sizes=sizes,
        interpret=interpret,
    )
    return out.reshape(b, t, kv, g, hd)


# Remat policies (`model.remat`): what the backward pass keeps of each layer's forward.
REMAT_POLICIES = ("none", "full", "dots", "attention")
ATTENTION_OUT = "attention_out"  # the `checkpoint_name` of each layer's attention output
# ... and of what the attention kernels' backward needs besides it (the log-sum-exp): kept
# with it, the backward does not rerun the forward kernel. The Pallas GPU kernel has no such
# hook: under `attention` its forward is recomputed as under `full`.
ATTENTION_RESIDUALS = "attention_residuals"


def remat_name(value: str | bool) -> str:
    """`model.remat` as a policy name; `true`/`false` (this option's earlier form) mean
    `full`/`none`."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_POLICIES:
        raise ValueError(f"remat: {value!r} is not one of {', '.join(REMAT_POLICIES)}")
    return value


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint` policy of a remat name (`none` is no checkpoint at all):

    - `full`: keep nothing but the layer's input; recompute the whole layer.
    - `dots`: keep the results of the matrix products without batch dimensions (the
      projections and the MLP), recompute the element-wise work and the attention.
    - `attention`: keep each layer's attention output and the kernel's log-sum-exp (blocked and
      splash), recompute the rest: the attention is the most expensive part to recompute on
      long rows.
    """
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "attention":
        return jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, ATTENTION_RESIDUALS)
    return None
