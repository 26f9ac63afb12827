"""The `model` section of the config: which model, in which precision, and how it runs."""

from __future__ import annotations

import dataclasses
from typing import Any

from davir_jax.core.schema import shorthand
from davir_jax.models.arch import ArchConfig
from davir_jax.models.attention import attention_name, remat_name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model, in which precision.

    `source`: a `load_model` source (registered name, GGUF file, HF or davir-jax directory).
    `arch`: an explicit architecture instead of a source (random init; shape planning).
    """

    source: str | None = shorthand("smollm2-135m", "--model", "sft", "dpo", "eval")
    arch: ArchConfig | None = None
    dtype: str = "float32"  # parameter dtype (master weights)
    compute_dtype: str | None = None  # the dtype computations run in (None: same as dtype)
    # Rematerialise each layer under a gradient (training only; scoring is unaffected), by a
    # policy (models.attention.remat_policy): `full` keeps each layer's input only (SmolLM2 SFT
    # at 8x1024: peak RSS 5.1 GB; benchmarks/RESULTS.md), `dots` also the matrix products,
    # `attention` also the attention output, `none` everything. true/false: full/none.
    remat: str | bool = "full"
    # models.attention.IMPLEMENTATIONS: auto (the platform's fused kernel; blocked on CPU),
    # dense, blocked, splash (TPU), pallas_gpu (GPU).
    attention: str = "auto"
    attn_block: int = 64  # models.decoder.ATTN_BLOCK: blocked attention; 0: dense
    # Run the layers as one lax.scan (compile time independent of depth); the same parameters,
    # checkpoints and results as the unrolled loop.
    scan_layers: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "remat", remat_name(self.remat))
        attention_name(self.attention)
        if self.attn_block < 0:
            raise ValueError(
                f"attn_block: must be 0 (dense) or a block size, got {self.attn_block}"
            )
        for name in ("dtype", "compute_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}: {v!r} is not float32, bfloat16 or float16")
        if self.source is None and self.arch is None:
            raise ValueError("source: one of model.source or model.arch must be set")

    def run_options(self) -> dict[str, Any]:
        """How to run the model (`load_model`/`random_model` keywords), besides `dtype`."""
        return {
            "compute_dtype": self.compute_dtype,
            "remat": self.remat,
            "attn_block": self.attn_block,
            "attention": self.attention,
            "scan_layers": self.scan_layers,
        }
