"""`davir plan`: will a config fit, and how long is a step, before anything is allocated?

From `jax.eval_shape` of the model (no memory) and the rules table, for the mesh of the config on
its chip (`mesh.chip`, or `--chip`): per-device memory of parameters, optimizer state, gradients
and activations against the chip's memory, the step's FLOPs and its ideal time at 50% MFU.

Activation memory is an estimate, not a measurement (the compiled program decides): per token and
layer, the tensors a backward pass keeps (Korthikanti et al. 2022, arXiv 2205.05198, Sec. 4,
adapted to gated MLPs, grouped-query attention and this code's float32 attention scores):
`c * (6 d + 2 (H + 2 KV) hd + 3 f) + 8 H T` bytes (c: compute-dtype bytes; `8 H T`: float32 scores
and probabilities); with `model.remat` only the layer inputs (`c d`) stay, plus one layer's full
set while it is recomputed. Scoring keeps one layer's forward tensors at a time. Blocked and fused
attention (`model.attention`, resolved for the chip's platform) hold the scores of one key block
(`T` -> the block), forward and backward. The LM head adds
its `[rows, chunk, vocab]` float32 logits (three copies in training: logits, softmax, gradient).
A plan fits when the total stays under 90% of the chip's memory (headroom for XLA's buffers).
With `model.lora`, the parameters are the frozen base plus the adapters (`adapters`), and the
optimizer state and gradients are the adapters' only.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx

from davir_jax.core.losses import VOCAB_BLOCK
from davir_jax.core.sharding import (
    TENSOR,
    Sharder,
    data_parallel_size,
    logical_to_spec,
    resolve_axis_sizes,
)
from davir_jax.models import attention as attn_impl
from davir_jax.models.config import LORA_PROJECTIONS
from davir_jax.models.decoder import RunConfig
from davir_jax.models.loading import load_arch
from davir_jax.models.lora import DropoutSalt, abstract_lora_model
from davir_jax.models.weights import abstract_model, iter_params

# Memory (GiB) and dense bf16 peak (FLOP/s) per device, from the vendors' spec sheets.
CHIPS: dict[str, tuple[float, float]] = {
    "v4": (32, 275e12),
    "v5e": (16, 197e12),
    "v5p": (95, 459e12),
    "v6e": (32, 918e12),
    "a100": (80, 312e12),
    "h100": (80, 989e12),
    "h200": (141, 989e12),
}
HEADROOM = 0.9
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class _Mesh:
    """Just the axis sizes: planning needs no devices."""

    def __init__(self, shape: dict[str, int]) -> None:
        self.shape = shape


def mesh_shape(cfg: Any, devices: int | None) -> dict[str, int]:
    """The mesh axis sizes for `devices` devices (None: the fixed axes alone; a -1 axis is 1)."""
    return resolve_axis_sizes(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)


@functools.lru_cache(maxsize=16)
def _source_arch(source: str) -> Any:

    return load_arch(source)  # a GGUF header parse takes seconds: plan once per source


def _arch(cfg: Any) -> Any:
    return cfg.model.arch if cfg.model.arch is not None else _source_arch(cfg.model.source)


@functools.lru_cache(maxsize=16)
def _param_table(arch: Any, dtype: str) -> tuple[tuple[tuple[int, ...], Any], ...]:
    """(shape, logical axes) of every parameter, from `jax.eval_shape` (nothing allocated)."""

    _, abs_state = abstract_model(arch, RunConfig(param_dtype=dtype))
    return tuple(
        (tuple(v.get_value().shape), v.get_metadata().get("logical_axes"))
        for _, v in iter_params(abs_state)
    )


@functools.lru_cache(maxsize=16)
def _adapter_table(arch: Any, dtype: str, lora: Any) -> tuple[tuple[tuple[int, ...], Any], ...]:
    """(shape, logical axes) of every LoRA adapter matrix `lora` puts on `arch` (abstract)."""

    _, abs_state = abstract_lora_model(arch, RunConfig(param_dtype=dtype), lora)
    state = abs_state.filter(nnx.LoRAParam)
    return tuple(
        (tuple(v.get_value().shape), v.get_metadata().get("logical_axes"))
        for _, v in iter_params(state)
    )


@functools.lru_cache(maxsize=16)
def _quantized_base_table(arch: Any, dtype: str, lora: Any) -> tuple[tuple[Any, ...], ...]:
    """(shape, logical axes, bytes per element) of every frozen array of a LoRA model whose base
    is quantized (`lora.quantize_base`): NF4 codes and scales for the projections, the rest as
    loaded."""
    _, abs_state = abstract_lora_model(arch, RunConfig(param_dtype=dtype), lora)
    out = []
    for _, v in nnx.to_flat_state(abs_state):
        if isinstance(v, (nnx.LoRAParam, DropoutSalt)):
            continue
        value = v.get_value()
        axes = v.get_metadata().get("logical_axes")
        out.append((tuple(value.shape), axes, jnp.dtype(value.dtype).itemsize))
    return tuple(out)


def _base_params(arch: Any) -> int:
    """The parameter count of the base (what it was before quantization)."""
    return sum(math.prod(shape) for shape, _ in _param_table(arch, "float32"))


def per_device_layer_kernels(arch: Any, dtype: str, mesh: _Mesh) -> int:
    """Bytes of one device's shards of one layer's projection kernels in `dtype`: what a 4-bit
    base holds dequantized at a time (the layer being computed)."""
    _, abs_state = abstract_model(arch, RunConfig(param_dtype=dtype))
    table = tuple(
        (tuple(v.get_value().shape), v.get_metadata().get("logical_axes"), _BYTES[dtype])
        for path, v in nnx.to_flat_state(abs_state)
        if path[:2] == ("layers", 0) and path[-1] in LORA_PROJECTIONS
    )
    return _sharded_size(table, mesh)[1]


def per_device_params(arch: Any, dtype: str, mesh: _Mesh, lora: Any = None) -> tuple[int, int]:
    """(parameter count, bytes of one device's shards) from the abstract model; with `lora`
    (a `LoraConfig`), of its adapters instead."""
    table = _param_table(arch, dtype) if lora is None else _adapter_table(arch, dtype, lora)
    return _sharded_size(tuple((s, a, _BYTES[dtype]) for s, a in table), mesh)


def per_device_base(arch: Any, dtype: str, mesh: _Mesh, lora: Any) -> tuple[int, int]:
    """(parameter count, bytes of one device's shards) of a LoRA run's frozen base: as loaded,
    or with `lora.quantize_base` its NF4 codes and scales (4.5 bits per projection weight)."""
    if lora is None or lora.quantize_base is None:
        return per_device_params(arch, dtype, mesh)
    _, local = _sharded_size(_quantized_base_table(arch, dtype, lora), mesh)
    return _base_params(arch), local


def _sharded_size(table: tuple[tuple[Any, ...], ...], mesh: _Mesh) -> tuple[int, int]:
    """(element count, bytes of one device's shards) of (shape, logical axes, itemsize)s."""
    count, local = 0, 0
    for shape, axes, itemsize in table:
        spec = logical_to_spec(axes, shape, mesh)
        shard = list(shape)
        for i, part in enumerate(spec):
            names = (part,) if isinstance(part, str) else (part or ())
            shard[i] = shape[i] // math.prod(mesh.shape[n] for n in names)
        count += math.prod(shape)
        local += math.prod(shard) * itemsize
    return count, local


def step_shape(cfg: Any, job: str) -> tuple[Any, int, int, int]:
    """(architecture, row length, global rows, segments per row) of one micro-batch of `job`: a
    DPO row holds whole pairs (both responses, two segments each)."""
    d = cfg.data
    seq = d.packed_row_len if d.pack else d.max_len
    segments = d.max_segments if d.pack else 1
    if job == "dpo":
        seq, segments = max(d.packed_row_len, 2 * d.max_len), 2 * segments
    return _arch(cfg), seq, d.batch_rows, segments


def plan(cfg: Any, job: str = "sft", chip: str | None = None, devices: int | None = None) -> dict:
    """The plan of `job` (sft, dpo or score) for `cfg`; see the module docstring."""
    if job not in ("sft", "dpo", "score"):
        raise ValueError(f"job {job!r} is not sft, dpo or score")
    chip = (chip or cfg.mesh.chip or "").lower() or None
    if chip is not None and chip not in CHIPS:
        raise ValueError(f"chip {chip!r} is not one of {', '.join(CHIPS)}")
    shape = mesh_shape(cfg, devices)
    mesh = _Mesh(shape)
    n_dev = math.prod(shape.values())
    arch, seq, _, _ = step_shape(cfg, job)
    m, d = cfg.model, cfg.data
    pdt, cdt = m.dtype, m.compute_dtype or m.dtype
    n_params, param_bytes = per_device_base(arch, pdt, mesh, m.lora)
    # LoRA: the base stays as loaded (frozen); the adapters are what trains.
    n_adapter, adapter_bytes = 0, 0
    if m.lora is not None:
        n_adapter, adapter_bytes = per_device_params(arch, pdt, mesh, m.lora)
    rows_dev = max(d.batch_rows // data_parallel_size(mesh), 1)
    out: dict[str, Any] = {
        "job": job,
        "chip": chip,
        "mesh": shape,
        "devices": n_dev,
        "params": n_params,
        "param_dtype": pdt,
        "compute_dtype": cdt,
        "rows_per_device": rows_dev,
        "seq": seq,
    }
    if m.lora is not None:
        out["adapter_params"] = n_adapter
    # Models loaded as they are (a scoring job's, an in-step DPO reference): never quantized.
    full_bytes = per_device_params(arch, pdt, mesh)[1]
    sizes = (param_bytes, adapter_bytes, full_bytes)
    mem, flops = _costs(cfg, job, arch, mesh, seq, rows_dev, sizes, chip)
    total = sum(mem.values())
    out["memory_bytes"] = {k: int(v) for k, v in mem.items()}
    out["memory_total_bytes"] = int(total)
    out["step_flops"] = float(flops)
    out["tokens_per_step"] = d.batch_rows * seq if job == "score" else _step_tokens(cfg, seq)
    if chip is not None:
        gib, peak = CHIPS[chip]
        out["chip_memory_bytes"] = int(gib * 2**30)
        out["fits"] = bool(total <= HEADROOM * gib * 2**30)
        out["ideal_step_s_at_50pct_mfu"] = flops / (0.5 * peak * n_dev)
    else:
        out["fits"] = None
    return out


def _costs(
    cfg: Any,
    job: str,
    arch: Any,
    mesh: Any,
    seq: int,
    rows_dev: int,
    sizes: tuple[int, int, int],
    chip: str | None,
) -> tuple[dict[str, float], float]:
    """(memory per device by part, FLOPs of one step) of `job` with rows of `seq` tokens;
    `sizes`: per-device bytes of the model's parameters (a 4-bit base: as stored), of its LoRA
    adapters (0: none) and of the parameters as loaded."""
    m, d = cfg.model, cfg.data
    param_bytes, adapter_bytes, full_bytes = sizes
    c, tp = _BYTES[m.compute_dtype or m.dtype], mesh.shape[TENSOR]
    tok_dev = rows_dev * seq
    L, D, F = arch.num_layers, arch.hidden_size, arch.intermediate_size
    H, KV, hd, V = arch.num_heads, arch.num_kv_heads, arch.resolved_head_dim, arch.vocab_size
    heads_dev = max(H // tp, 1)
    per_tok_layer = c * (6 * D + 2 * (H + 2 * KV) * hd / tp + 3 * F / tp)
    # float32 scores and probabilities, per token
    scores = 8 * heads_dev * _score_keys(cfg.model, arch, seq, chip)
    chunk = cfg.train.chunk if job != "score" else cfg.scoring.chunk
    # The head's log-sum-exp holds one vocabulary block, unless the rules table splits the
    # vocabulary over devices (as `Decoder.vocab_block` decides for the real model).
    split = Sharder(mesh).is_split("vocab", V)  # type: ignore[arg-type]  # sizes suffice
    logits = rows_dev * min(chunk, seq) * (V if split else min(V, VOCAB_BLOCK)) * 4
    mem = {"params": param_bytes}
    if job == "score":
        mem["params"] = full_bytes * (2 if cfg.scoring.resident == "both" else 1)
        mem["activations"] = tok_dev * (c * (4 * D + 2 * F / tp) + scores)
        mem["logits"] = logits
        return mem, 2 * forward_flops(arch, seq) * d.batch_rows * seq  # base and reference
    in_step_ref = job == "dpo" and cfg.dpo.reference_in_step
    mem.update(_state_memory(m, param_bytes, adapter_bytes))
    mem.update(_dequantized_kernels(m, arch, mesh))
    if in_step_ref:
        mem["reference"] = full_bytes
    if m.remat != "none":
        # Each layer keeps its input and what the remat policy saves (`remat_policy`).
        kept = {
            "full": 0,
            "attention": c * H * hd / tp,
            "dots": c * (2 * D + (H + 2 * KV) * hd / tp + 2 * F / tp),
        }[m.remat]
        mem["activations"] = tok_dev * (L * (c * D + kept) + per_tok_layer + scores)
    else:
        mem["activations"] = tok_dev * L * (per_tok_layer + scores)
    mem["logits"] = 3 * logits
    tokens = _step_tokens(cfg, seq)
    # Forward + backward: the activations' gradients (1x) and the weights' (1x); LoRA computes
    # no weight gradient for the base (its adapters' are negligible), so 2x.
    flops = (3 if m.lora is None else 2) * forward_flops(arch, seq) * tokens
    if in_step_ref:
        flops += forward_flops(arch, seq) * tokens
    return mem, flops


def _dequantized_kernels(m: Any, arch: Any, mesh: Any) -> dict[str, float]:
    """A 4-bit base's dequantized kernels: each layer dequantizes its own where it reads them;
    the backward pass keeps them for every layer unless remat recomputes them (then what a
    layer saves is its input)."""
    if m.lora is None or m.lora.quantize_base is None:
        return {}
    layer = per_device_layer_kernels(arch, m.compute_dtype or m.dtype, mesh)
    return {"dequantized_kernels": layer * (arch.num_layers if m.remat == "none" else 1)}


def _state_memory(m: Any, param_bytes: int, adapter_bytes: int) -> dict[str, float]:
    """Per-device bytes of a training step's state besides the parameters: what trains (every
    parameter, or with LoRA the adapters alone: the base is an input) has AdamW moments and
    gradients; the compute-dtype copy covers everything the forward pass reads."""
    c, p = _BYTES[m.compute_dtype or m.dtype], _BYTES[m.dtype]
    trained = param_bytes if m.lora is None else adapter_bytes
    mem = {} if m.lora is None else {"adapters": adapter_bytes}
    mem["optimizer"] = 2 * trained  # AdamW moments in the parameter dtype
    # A micro-batch's gradients (the layers' in the compute dtype) + the float32 accumulator.
    mem["gradients"] = trained * c // p + trained * 4 // p
    if m.lora is not None and m.lora.quantize_base is not None:
        # NF4 codes are not cast; one layer's kernels are dequantized at a time (`_costs`).
        if c != p:
            mem["compute_copy"] = adapter_bytes * c // p
    elif c != p:  # the layers' compute-dtype copy, cast once per step (cast_for_compute)
        mem["compute_copy"] = (param_bytes + adapter_bytes) * c // p
    return mem


def _score_keys(m: Any, arch: Any, seq: int, chip: str | None) -> int:
    """How many keys' scores a query holds at once in the widest layer: `seq` where a layer runs
    `dense`, else the block of its blocked or fused attention on `chip`'s platform (without a
    chip: a fused kernel named in the config on its own platform, anything else on CPU)."""
    if chip is None:
        platform = attn_impl.FUSED.get(m.attention, "cpu")
    else:
        platform = "gpu" if chip in ("a100", "h100", "h200") else "tpu"
    widest = 0
    for window in {arch.layer_window(i) for i in range(arch.num_layers)}:
        impl = attn_impl.choose(
            m.attention,
            seq,
            window,
            arch.attn_logit_softcap,
            m.attn_block,
            platform,
            arch.resolved_head_dim,
        )
        if impl == "dense":
            return seq
        block = m.attn_block if impl == "blocked" else attn_impl.kernel_block(impl, seq)
        widest = max(widest, block or seq)
    return widest or seq


def _step_tokens(cfg: Any, seq: int) -> int:
    """Token positions one optimizer step computes, padding included. With a batch stated in
    examples (or tokens) the micro-batch count depends on the data; this is its upper bound:
    every example in a row of its own (`train.plan_steps` packs them, so a step uses fewer)."""
    d, t = cfg.data, cfg.train
    if t.batch_examples is not None:
        rows = t.batch_examples
    elif t.batch_tokens is not None:
        rows = -(-t.batch_tokens // seq) + 1  # whole examples may overshoot by one row
    else:
        return d.batch_rows * seq * t.grad_accum
    return -(-rows // d.batch_rows) * d.batch_rows * seq


def forward_flops(arch: Any, seq: int) -> float:
    """Forward FLOPs per token: 2 x (non-embedding + LM head) parameters + causal attention."""
    n = arch.num_params()
    embed = arch.vocab_size * arch.hidden_size
    dense = n - embed * (1 if arch.tie_embeddings else 2)
    return 2 * (dense + embed) + 2 * arch.num_layers * arch.num_heads * arch.resolved_head_dim * seq


def render(p: dict[str, Any]) -> str:
    gib = 2**30
    lines = [
        f"{p['job']} on {p['devices']} x {p['chip'] or 'unspecified chip'}, mesh {p['mesh']}, "
        f"{p['params']:,} parameters ({p['param_dtype']}, compute {p['compute_dtype']}), "
        f"{p['rows_per_device']} rows x {p['seq']} tokens per device",
        "per-device memory:",
    ]
    w = max(12, *map(len, p["memory_bytes"]))  # the name column fits the longest part
    for k, v in p["memory_bytes"].items():
        lines.append(f"  {k:{w}s} {v / gib:9.2f} GiB")
    lines.append(f"  {'total':{w}s} {p['memory_total_bytes'] / gib:9.2f} GiB")
    if p.get("chip_memory_bytes"):
        cap = p["chip_memory_bytes"] / gib
        verdict = "fits" if p["fits"] else "DOES NOT FIT"
        lines.append(f"  {'chip memory':{w}s} {cap:9.2f} GiB -> {verdict} (limit {HEADROOM:.0%})")
        lines.append(
            f"step: {p['step_flops'] / 1e12:,.1f} TFLOP for {p['tokens_per_step']:,} tokens; "
            f"ideal {p['ideal_step_s_at_50pct_mfu']:.3f} s at 50% MFU"
        )
    else:
        lines.append(f"step: {p['step_flops'] / 1e12:,.1f} TFLOP (no chip named: --chip)")
    return "\n".join(lines)


__all__ = ["CHIPS", "forward_flops", "plan", "render"]
