"""davir-jax: data selection via implicit reward (DavIR, arXiv 2310.13008) in JAX.

Public API: `load_model`, `load_tokenizer`, `export_hf`, `save_model`, `load_config`.
"""

from davir_jax.config import Config, load_config
from davir_jax.models import (
    ArchConfig,
    Decoder,
    export_hf,
    load_model,
    load_tokenizer,
    random_model,
    save_model,
)

__version__ = "0.1.0"

__all__ = [
    "ArchConfig",
    "Config",
    "Decoder",
    "export_hf",
    "load_config",
    "load_model",
    "load_tokenizer",
    "random_model",
    "save_model",
]
