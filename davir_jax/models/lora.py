"""LoRA adapters on the decoder's projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv 2106.09685), laid out as Hugging Face PEFT stores them.

A targeted projection `W` (stored input-major, `[*in, *out]`: q `[embed, heads, head_dim]`, o
`[heads, head_dim, embed]`, MLP `[embed, mlp]`) gains `A [*in, r]` and `B [r, *out]`, and its
output becomes `x W + (alpha / r) (x A) B` (the paper's Eq. 3, PEFT's `lora_alpha / r`). As in
PEFT, `A` starts kaiming-uniform (bound `1 / sqrt(fan_in)`) and `B` at zero, so an adapted model
equals its base until trained. Both are `nnx.LoRAParam` variables, so `nnx.split(model,
nnx.LoRAParam, ...)` separates them from the base weights (the trainer trains only them), and
they carry logical axes (`A`: W's input axes + `lora_rank`, `B`: `lora_rank` + W's output axes),
so the rules table in `core.sharding` shards them with their projection. An adapter is an
attribute `<proj>_lora` of the projection's module (`layers.3.attn.q_proj_lora.a`), uniform
over layers, so `scan_layers` stacks and scans them like any other layer parameter.

With `dropout` > 0 (PEFT's `lora_dropout`), each adapter's input is dropped out (inverted
dropout: kept entries scaled by `1 / (1 - p)`) before `A`, as PEFT's `lora_B(lora_A(dropout(x)))`,
in training steps only. An adapter then holds a `DropoutSalt`: at rest, its index among the
model's projections (an int32 scalar, so evaluation, scoring and export are deterministic and see
no randomness); inside a training step, `seed_dropout` replaces it by the key of that step,
micro-batch and adapter, so every adapter and layer (scanned or not) draws its own mask and a
resumed run draws the same masks as an uninterrupted one.

`merge_lora` folds adapters into the weights (`W + (alpha / r) A B`); `peft_tensors` names them
as PEFT's `adapter_model.safetensors` does (`lora_A.weight` `[r, in]`, `lora_B.weight`
`[out, r]`, torch's `[out, in]` layout).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from davir_jax.core import storage
from davir_jax.core.io import atomic_dir, dumps_json
from davir_jax.models.config import LORA_PROJECTIONS, LoraConfig
from davir_jax.models.decoder import LORA_SUFFIX as SUFFIX
from davir_jax.models.decoder import Decoder, RunConfig
from davir_jax.models.quant import NF4Kernel, kernel_shape_axes, quantize_kernel
from davir_jax.models.safetensors_io import save_file
from davir_jax.models.weights import _to_host

# Each projection: (the module holding it, the number of leading input axes of its kernel, the
# module's Hugging Face name).
PROJECTIONS: dict[str, tuple[str, int, str]] = {
    "q_proj": ("attn", 1, "self_attn"),
    "k_proj": ("attn", 1, "self_attn"),
    "v_proj": ("attn", 1, "self_attn"),
    "o_proj": ("attn", 2, "self_attn"),
    "gate_proj": ("mlp", 1, "mlp"),
    "up_proj": ("mlp", 1, "mlp"),
    "down_proj": ("mlp", 1, "mlp"),
}
assert tuple(PROJECTIONS) == LORA_PROJECTIONS


class DropoutSalt(nnx.Variable):
    """An adapter's dropout stream: its index (int32 scalar) at rest, the key data of its mask
    (uint32 `[2]`) inside a training step (`seed_dropout`). Not a parameter: never trained,
    checkpointed or exported."""


def seed_dropout(state: Any, key: jax.Array) -> Any:
    """`state` (a model's untrained variables) with every `DropoutSalt` replaced by the key data
    of `fold_in(key, salt)`: what turns an adapter's dropout on for one (micro-)batch."""

    def seed(v: Any) -> Any:
        if not isinstance(v, DropoutSalt):
            return v
        return v.replace(jax.random.key_data(jax.random.fold_in(key, v.get_value())))

    return jax.tree.map(seed, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


class LoRA(nnx.Module):
    """The adapter of one projection: `delta(x) = scale * (dropout(x) A) B` over `n_in` input
    axes (dropout only when `dropout` > 0 and the training step has seeded `salt`)."""

    def __init__(
        self,
        a: nnx.LoRAParam,
        b: nnx.LoRAParam,
        scale: float,
        n_in: int,
        dropout: float = 0.0,
        salt: int = 0,
    ) -> None:
        self.a, self.b = a, b
        # Static: part of the graph definition.
        self.scale, self.n_in, self.dropout = float(scale), int(n_in), float(dropout)
        if self.dropout > 0:
            self.salt = DropoutSalt(jnp.asarray(salt, jnp.int32))

    def _dropped(self, x: jax.Array) -> jax.Array:
        """`x` after dropout when the step seeded this adapter's key (at trace time, the key
        data's shape tells: `[2]` seeded, a scalar at rest), else `x`."""
        if self.dropout == 0 or self.salt.get_value().ndim == 0:
            return x
        key = jax.random.wrap_key_data(self.salt.get_value())
        keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - self.dropout), x.dtype), 0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`[..., *in]` -> `[..., *out]`, in `x`'s dtype (the compute dtype)."""
        x = self._dropped(x)
        h = jnp.tensordot(x, self.a.get_value().astype(x.dtype), axes=self.n_in)
        return jnp.tensordot(h, self.b.get_value().astype(x.dtype), axes=1) * jnp.asarray(
            self.scale, x.dtype
        )

    def delta_weight(self) -> jax.Array:
        """`scale * A B` in float32, shaped like the projection's kernel."""
        a = self.a.get_value().astype(jnp.float32)
        return self.scale * jnp.tensordot(a, self.b.get_value().astype(jnp.float32), axes=1)


def projections(model: Any) -> Iterator[tuple[str, str, nnx.Module]]:
    """(path such as `layers.0.attn.q_proj`, short name, owning module) of every projection."""
    for i, block in enumerate(model.layers):
        for name, (parent, _, _) in PROJECTIONS.items():
            yield f"layers.{i}.{parent}.{name}", name, getattr(block, parent)


def targeted(model: Any, cfg: LoraConfig) -> list[str]:
    """Paths of the projections `cfg.targets` selects; a pattern that selects none is an error
    naming it (`model.lora.targets`)."""
    rx = [re.compile(p) for p in cfg.targets]
    used = [False] * len(rx)
    out = []
    for path, name, _ in projections(model):
        hit = [bool(r.fullmatch(name) or r.fullmatch(path)) for r in rx]
        used = [u or h for u, h in zip(used, hit)]
        if any(hit):
            out.append(path)
    unused = [p for p, u in zip(cfg.targets, used) if not u]
    if unused:
        raise ValueError(
            f"model.lora.targets: {unused[0]!r} matches no projection of this model (names: "
            f"{', '.join(PROJECTIONS)}; paths: layers.0.attn.q_proj .. "
            f"layers.{len(model.layers) - 1}.mlp.down_proj)"
        )
    return out


def _born(fn: Any, shape: tuple[int, ...], axes: tuple[Any, ...], sharder: Any) -> jax.Array:
    """`fn()` created directly in the sharding of `axes` (no unsharded copy)."""
    if sharder.mesh is None:
        return fn()
    sh = NamedSharding(sharder.mesh, sharder.spec(axes, shape))
    return jax.jit(fn, out_shardings=sh)()


def apply_lora(model: Any, cfg: LoraConfig, key: jax.Array | int = 0) -> list[str]:
    """Attach fresh adapters (A kaiming-uniform, B zero; in the parameter dtype, `model.dtype`)
    to the projections `cfg.targets` selects, in place; returns their paths. The model's output
    is unchanged until B is trained (or restored)."""
    key = jax.random.key(key) if isinstance(key, int) else key
    paths = targeted(model, cfg)
    chosen = set(paths)
    sharder = model.run.sharder
    dtype = jnp.dtype(model.run.param_dtype)
    if cfg.quantize_base is not None:
        quantize_base(model)
    for idx, (path, name, module) in enumerate(projections(model)):
        if path not in chosen:
            continue
        if hasattr(module, name + SUFFIX):
            raise ValueError(f"{path}: already has a LoRA adapter (model.lora applied twice)")
        n_in = PROJECTIONS[name][1]
        shape, axes = kernel_shape_axes(getattr(module, name))
        a_shape, a_axes = (*shape[:n_in], cfg.rank), (*axes[:n_in], "lora_rank")
        b_shape, b_axes = (cfg.rank, *shape[n_in:]), ("lora_rank", *axes[n_in:])
        # PEFT's init: kaiming_uniform_(a=sqrt(5)) on lora_A, i.e. U(-1/sqrt(fan_in), ...).
        bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))
        k = jax.random.fold_in(key, idx)

        def init_a(k=k, s=a_shape, bd=bound) -> jax.Array:
            return jax.random.uniform(k, s, jnp.float32, -bd, bd).astype(dtype)

        a = _born(init_a, a_shape, a_axes, sharder)
        b = _born(lambda s=b_shape: jnp.zeros(s, dtype), b_shape, b_axes, sharder)
        adapter = LoRA(
            nnx.LoRAParam(a, logical_axes=a_axes),
            nnx.LoRAParam(b, logical_axes=b_axes),
            cfg.scale,
            n_in,
            cfg.dropout,
            idx,
        )
        setattr(module, name + SUFFIX, adapter)
    # Static (part of the graph definition): jobs that compile from the architecture (the NLL
    # engine) rebuild the same adapted model abstractly (`abstract_lora_model`).
    model.lora_config = cfg
    return paths


def quantize_base(model: Any) -> None:
    """Every projection of every layer in NF4 (QLoRA quantizes all the base's linear layers;
    embeddings, norms and the LM head stay as loaded), in place. Deterministic: a LoRA
    directory's base is quantized again, to the same codes, when it is loaded."""
    for _, name, module in projections(model):
        w = getattr(module, name)
        if not isinstance(w, NF4Kernel):
            setattr(module, name, quantize_kernel(w, model.run.sharder))


def dequantize_base(model: Any) -> None:
    """Every NF4 projection back to a Param in the parameter dtype (its dequantized values, in
    the kernel's sharding), in place: what merging or exporting a QLoRA model starts from."""
    sharder, dtype = model.run.sharder, jnp.dtype(model.run.param_dtype)
    for _, name, module in projections(model):
        w = getattr(module, name)
        if isinstance(w, NF4Kernel):
            value = _born(lambda w=w: w.kernel(dtype), w.shape, w.axes, sharder)
            setattr(module, name, nnx.Param(value, logical_axes=w.axes))


def abstract_lora_model(arch: Any, run: RunConfig, cfg: LoraConfig) -> tuple[Any, nnx.State]:
    """Graph definition and abstract state of `Decoder(arch, run)` with `cfg`'s adapters: no
    memory used (as `weights.abstract_model`)."""

    def build() -> Decoder:
        model = Decoder(arch, run, rngs=nnx.Rngs(0))
        apply_lora(model, cfg)
        return model

    return nnx.split(nnx.eval_shape(build))


def adapters(model: Any) -> Iterator[tuple[str, str, nnx.Module, LoRA]]:
    """(projection path, short name, owning module, adapter) of every adapter of `model`."""
    for path, name, module in projections(model):
        adapter = getattr(module, name + SUFFIX, None)
        if adapter is not None:
            yield path, name, module, adapter


def has_lora(model: Any) -> bool:
    return next(adapters(model), None) is not None


def merge_lora(model: Any) -> Any:
    """Fold every adapter into its projection (`W + (alpha / r) A B`, summed in float32 and
    stored in W's dtype and sharding) and remove the adapters, in place; returns `model`, now a
    plain decoder (`save_model`, `export_hf`). A 4-bit base (`quantize_base`) is dequantized
    first: the merged model is its NF4 values plus the adapters, in the parameter dtype."""
    dequantize_base(model)
    for _, name, module, adapter in list(adapters(model)):
        w = getattr(module, name)
        old = w.get_value()
        new = (old.astype(jnp.float32) + adapter.delta_weight()).astype(old.dtype)
        w.set_value(jax.device_put(new, old.sharding))
        delattr(module, name + SUFFIX)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def adapter_state(model: Any) -> nnx.State:
    """The adapters' variables only (what a LoRA checkpoint holds)."""
    return nnx.state(model, nnx.LoRAParam)


def peft_name(path: str, which: str) -> str:
    """PEFT's tensor name of an adapter matrix (`which`: `A` or `B`) of projection `path`."""
    _, i, parent, name = path.split(".")
    hf_parent = PROJECTIONS[name][2]
    assert parent == PROJECTIONS[name][0], path
    return f"base_model.model.model.layers.{i}.{hf_parent}.{name}.lora_{which}.weight"


def peft_tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(PEFT name, host array) of every adapter matrix, in torch's `[out, in]` layout:
    `lora_A.weight` `[r, in]`, `lora_B.weight` `[out, r]` (the q/k/v/o kernels' head axes
    flattened head-major, as `weights.param_table` flattens the kernels themselves)."""
    for path, _, _, adapter in adapters(model):
        a, b = _to_host(adapter.a.get_value()), _to_host(adapter.b.get_value())
        r = a.shape[-1]
        yield peft_name(path, "A"), np.ascontiguousarray(a.reshape(-1, r).T)
        yield peft_name(path, "B"), np.ascontiguousarray(b.reshape(r, -1).T)


def peft_target_modules(model: Any) -> list[str] | str:
    """PEFT's `target_modules`: the adapted projections' names when every layer has the same
    ones, else one regular expression of the adapted modules' full names."""
    paths = [p for p, *_ in adapters(model)]
    names = sorted({p.rsplit(".", 1)[1] for p in paths}, key=list(PROJECTIONS).index)
    if len(paths) == len(names) * len(model.layers):
        return names
    full = [peft_name(p, "A")[len("base_model.model.") : -len(".lora_A.weight")] for p in paths]
    return "^(" + "|".join(re.escape(f) for f in full) + ")$"


def export_peft(model: Any, base: str, lora: LoraConfig, out_dir: str | os.PathLike) -> Path:
    """Write the adapters of `model` as a PEFT LoRA directory (`PeftModel.from_pretrained(base,
    out_dir)` loads it): `adapter_config.json` (peft_type LORA, task_type CAUSAL_LM, r,
    lora_alpha, target_modules, base_model_name_or_path) and `adapter_model.safetensors`
    (`peft_tensors`). Atomic (`core.io.atomic_dir`); every process gathers, process 0 writes."""
    if not has_lora(model):
        raise ValueError(f"{out_dir}: the model has no LoRA adapters to export")
    tensors = list(peft_tensors(model))  # a collective on multi-host: every process takes part
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": peft_target_modules(model),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = storage.upath(out_dir)
    if jax.process_index() == 0:
        with atomic_dir(out) as tmp:
            (tmp / "adapter_config.json").write_text(dumps_json(config, indent=2))
            save_file(tensors, tmp / "adapter_model.safetensors")
    return out
