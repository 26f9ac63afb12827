"""4-bit NormalFloat (NF4) base weights for LoRA: QLoRA (Dettmers et al. 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs", arXiv 2305.14314, Section 3).

A frozen projection kernel is stored as 4-bit codes into the NF4 table (the 16 quantiles of a
standard normal rescaled to [-1, 1], the paper's Eq. 4; the values bitsandbytes uses) with one
float32 absmax per block of `BLOCK` = 64 consecutive weights along the kernel's last axis (the
paper's block size; a last axis that is not a multiple of 64, as in tiny test models, takes the
largest power of two dividing it): `w ~= NF4[code] * absmax(block)`. Two codes share a byte
(the even element in the low nibble), so a kernel takes 4 bits per weight plus 32 / 64 = 0.5
for its scales (the paper's double quantization of the scales is not done). The model dequantizes a
kernel to the compute dtype where it reads it, layer by layer (inside the layer scan when
`scan_layers` is on), so the full-precision weights never exist all at once; only the LoRA
adapters train (`models.lora`).

Codes and scales keep the kernel's axes and logical axis names (the last axis packed two to a
byte, or one per block), so the rules table splits them as it splits the kernel.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

# QLoRA's NF4 table (bitsandbytes' `NF4` constant, arXiv 2305.14314 Appendix E).
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
BLOCK = 64


class QuantCode(nnx.Variable):
    """Packed 4-bit codes of a quantized kernel (uint8, two per byte). Frozen."""


class QuantScale(nnx.Variable):
    """Per-block absmax of a quantized kernel (float32). Frozen."""


def block_size(shape: tuple[int, ...]) -> int:
    """The block of a kernel: `BLOCK` consecutive weights along its last axis, or the largest
    power of two dividing that axis when it is not a multiple of 64 (tiny test models)."""
    block = math.gcd(shape[-1], BLOCK)
    if block < 2:
        raise ValueError(f"cannot store a kernel of shape {shape} in NF4: its last axis is odd")
    return block


def nf4_quantize(w: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """(codes uint8 `[..., last / 2]`, absmax float32 `[..., last / block]`) of `w`: each
    weight's nearest NF4 value after dividing its block (`block` consecutive weights along the
    last axis) by the block's largest magnitude (ties to the lower code)."""
    *lead, last = w.shape
    blocks = w.astype(jnp.float32).reshape(*lead, last // block, block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None]
    # The nearest table value: the count of midpoints below (a midpoint itself goes down).
    mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    code = jnp.searchsorted(mids, normed, side="left").astype(jnp.uint8).reshape(*lead, last)
    return code[..., 0::2] | (code[..., 1::2] << 4), absmax


def nf4_dequantize(codes: jax.Array, absmax: jax.Array, dtype: Any) -> jax.Array:
    """The kernel that `nf4_quantize` encoded, in `dtype`."""
    *lead, half = codes.shape
    code = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*lead, 2 * half)
    block = 2 * half // absmax.shape[-1]
    vals = jnp.asarray(NF4)[code].reshape(*lead, absmax.shape[-1], block) * absmax[..., None]
    return vals.reshape(*lead, 2 * half).astype(dtype)


class NF4Kernel(nnx.Module):
    """A frozen projection kernel in NF4 (`nf4_quantize`), read as `kernel(dtype)`. Codes and
    scales keep the kernel's logical axes (its last axis packed, or in blocks), so the rules
    table splits them as it splits the kernel."""

    def __init__(self, codes: jax.Array, absmax: jax.Array, shape: tuple, axes: tuple) -> None:
        self.codes = QuantCode(codes, logical_axes=tuple(axes))
        self.absmax = QuantScale(absmax, logical_axes=tuple(axes))
        # Static: part of the graph definition.
        self.shape, self.axes = tuple(shape), tuple(axes)

    def kernel(self, dtype: Any) -> jax.Array:
        return nf4_dequantize(self.codes.get_value(), self.absmax.get_value(), dtype)


def quantize_kernel(w: nnx.Variable, sharder: Any) -> NF4Kernel:
    """`w` (a projection's kernel Param, with logical axes) as an `NF4Kernel`, its codes and
    scales created in their sharding."""
    value, axes = w.get_value(), tuple(w.get_metadata()["logical_axes"])
    block = block_size(value.shape)
    fn = functools.partial(nf4_quantize, block=block)
    if sharder.mesh is None:
        codes, absmax = jax.jit(fn)(value)
    else:
        *lead, last = value.shape
        shardings = tuple(
            NamedSharding(sharder.mesh, sharder.spec(axes, (*lead, size)))
            for size in (last // 2, last // block)
        )
        codes, absmax = jax.jit(fn, out_shardings=shardings)(value)
    return NF4Kernel(codes, absmax, value.shape, axes)


def read_kernel(module: nnx.Module, name: str, dtype: Any) -> jax.Array:
    """Projection `name` of `module` in `dtype`: a Param cast, or an `NF4Kernel` dequantized."""
    w = getattr(module, name)
    if isinstance(w, NF4Kernel):
        return w.kernel(dtype)
    return w.get_value().astype(dtype)


def kernel_shape_axes(w: Any) -> tuple[tuple[int, ...], tuple]:
    """(shape, logical axes) of a projection kernel, stored plain or quantized."""
    if isinstance(w, NF4Kernel):
        return w.shape, w.axes
    return tuple(w.get_value().shape), tuple(w.get_metadata()["logical_axes"])
