"""One decoder-only transformer, configured per family (Llama, Mistral, Qwen2, Gemma, Gemma2).

Parameters carry logical axis names only (`out_sharding` metadata); `davir_jax.sharding` maps them
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

from davir_jax.models.arch import ArchConfig, llama3_inv_freq_scale
from davir_jax.sharding import Sharder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def to_dtype(name: str | Any) -> Any:
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
        return DTYPES[name]
    return name


# Default query/key block (tokens) of `blocked_attention`: `RunConfig` and `model.attn_block`.
ATTN_BLOCK = 64


def uses_blocked_attention(block: int, seq: int) -> bool:
    """Whether attention over a `seq`-token sequence (no cache) runs in `block`-token blocks."""
    return 0 < block < seq and seq % block == 0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How the decoder runs, as opposed to what it is (`ArchConfig`)."""

    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    sharder: Sharder = dataclasses.field(default_factory=Sharder)
    # Query/key block of attention over a whole sequence (no cache): key blocks that no query of
    # the block may see (causal, another packed example, outside the window) are skipped.
    # 0: one dense [T, T] score matrix.
    attn_block: int = ATTN_BLOCK
    # Run the layer stack as one `lax.scan` over groups of identical layers (`Decoder`), so the
    # compiled program holds one group body whatever the depth. The parameters stay stored
    # per layer (`layers.{i}`); they are stacked at trace time.
    scan_layers: bool = False


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


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    scale: float,
    softcap: float | None = None,
    *,
    block: int = 64,
) -> jax.Array:
    """The same result as `dense_attention` (keys = queries, `[B, T, ...]`), one query block at
    a time, over only the keys that block may see.

    Every query sees one contiguous run of keys that ends at itself (causal, within its packed
    example, within the sliding window), so the key blocks that some query of block i may see,
    in any row of the batch, are the contiguous blocks `first_i .. i`. A `lax.switch` on
    `first_i` (read from the mask) runs one plain softmax over exactly those keys: on packed rows
    of short examples most of the causal triangle is never computed, which the dense `[T, T]`
    form cannot avoid. One pass per query block, with no running max to rescale, measured
    faster on CPU than visiting the key blocks one by one with an online softmax.
    """
    b, t = q.shape[:2]
    nb = t // block
    needed = mask.reshape(b, nb, block, nb, block).any(axis=(0, 2, 4))  # [nb, nb], replicated
    outs = []
    for i in range(nb):
        end = (i + 1) * block
        qi, mi = q[:, i * block : end], mask[:, i * block : end]

        def from_block(first: int, qi: jax.Array = qi, mi: jax.Array = mi, end: int = end) -> Any:
            keys = slice(first * block, end)
            return lambda: _softmax_values(
                qi, k[:, keys], v[:, keys], mi[:, :, keys], scale, softcap
            )  # [B, KV, G, block, hd]

        # The diagonal block is always visible (each token sees itself), so argmax finds the
        # first visible block of the run.
        first = jnp.argmax(needed[i, : i + 1])
        outs.append(jax.lax.switch(first, [from_block(f) for f in range(i + 1)]))
    return jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4)


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

        def proj(w: nnx.Param, bias_name: str) -> jax.Array:
            y = jnp.einsum("btd,dhk->bthk", x_btd, w.get_value().astype(cd))
            if hasattr(self, bias_name):
                y = y + getattr(self, bias_name).get_value().astype(cd)
            return y

        q = apply_rope(proj(self.q_proj, "q_bias"), positions_bt, inv_freq)
        k = apply_rope(proj(self.k_proj, "k_bias"), positions_bt, inv_freq)
        v = proj(self.v_proj, "v_bias")
        b, t, h, hd = q.shape
        kv = arch.num_kv_heads
        new_slots = None
        if cache is None:
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
        blk = self.run.attn_block
        attend = dense_attention
        if cache is None and uses_blocked_attention(blk, t):
            attend = functools.partial(blocked_attention, block=blk)
        out = attend(q, k, v, mask, arch.attention_scale, arch.attn_logit_softcap)
        out = out.reshape(b, t, h, hd)
        y = jnp.einsum("bthk,hkd->btd", out, self.o_proj.get_value().astype(cd))
        if arch.o_bias:
            y = y + self.o_bias.get_value().astype(cd)
        return y, new_slots


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
        gate = x_btd @ self.gate_proj.get_value().astype(cd)
        up = x_btd @ self.up_proj.get_value().astype(cd)
        if self.arch.mlp_bias:
            gate = gate + self.gate_bias.get_value().astype(cd)
            up = up + self.up_bias.get_value().astype(cd)
        hidden = self.run.sharder.constrain(
            _activation(self.arch.activation, gate) * up, ("batch", "seq", "mlp")
        )
        y = hidden @ self.down_proj.get_value().astype(cd)
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
            if run.remat and cache is None:
                x, _ = nnx.remat(lambda blk, x_: blk(x_, segment_ids, positions, inv_freq))(
                    block, x
                )
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
        # is each layer's input, as with the unrolled loop's `nnx.remat`.
        in_scan = jax.checkpoint(layer, prevent_cse=False, static_argnums=0) if run.remat else layer
        unrolled = jax.checkpoint(layer, static_argnums=0) if run.remat else layer

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
