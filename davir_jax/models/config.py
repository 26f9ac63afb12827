"""The `model` section of the config: which model, in which precision, and how it runs."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from davir_jax.core.schema import shorthand
from davir_jax.models.arch import ArchConfig
from davir_jax.models.attention import attention_name, remat_name

# The formats of a LoRA run's frozen base weights besides as loaded (`models.quant`).
LORA_QUANT_FORMATS = ("nf4",)
# The projections LoRA can adapt (`models.lora.PROJECTIONS`), by their Hugging Face names.
LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685): `W x` becomes
    `W x + (alpha / rank) B A x` on the targeted projections, and only `A`, `B` are trained.

    `targets`: regular expressions, each matched in full against a projection's name (`q_proj`,
    `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`, `down_proj`) or its path
    (`layers.3.attn.q_proj`, `layers.3.mlp.down_proj`); PEFT's default for Llama-likes,
    q_proj and v_proj. A pattern that matches no projection of the model is an error.
    `quantize_base`: "nf4" stores every projection of the frozen base in QLoRA's 4-bit
    NormalFloat (Dettmers et al. 2023, arXiv 2305.14314), dequantized layer by layer where read.
    `dropout`: PEFT's `lora_dropout`, the probability of dropping each entry of an adapter's
    input in training steps (not in validation, scoring or export; `models.lora`).
    """

    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank, as PEFT's lora_alpha
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    quantize_base: str | None = None  # "nf4": QLoRA's 4-bit base weights (models/quant.py)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.quantize_base is not None and self.quantize_base not in LORA_QUANT_FORMATS:
            raise ValueError(
                f"quantize_base: {self.quantize_base!r} is not one of "
                f"{', '.join(LORA_QUANT_FORMATS)} (or null: the base as loaded)"
            )
        if not self.targets:
            raise ValueError("targets: name at least one projection (e.g. [q_proj, v_proj])")
        for pat in self.targets:
            try:
                rx = re.compile(pat)
            except re.error as e:
                raise ValueError(f"targets: {pat!r} is not a regular expression ({e})") from e
            # A pattern without a dot can only match a projection's own name.
            if "." not in pat and not any(rx.fullmatch(n) for n in LORA_PROJECTIONS):
                raise ValueError(
                    f"targets: {pat!r} matches no projection (one of {', '.join(LORA_PROJECTIONS)}"
                    ", or a path such as layers.0.attn.q_proj)"
                )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


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
    # Train low-rank adapters on a frozen base instead of every weight (None: off); see
    # `LoraConfig` and README "LoRA".
    lora: LoraConfig | None = None

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
