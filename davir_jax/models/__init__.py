"""Decoder families, weight import/export (HF safetensors, GGUF, our checkpoints), tokenizers."""

from __future__ import annotations

from typing import Any

from davir_jax.models.arch import ArchConfig, RopeScaling, UnsupportedConfigError
from davir_jax.models.decoder import ATTN_BLOCK, Decoder, RunConfig
from davir_jax.models.loading import load_arch, load_model, save_model
from davir_jax.models.safetensors_io import WeightFileError
from davir_jax.models.tokenizer import load_tokenizer
from davir_jax.models.weights import export_hf


def random_model(
    arch: ArchConfig,
    dtype: str = "float32",
    mesh: Any = None,
    *,
    compute_dtype: str | None = None,
    remat: str | bool = False,
    attn_block: int = ATTN_BLOCK,
    scan_layers: bool = False,
    attention: str = "auto",
    seed: int = 0,
) -> Decoder:
    """A randomly initialised decoder, every parameter born in its sharding."""
    from flax import nnx

    from davir_jax.core.sharding import create_sharded
    from davir_jax.models.loading import run_config

    run = run_config(dtype, compute_dtype, remat, mesh, attn_block, scan_layers, attention)
    return create_sharded(lambda: Decoder(arch, run, rngs=nnx.Rngs(seed)), mesh)


__all__ = [
    "ArchConfig",
    "Decoder",
    "RopeScaling",
    "RunConfig",
    "UnsupportedConfigError",
    "WeightFileError",
    "export_hf",
    "load_arch",
    "load_model",
    "load_tokenizer",
    "random_model",
    "save_model",
]
