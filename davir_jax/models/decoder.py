"""One decoder-only transformer, configured per family (Llama, Mistral, Qwen2, Gemma, Gemma2).

Parameters carry logical axis names only (`out_sharding` metadata); `core.sharding` maps them
to the mesh. Kernels are stored input-major (`x @ W`): q `[embed, heads, head_dim]`, o
`[heads, head_dim, embed]`, MLP `[embed, mlp]` / `[mlp, embed]`, embedding `[vocab, embed]`,
untied LM head `[embed, vocab]`.

Attention takes optional `segment_ids` and `positions` so that a packed row (several examples in
one row, segment ids 1, 2, ...; 0 = padding) computes exactly what separate rows would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from davir_jax.core.sharding import Sharder
from davir_jax.models import attention as attn_impl
from davir_jax.models.arch import ArchConfig, llama3_inv_freq_scale
from davir_jax.models.quant import read_kernel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str | Any) -> Any:
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


# Default query/key block (tokens) of `blocked_attention`: `RunConfig` and `model.attn_block`.
ATTN_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How the decoder runs, as opposed to what it is (`ArchConfig`)."""

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # What the backward pass keeps of each layer (`attention.REMAT_POLICIES`: none, full, dots,
    # attention; true/false mean full/none). Training only: scoring has no backward.
    remat: str | bool = "none"
    sharder: Sharder = dataclasses.field(default_factory=Sharder)
    # Query/key block of attention over a whole sequence (no cache): key blocks that no query of
    # the block may see (causal, another packed example, outside the window) are skipped.
    # 0: one dense [T, T] score matrix.
    attn_block: int = ATTN_BLOCK
    # The attention implementation (`attention.IMPLEMENTATIONS`; `auto`: the platform's fused
    # kernel, `blocked` on CPU).
    attention: str = "auto"
    # Run the layer stack as one `lax.scan` over groups of identical layers (`Decoder`), so the
    # compiled program holds one group body whatever the depth. The parameters stay stored
    # per layer (`layers.{i}`); they are stacked at trace time.
    scan_layers: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", attn_impl.remat_name(self.remat))
        attn_impl.attention_name(self.attention)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for `slots` positions, for incremental decoding.

    `k[l]`, `v[l]`: `[B, slots, kv_heads, head_dim]`; `segment_ids`/`positions` `[B, slots]`
    describe the cached keys (segment 0 = empty or padding, never attended); `index` is the next
    slot to write (the same for every row: prompts are left-padded).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, arch: ArchConfig, batch: int, slots: int, dtype: Any) -> KVCache:
        shape = (batch, slots, arch.num_kv_heads, arch.resolved_head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(arch.num_layers))
        return cls(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(arch.num_layers)),
            segment_ids=jnp.zeros((batch, slots), jnp.int32),
            positions=jnp.zeros((batch, slots), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def _param(
    rngs: nnx.Rngs | None,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    dtype: Any,
    init: str = "normal",
) -> nnx.Param:
    if init == "normal":
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    elif init == "zeros":
        value = jnp.zeros(shape, jnp.float32)
    else:
        value = jnp.ones(shape, jnp.float32)
    # Our own metadata key: flax acts eagerly on `out_sharding`; we map names in sharding.py.
    return nnx.Param(value.astype(dtype), logical_axes=axes)


# Parameters `cast_for_compute` leaves as stored: RMSNorm scales are read in float32; the
# embedding and the LM head are read many times per step (a gather per token, the head once per
# loss chunk), and their gradient contributions must be summed in float32, not in the compute
# dtype (a frequent token's embedding gradient loses most of its precision in bfloat16).
_KEEP_STORED = ("scale", "embed", "lm_head", "absmax")  # absmax: NF4 block scales (quant.py)


def cast_for_compute(params: nnx.State, compute_dtype: str) -> nnx.State:
    """The parameters as the forward pass reads them: the layers' matrices (and biases), which
    the model casts to the compute dtype, cast once, so those casts become no-ops; the rest
    (`_KEEP_STORED`) as stored. The training step calls this once per optimizer step, outside
    its micro-batch loop, so float32 master weights are cast once, not once per micro-batch,
    and an FSDP all-gather moves compute-dtype shards. Each cast matrix is read once per
    forward pass, so its gradient is the same as with a cast at the point of use."""
    cd = to_dtype(compute_dtype)

    def cast(path: tuple, v: Any) -> Any:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        keep = any(n in names for n in _KEEP_STORED)
        if keep or not jnp.issubdtype(v.dtype, jnp.floating) or v.dtype == cd:
            return v
        return v.astype(cd)

    return jax.tree_util.tree_map_with_path(cast, params)


# The attribute of a projection's LoRA adapter (`q_proj` -> `q_proj_lora`; `models.lora`).
LORA_SUFFIX = "_lora"


def with_lora(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """`y`, the output of `module`'s projection `name` on `x`, plus its LoRA adapter's
    (`models.lora.LoRA`: `scale * (x A) B`) when it has one."""
    adapter = getattr(module, name + LORA_SUFFIX, None)
    return y if adapter is None else y + adapter(x)


class RMSNorm(nnx.Module):
    """RMSNorm in float32. Gemma stores `w` with the unit offset removed: y = x_hat * (1 + w)."""

    def __init__(self, dim: int, eps: float, plus_one: bool, dtype: Any, rngs: nnx.Rngs):
        self.eps = eps
        self.plus_one = plus_one
        self.scale = _param(rngs, (dim,), ("embed",), dtype, "zeros" if plus_one else "ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.scale.get_value().astype(jnp.float32)
        if self.plus_one:
            return (xf * (1.0 + w)).astype(x.dtype)
        # Llama casts back to the activation dtype before the weight multiply (HF parity).
        return (w * xf.astype(x.dtype)).astype(x.dtype)


def rope_inv_freq(arch: ArchConfig) -> np.ndarray:
    """RoPE inverse frequencies `[head_dim // 2]`, float32, with the configured scaling."""
    dim = arch.resolved_head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (1.0 / (np.float32(arch.rope_theta) ** exponent)).astype(np.float32)
    rs = arch.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.rope_type == "llama3":
        inv = llama3_inv_freq_scale(inv, rs)
    return inv.astype(np.float32)


def apply_rope(x_bthd: jax.Array, positions_bt: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the HF / Llama layout: first and second halves of head_dim pair up)."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos = jnp.cos(emb)[:, :, None, :].astype(x_bthd.dtype)
    sin = jnp.sin(emb)[:, :, None, :].astype(x_bthd.dtype)
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    return x_bthd * cos + rotated * sin


def attention_mask(
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    window: int | None,
    key_segment_ids: jax.Array | None = None,
    key_positions: jax.Array | None = None,
    offset: jax.Array | int = 0,
) -> jax.Array:
    """`[B, T, S]` boolean: causal within a segment, optionally limited to a sliding window.

    Without a cache the keys are the queries (S = T). With one, the keys are the cache's slots
    and query t sits in slot `offset + t`: it sees slots up to its own. A padding query (segment
    0) sees only its own slot: its output is never used, and letting it see the whole run of
    padding before it would make `blocked_attention` compute that run (the full causal triangle
    of a filler row).
    """
    if key_segment_ids is None:
        key_segment_ids, key_positions = segment_ids_bt, positions_bt
    t, s = segment_ids_bt.shape[1], key_segment_ids.shape[1]
    q_slot = offset + jnp.arange(t)
    mask = (jnp.arange(s)[None, :] <= q_slot[:, None])[None]
    same = segment_ids_bt[:, :, None] == key_segment_ids[:, None, :]
    own = (jnp.arange(s)[None, :] == q_slot[:, None])[None]
    mask = mask & jnp.where(segment_ids_bt[:, :, None] == 0, own, same)
    if window is not None:
        dist = positions_bt[:, :, None] - key_positions[:, None, :]
        mask = mask & (dist < window)
    return mask


def _scores(
    q: jax.Array, k: jax.Array, mask: jax.Array, scale: float, softcap: float | None
) -> jax.Array:
    """Masked float32 attention logits `[B, KV, G, Tq, Tk]` of `q` `[B, Tq, KV, G, hd]` against
    `k` `[B, Tk, KV, hd]`; `mask` `[B, Tq, Tk]`."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * jnp.asarray(scale, q.dtype)
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return jnp.where(mask[:, None, None], s.astype(jnp.float32), jnp.finfo(jnp.float32).min)


def _softmax_values(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, softcap: float | None
) -> jax.Array:
    """Softmax attention of `q` over `k`/`v`, head-major `[B, KV, G, Tq, hd]` (the layout the
    products leave it in; blocked attention concatenates query blocks in it)."""
    probs = jax.nn.softmax(_scores(q, k, mask, scale, softcap), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->bkgtd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None = None,
) -> jax.Array:
    """Softmax attention `[B, T, KV, G, hd]` over every key at once (one `[T, S]` score matrix)."""
    return _softmax_values(q, k, v, mask, scale, softcap).transpose(0, 3, 1, 2, 4)


def _chunk_mask(
    segment_ids: jax.Array,
    positions: jax.Array,
    window: int | None,
    q0: jax.Array,
    tq: int,
    k0: jax.Array,
    tk: int,
) -> jax.Array:
    """`attention_mask` `[B, tq, tk]` of queries `q0 .. q0 + tq` against keys `k0 .. k0 + tk`."""

    def take(x: jax.Array, at: jax.Array, n: int) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(x, at, n, axis=1)

    return attention_mask(
        take(segment_ids, q0, tq),
        take(positions, q0, tq),
        window,
        take(segment_ids, k0, tk),
        take(positions, k0, tk),
        offset=q0 - k0,
    )


def first_key_blocks(
    segment_ids_bt: jax.Array, positions_bt: jax.Array, window: int | None, block: int
) -> jax.Array:
    """`[T // block]` int32: for each query block, a key block at or before the first key block
    that any of its queries, in any row, may see (`attention_mask`); all earlier key blocks are
    invisible to the whole query block, so `blocked_attention` skips them.

    Per token it is exact: a padding query sees only itself; any other query sees its segment
    from that segment's first token (found by a stable sort, so ids need not be contiguous), and
    with a window, when the row's layout guarantees it (every segment one contiguous run whose
    positions rise by at least 1 a token: then `t - s <= pos[t] - pos[s] < window`), no key
    `window` or more tokens back. O(T log T): no `[T, T]` mask.
    """
    b, t = segment_ids_bt.shape
    idx = jnp.arange(t, dtype=jnp.int32)
    rows = jnp.arange(b)[:, None]
    order = jnp.argsort(segment_ids_bt, axis=1, stable=True)
    ids_sorted = jnp.take_along_axis(segment_ids_bt, order, axis=1)
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), ids_sorted[:, 1:] != ids_sorted[:, :-1]], axis=1
    )
    group_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    first_sorted = jnp.take_along_axis(order, group_start, axis=1).astype(jnp.int32)
    first_of_segment = jnp.zeros((b, t), jnp.int32).at[rows, order].set(first_sorted)
    pad = segment_ids_bt == 0
    lo = jnp.where(pad, idx, first_of_segment)
    if window is not None:
        same = segment_ids_bt[:, 1:] == segment_ids_bt[:, :-1]
        run_start = jax.lax.cummax(
            jnp.where(jnp.concatenate([jnp.ones((b, 1), bool), ~same], axis=1), idx, 0), axis=1
        )
        rising = positions_bt[:, 1:] - positions_bt[:, :-1] >= 1
        regular = jnp.all(~same | pad[:, 1:] | rising, axis=1) & jnp.all(
            pad | (first_of_segment == run_start), axis=1
        )
        lo = jnp.where(regular[:, None], jnp.maximum(lo, idx - (window - 1)), lo)
    return (lo // block).reshape(b, t // block, block).min(axis=(0, 2)).astype(jnp.int32)


# Most key (or query) blocks one product of `blocked_attention` spans. A run of key blocks is
# split into power-of-two chunks of at most this many blocks (5 blocks: 4 + 1), so the program
# holds one branch per chunk size (log2 of this + 1), whatever the row length.
ATTN_CHUNK_BLOCKS = 8


def _chunk_sizes(nb: int) -> list[int]:
    cap = min(ATTN_CHUNK_BLOCKS, nb)
    return [1 << e for e in range(cap.bit_length())]


def _largest_chunk(remaining: jax.Array, nb: int) -> jax.Array:
    """Index into `_chunk_sizes(nb)` of the largest chunk not over `remaining` blocks."""
    n = jnp.minimum(remaining, min(ATTN_CHUNK_BLOCKS, nb)).astype(jnp.int32)
    return 31 - jax.lax.clz(n)


def _raw_scores(q: jax.Array, k: jax.Array, scale: float, softcap: float | None) -> jax.Array:
    """float32 logits `[B, KV, G, Tq, Tk]`, soft-capped."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    return s


def _flash_forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    first: jax.Array,
    scale: float,
    softcap: float | None,
    window: int | None,
    block: int,
) -> tuple[jax.Array, jax.Array]:
    """Output `[B, T, KV, G, hd]` and per-query log-sum-exp `[B, KV, G, T]` (float32)."""
    b, t, kv, g, hd = q.shape
    nb = t // block
    sizes = _chunk_sizes(nb)

    def query_block(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        q0 = i * block
        qi = jax.lax.dynamic_slice_in_dim(q, q0, block, axis=1)

        def chunk(n: int, state: tuple) -> tuple:
            m, denom, acc, end, remaining = state
            k0 = end - n * block
            kc = jax.lax.dynamic_slice_in_dim(k, k0, n * block, axis=1)
            vc = jax.lax.dynamic_slice_in_dim(v, k0, n * block, axis=1)
            mask = _chunk_mask(segment_ids, positions, window, q0, block, k0, n * block)
            s = jnp.where(mask[:, None, None], _raw_scores(qi, kc, scale, softcap), -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum(
                "bkgts,bskd->bkgtd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32
            )
            acc = acc * corr[..., None] + pv
            return m_new, denom * corr + p.sum(axis=-1), acc, k0, remaining - n

        def body(state: tuple) -> tuple:
            which = _largest_chunk(state[4], nb)
            return jax.lax.switch(which, [functools.partial(chunk, n) for n in sizes], state)

        # Chunks run back from the diagonal, so the first holds each query's own key and the
        # running max is finite from then on.
        stats = jnp.zeros((b, kv, g, block), jnp.float32)
        state = (stats - jnp.inf, stats, jnp.zeros((b, kv, g, block, hd), jnp.float32))
        state = (*state, q0 + block, i + 1 - first[i])
        m, denom, acc, _, _ = jax.lax.while_loop(lambda s: s[4] > 0, body, state)
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(query_block, jnp.arange(nb))  # [nb, B, KV, G, block, (hd)]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, kv, g, hd)
    return out, lse.transpose(1, 2, 3, 0, 4).reshape(b, kv, g, t)


def _flash_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    first: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    scale: float,
    softcap: float | None,
    window: int | None,
    block: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of q, k, v, recomputing each visited block pair's probabilities from `lse`:
    dq one query block at a time over its key run (as the forward), dk/dv one key block at a
    time over the query blocks whose runs reach it (FlashAttention-2, arXiv 2307.08691)."""
    d_out = d_out.astype(q.dtype)
    # D = rowsum(dO * O) = sum_j P_ij dP_ij: the softmax backward's per-row term.
    delta = jnp.einsum(
        "btkgd,btkgd->bkgt", d_out, out.astype(q.dtype), preferred_element_type=jnp.float32
    )
    bw = _Backward(
        q, k, v, d_out, lse, delta, segment_ids, positions, scale, softcap, window, block
    )
    blocks = jnp.arange(q.shape[1] // block)
    dq = jax.lax.map(functools.partial(_dq_block, bw, first), blocks)
    dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(q.shape)
    # The query blocks that visit key block j: i >= j with first[i] <= j, all within j .. last[j]
    # (blocks between that skip j add exact zeros: their mask hides j).
    sees = (first[None, :] <= blocks[:, None]) & (blocks[None, :] >= blocks[:, None])
    last = jnp.max(jnp.where(sees, blocks[None, :], blocks[:, None]), axis=1)
    dk, dv = jax.lax.map(functools.partial(_dkv_block, bw, last), blocks)  # [nb, B, block, KV, hd]
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(k.shape)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(v.shape)
    return dq, dk, dv


@dataclasses.dataclass(frozen=True)
class _Backward:
    """What every block of `_flash_backward` reads: the inputs, the output's gradient, the
    forward's log-sum-exp, `delta`, the masks' inputs and the static settings."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    d_out: jax.Array
    lse: jax.Array
    delta: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    scale: float
    softcap: float | None
    window: int | None
    block: int

    def rows(self, x: jax.Array, at: jax.Array, n: int, axis: int = 1) -> jax.Array:
        return jax.lax.dynamic_slice_in_dim(x, at, n, axis=axis)

    def mask(self, q0: jax.Array, nq: int, k0: jax.Array, nk: int) -> jax.Array:
        return _chunk_mask(self.segment_ids, self.positions, self.window, q0, nq, k0, nk)

    def d_scores(self, qc, kc, vc, doc, lse_c, delta_c, mask) -> tuple[jax.Array, jax.Array]:
        """Probabilities and gradient of the raw (pre-cap, scaled) products `[B,KV,G,tq,tk]`."""
        s = _raw_scores(qc, kc, self.scale, self.softcap)
        p = jnp.where(mask[:, None, None], jnp.exp(s - lse_c[..., None]), 0.0)
        dp = jnp.einsum("btkgd,bskd->bkgts", doc, vc, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_c[..., None])
        if self.softcap is not None:
            ds = ds * (1.0 - jnp.square(s / self.softcap))  # d(c tanh(x / c))/dx = 1 - tanh^2
        return p, ds * self.scale

    def run_chunks(self, chunk: Any, state: tuple) -> tuple:
        """`chunk(n, state)` over the blocks `state[-1]` counts down, largest chunks first."""
        nb = self.q.shape[1] // self.block
        branches = [functools.partial(chunk, n) for n in _chunk_sizes(nb)]

        def body(st: tuple) -> tuple:
            return jax.lax.switch(_largest_chunk(st[-1], nb), branches, st)

        return jax.lax.while_loop(lambda st: st[-1] > 0, body, state)


def _dq_block(bw: _Backward, first: jax.Array, i: jax.Array) -> jax.Array:
    """dq of query block `i`, over its key run back from the diagonal."""
    blk = bw.block
    q0 = i * blk
    qi, doi = bw.rows(bw.q, q0, blk), bw.rows(bw.d_out, q0, blk)
    lse_i, delta_i = bw.rows(bw.lse, q0, blk, 3), bw.rows(bw.delta, q0, blk, 3)

    def chunk(n: int, state: tuple) -> tuple:
        dq, end, remaining = state
        k0 = end - n * blk
        kc, vc = bw.rows(bw.k, k0, n * blk), bw.rows(bw.v, k0, n * blk)
        _, ds = bw.d_scores(qi, kc, vc, doi, lse_i, delta_i, bw.mask(q0, blk, k0, n * blk))
        dq = dq + jnp.einsum(
            "bkgts,bskd->btkgd", ds.astype(bw.k.dtype), kc, preferred_element_type=jnp.float32
        )
        return dq, k0, remaining - n

    state = (jnp.zeros(qi.shape, jnp.float32), q0 + blk, i + 1 - first[i])
    return bw.run_chunks(chunk, state)[0].astype(bw.q.dtype)


def _dkv_block(bw: _Backward, last: jax.Array, j: jax.Array) -> tuple[jax.Array, jax.Array]:
    """dk and dv of key block `j`, over the query blocks j .. last[j]."""
    blk = bw.block
    k0 = j * blk
    kj, vj = bw.rows(bw.k, k0, blk), bw.rows(bw.v, k0, blk)

    def chunk(n: int, state: tuple) -> tuple:
        dk, dv, start, remaining = state
        q0 = start * blk
        qc, doc = bw.rows(bw.q, q0, n * blk), bw.rows(bw.d_out, q0, n * blk)
        lse_c, delta_c = bw.rows(bw.lse, q0, n * blk, 3), bw.rows(bw.delta, q0, n * blk, 3)
        p, ds = bw.d_scores(qc, kj, vj, doc, lse_c, delta_c, bw.mask(q0, n * blk, k0, blk))
        dt = bw.q.dtype
        dv = dv + jnp.einsum(
            "bkgts,btkgd->bskd", p.astype(dt), doc, preferred_element_type=jnp.float32
        )
        dk = dk + jnp.einsum(
            "bkgts,btkgd->bskd", ds.astype(dt), qc, preferred_element_type=jnp.float32
        )
        return dk, dv, start + n, remaining - n

    zeros = jnp.zeros(kj.shape, jnp.float32)
    dk, dv, _, _ = bw.run_chunks(chunk, (zeros, zeros, j, last[j] - j + 1))
    return dk.astype(bw.k.dtype), dv.astype(bw.v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, segment_ids, positions, first, scale, softcap, window, block):  # noqa: ANN001, ANN202
    return _flash_forward(q, k, v, segment_ids, positions, first, scale, softcap, window, block)[0]


def _flash_fwd(q, k, v, segment_ids, positions, first, scale, softcap, window, block):  # noqa: ANN001, ANN202
    out, lse = _flash_forward(q, k, v, segment_ids, positions, first, scale, softcap, window, block)
    # Named, so that `model.remat=attention` keeps them and the backward does not rerun the
    # forward kernel to get them back.
    out = checkpoint_name(out, attn_impl.ATTENTION_OUT)
    lse = checkpoint_name(lse, attn_impl.ATTENTION_RESIDUALS)
    return out, (q, k, v, segment_ids, positions, first, out, lse)


def _flash_bwd(scale, softcap, window, block, res, d_out):  # noqa: ANN001, ANN202
    q, k, v, segment_ids, positions, first, out, lse = res
    dq, dk, dv = _flash_backward(
        q, k, v, segment_ids, positions, first, out, lse, d_out, scale, softcap, window, block
    )
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids_bt: jax.Array,
    positions_bt: jax.Array,
    window: int | None,
    scale: float,
    softcap: float | None = None,
    *,
    block: int = ATTN_BLOCK,
) -> jax.Array:
    """The same result as `dense_attention` over `attention_mask(segment_ids_bt, positions_bt,
    window)` (keys = queries, `[B, T, ...]`, T a multiple of `block`), without a `[T, T]` mask
    or score matrix: a flash attention (online softmax, per-query log-sum-exp kept for a
    backward that recomputes the probabilities), in `block`-token query blocks.

    Every query sees a run of keys ending at itself (causal, within its packed example, within
    the sliding window), so the key blocks some query of block i may see, in any row, lie in
    `first_i .. i` (`first_key_blocks`); the rest are never computed. On packed rows of short
    examples that is most of the causal triangle. Each run is visited in power-of-two chunks of
    up to `ATTN_CHUNK_BLOCKS` key blocks (one softmax product per chunk, not per key block: few
    large products ran faster on CPU than many small ones), with loop bounds read at run time,
    so the program does not grow with the row length. Each block pair's mask is computed from
    the segment ids and positions when visited. Memory: O(T * block) per head, forward and
    backward.
    """
    first = first_key_blocks(segment_ids_bt, positions_bt, window, block)
    return _flash(q, k, v, segment_ids_bt, positions_bt, first, scale, softcap, window, block)


class Attention(nnx.Module):
    def __init__(self, arch: ArchConfig, run: RunConfig, layer: int, rngs: nnx.Rngs):
        d, h, k, hd = arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.resolved_head_dim
        pd = to_dtype(run.param_dtype)
        self.arch, self.run, self.window = arch, run, arch.layer_window(layer)
        self.q_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd)
        if arch.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), pd, "zeros")
            self.k_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros")
            self.v_bias = _param(rngs, (k, hd), ("kv_heads", "head_dim"), pd, "zeros")
        if arch.o_bias:
            self.o_bias = _param(rngs, (d,), ("embed",), pd, "zeros")

    def __call__(
        self,
        x_btd: jax.Array,
        segment_ids_bt: jax.Array,
        positions_bt: jax.Array,
        inv_freq: np.ndarray,
        cache: tuple[jax.Array, jax.Array, KVCache] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention output, and with `cache = (k_slots, v_slots, cache)` the updated slots."""
        arch, cd = self.arch, to_dtype(self.run.compute_dtype)

        def proj(name: str, bias_name: str) -> jax.Array:
            y = jnp.einsum("btd,dhk->bthk", x_btd, read_kernel(self, name, cd))
            y = with_lora(self, name, x_btd, y)
            if hasattr(self, bias_name):
                y = y + getattr(self, bias_name).get_value().astype(cd)
            return y

        q = apply_rope(proj("q_proj", "q_bias"), positions_bt, inv_freq)
        k = apply_rope(proj("k_proj", "k_bias"), positions_bt, inv_freq)
        v = proj("v_proj", "v_bias")
        b, t, h, hd = q.shape
        kv = arch.num_kv_heads
        new_slots = None
        blk, scale, cap = self.run.attn_block, arch.attention_scale, arch.attn_logit_softcap
        impl = "dense"
        if cache is None:
            impl = attn_impl.choose(self.run.attention, t, self.window, cap, blk, head_dim=hd)
            # Blocked and fused attention build each block's mask themselves: no [B, T, T] mask.
            mask = None
            if impl == "dense":
                mask = attention_mask(segment_ids_bt, positions_bt, self.window)
        else:
            k_slots, v_slots, c = cache
            at = (0, c.index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_slots, k.astype(k_slots.dtype), at)
            v = jax.lax.dynamic_update_slice(v_slots, v.astype(v_slots.dtype), at)
            new_slots = (k, v)
            k, v = k.astype(cd), v.astype(cd)
            mask = attention_mask(
                segment_ids_bt, positions_bt, self.window, c.segment_ids, c.positions, c.index
            )
        # Grouped-query attention: query head h reads kv head h // (H / KV), as HF's repeat_kv.
        q = q.reshape(b, t, kv, h // kv, hd)
        if impl == "dense":
            out = dense_attention(q, k, v, mask, scale, cap)
        elif impl == "blocked":
            out = blocked_attention(
                q, k, v, segment_ids_bt, positions_bt, self.window, scale, cap, block=blk
            )
        else:
            out = attn_impl.fused_attention(
                impl, q, k, v, segment_ids_bt, self.window, scale, cap, self.run.sharder
            )
        out = checkpoint_name(out, attn_impl.ATTENTION_OUT)
        return self._output(out.reshape(b, t, h, hd), cd), new_slots

    def _output(self, out_bthk: jax.Array, cd: Any) -> jax.Array:
        """The output projection of the heads' outputs: `o_proj`, its LoRA adapter, its bias."""
        y = jnp.einsum("bthk,hkd->btd", out_bthk, read_kernel(self, "o_proj", cd))
        y = with_lora(self, "o_proj", out_bthk, y)
        if self.arch.o_bias:
            y = y + self.o_bias.get_value().astype(cd)
        return y


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.gelu(x, approximate=False)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU for Llama-likes, GeGLU for Gemma."""

    def __init__(self, arch: ArchConfig, run: RunConfig, rngs: nnx.Rngs):
        d, f, pd = arch.hidden_size, arch.intermediate_size, to_dtype(run.param_dtype)
        self.arch, self.run = arch, run
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pd)
        if arch.mlp_bias:
            self.gate_bias = _param(rngs, (f,), ("mlp",), pd, "zeros")
            self.up_bias = _param(rngs, (f,), ("mlp",), pd, "zeros")
            self.down_bias = _param(rngs, (d,), ("embed",), pd, "zeros")

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        cd = to_dtype(self.run.compute_dtype)
        gate = with_lora(self, "gate_proj", x_btd, x_btd @ read_kernel(self, "gate_proj", cd))
        up = with_lora(self, "up_proj", x_btd, x_btd @ read_kernel(self, "up_proj", cd))
        if self.arch.mlp_bias:
            gate = gate + self.gate_bias.get_value().astype(cd)
            up = up + self.up_bias.get_value().astype(cd)
        hidden = self.run.sharder.constrain(
            _activation(self.arch.activation, gate) * up, ("batch", "seq", "mlp")
        )
        y = with_lora(self, "down_proj", hidden, hidden @ read_kernel(self, "down_proj", cd))
        if self.arch.mlp_bias:
            y = y + self.down_bias.get_value().astype(cd)
        return y


class Block(nnx.Module):
    def __init__(self, arch: ArchConfig, run: RunConfig, layer: int, rngs: nnx.Rngs):
        pd = to_dtype(run.param_dtype)
        norm = lambda: RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.is_gemma, pd, rngs)  # noqa: E731
        self.arch, self.run = arch, run
        self.input_norm = norm()
        self.attn = Attention(arch, run, layer, rngs)
        self.post_attn_norm = norm()  # Llama-likes: the pre-MLP norm; Gemma2: after attention
        if arch.family == "gemma2":
            self.pre_mlp_norm = norm()
            self.post_mlp_norm = norm()
        self.mlp = MLP(arch, run, rngs)

    def __call__(
        self,
        x: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        inv_freq: np.ndarray,
        cache: tuple[jax.Array, jax.Array, KVCache] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        h, slots = self.attn(self.input_norm(x), segment_ids, positions, inv_freq, cache)
        if self.arch.family == "gemma2":
            x = x + self.post_attn_norm(h)
            return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x))), slots
        x = x + h
        return x + self.mlp(self.post_attn_norm(x)), slots


def layer_period(parts: list[tuple[nnx.GraphDef, nnx.State]]) -> int:
    """The smallest `p` such that the `n // p >= 2` whole groups of `p` consecutive layers
    repeat the first one: the same graph definitions (structure and static attributes) and
    parameter shapes at each position. The `n % p` layers after the last whole group may differ.
    `n` (one group: nothing repeats) if there is no such `p`."""

    def sig(part: tuple[nnx.GraphDef, nnx.State]) -> Any:
        leaves, tree = jax.tree.flatten(part[1])
        return part[0], tree, tuple((v.shape, v.dtype) for v in leaves)

    sigs = [sig(part) for part in parts]
    n = len(sigs)
    for p in range(1, n // 2 + 1):
        whole = n // p * p
        if all(sigs[i] == sigs[i % p] for i in range(whole)):
            return p
    return n


class Decoder(nnx.Module):
    """Embeddings, `num_layers` blocks, final norm, LM head (tied or untied).

    The blocks are stored one per layer (`layers.{i}`: the paths of the HF name table, orbax
    checkpoints, optimizer states and sharding rules) whether or not `run.scan_layers` runs them
    as a scan.
    """

    def __init__(
        self, arch: ArchConfig, run: RunConfig | None = None, *, rngs: nnx.Rngs | None = None
    ):
        run = run or RunConfig()
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        pd = to_dtype(run.param_dtype)
        self.arch, self.run = arch, run
        self.embed = _param(rngs, (arch.vocab_size, arch.hidden_size), ("vocab", "embed"), pd)
        self.layers = nnx.List([Block(arch, run, i, rngs) for i in range(arch.num_layers)])
        self.final_norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, arch.is_gemma, pd, rngs)
        if not arch.tie_embeddings:
            self.lm_head = _param(rngs, (arch.hidden_size, arch.vocab_size), ("embed", "vocab"), pd)

    def hidden_states(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> Any:
        """Final-norm hidden states `[B, T, embed]` in the compute dtype.

        With a `cache`, the tokens are appended at `cache.index` (attending to every cached slot
        of their segment) and `(hidden, updated cache)` is returned: incremental decoding.
        `run.scan_layers` scans the layers (`_scanned_layers`) only without a cache: the cached
        path (generation) keeps the Python loop, its per-layer cache slots being separate arrays.
        """
        arch, run = self.arch, self.run
        cd = to_dtype(run.compute_dtype)
        b, t = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = jnp.take(self.embed.get_value(), input_ids, axis=0).astype(cd)
        if arch.is_gemma:
            # Gemma scales embeddings by sqrt(d), rounded to the activation dtype as HF does.
            x = x * jnp.asarray(arch.hidden_size**0.5, dtype=cd)
        x = run.sharder.constrain(x, ("batch", "seq", "embed"))
        inv_freq = rope_inv_freq(arch)  # a trace-time constant
        if cache is not None:
            at = (0, cache.index)
            cache = dataclasses.replace(
                cache,
                segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, at),
                positions=jax.lax.dynamic_update_slice(cache.positions, positions, at),
            )
        if cache is None and run.scan_layers:
            return self.final_norm(self._scanned_layers(x, segment_ids, positions, inv_freq))
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i], cache)
            if run.remat != "none" and cache is None:
                x, _ = nnx.remat(
                    lambda blk, x_: blk(x_, segment_ids, positions, inv_freq),
                    policy=attn_impl.remat_policy(run.remat),
                )(block, x)
            else:
                x, slots = block(x, segment_ids, positions, inv_freq, layer_cache)
                if slots is not None:
                    new_k.append(slots[0])
                    new_v.append(slots[1])
            x = run.sharder.constrain(x, ("batch", "seq", "embed"))
        h = self.final_norm(x)
        if cache is None:
            return h
        return h, dataclasses.replace(
            cache, k=tuple(new_k), v=tuple(new_v), index=cache.index + input_ids.shape[1]
        )

    def _scanned_layers(
        self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array, inv_freq: np.ndarray
    ) -> jax.Array:
        """The layer stack (no cache) as a `lax.scan` over groups of `p` consecutive layers.

        Each block is split into its graph definition (structure and static attributes, such as
        `Attention.window`) and its parameters. `p` is the smallest period of the definitions
        (`layer_period`: 1 for uniform stacks, 2 for Gemma2's alternating sliding/global
        layers); the parameters of the `n // p` whole groups are stacked per position in the
        group and scanned over, the group body running its `p` blocks unrolled; the remaining
        `n % p` layers run unrolled after it. With no repetition (`p = n`) nothing is scanned.
        Gradients flow back through the stacking into each layer's own parameters, so the
        stored layout, checkpoints and optimizer state are those of the unrolled loop.
        """
        run = self.run
        parts = [nnx.split(block) for block in self.layers]
        p = layer_period(parts)
        groups = len(parts) // p if p else 0  # no layers: p = 0

        def layer(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
            x, _ = nnx.merge(graphdef, state)(x, segment_ids, positions, inv_freq)
            return run.sharder.constrain(x, ("batch", "seq", "embed"))

        # Checkpoint each block (not the whole group body): what is saved for the backward pass
        # is each layer's input (and what `run.remat`'s policy names), as with the unrolled
        # loop's `nnx.remat`.
        in_scan, unrolled = layer, layer
        if run.remat != "none":
            policy = attn_impl.remat_policy(run.remat)
            in_scan = jax.checkpoint(layer, prevent_cse=False, static_argnums=0, policy=policy)
            unrolled = jax.checkpoint(layer, static_argnums=0, policy=policy)

        if groups >= 2:

            def stack(*states: nnx.State) -> nnx.State:
                def one(*vs: nnx.Variable) -> nnx.Variable:
                    value = jnp.stack([v.get_value() for v in vs])
                    axes = vs[0].get_metadata().get("logical_axes")
                    if axes is not None:
                        value = run.sharder.constrain(value, (None, *axes))
                    return vs[0].replace(value)

                is_var = lambda v: isinstance(v, nnx.Variable)  # noqa: E731
                return jax.tree.map(one, *states, is_leaf=is_var)

            stacked = tuple(stack(*(parts[g * p + j][1] for g in range(groups))) for j in range(p))
            defs = tuple(parts[j][0] for j in range(p))

            def body(x: jax.Array, group: tuple[nnx.State, ...]) -> tuple[jax.Array, None]:
                for graphdef, state in zip(defs, group):
                    x = in_scan(graphdef, state, x)
                return x, None

            x, _ = jax.lax.scan(body, x, stacked)
        else:
            groups, p = 0, 1
        for graphdef, state in parts[groups * p :]:
            x = unrolled(graphdef, state, x)
        return x

    def logits(
        self, hidden_btd: jax.Array, vocab: tuple[jax.Array | int, int] | None = None
    ) -> jax.Array:
        """LM-head logits (float32) for any `[..., embed]` slice of hidden states; with
        `vocab = (start, size)`, only those of vocabulary entries `start .. start + size - 1`.

        Kept separate so that losses can apply the head chunk by chunk (and vocabulary block by
        block) and never hold the full `[batch, seq, vocab]` array.
        """
        cd = to_dtype(self.run.compute_dtype)
        if self.arch.tie_embeddings:
            w = self.embed.get_value()  # [vocab, embed]
            if vocab is not None:
                w = jax.lax.dynamic_slice_in_dim(w, vocab[0], vocab[1], axis=0)
            out = jnp.einsum("...d,vd->...v", hidden_btd, w.astype(cd))
        else:
            w = self.lm_head.get_value()  # [embed, vocab]
            if vocab is not None:
                w = jax.lax.dynamic_slice_in_dim(w, vocab[0], vocab[1], axis=1)
            out = hidden_btd @ w.astype(cd)
        out = out.astype(jnp.float32)
        if self.arch.final_logit_softcap is not None:
            cap = self.arch.final_logit_softcap
            out = jnp.tanh(out / cap) * cap
        return out

    def vocab_block(self, block: int) -> int:
        """The vocabulary block for the losses' blocked log-sum-exp (`losses.VOCAB_BLOCK`), or 0
        (all of it at once) where the vocabulary is split over devices: a block would then sit
        on one device at a time while the others wait."""
        return 0 if self.run.sharder.is_split("vocab", self.arch.vocab_size) else block

    def __call__(
        self,
        input_ids: jax.Array,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits `[B, T, vocab]`, float32."""
        return self.logits(self.hidden_states(input_ids, segment_ids, positions))
