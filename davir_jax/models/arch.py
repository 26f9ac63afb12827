"""Architecture hyper-parameters of the decoder families, and their translation from and to
Hugging Face `config.json` files.

One frozen dataclass, `ArchConfig`, describes every supported family (llama, mistral, qwen2,
gemma, gemma2). The HF reader is strict: a field that changes the model's arithmetic and that
the decoder does not implement raises `UnsupportedConfigError`, so a checkpoint is never run
with silently different math.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from davir_jax.core import registry

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedConfigError(ValueError):
    """A config field would change the math in a way this decoder does not implement."""


# HF `model_type` -> a reader of such a `config.json` dict into an `ArchConfig` of one of
# `FAMILIES` (added by plugins: `davir_jax.plugins.register_family`). The weights are then read
# with that family's tensor names (`models.weights.param_table`).
HF_CONVERTERS: dict[str, Callable[[dict[str, Any]], ArchConfig]] = {}


def register_hf_converter(
    model_type: str,
) -> Callable[[Callable[[dict[str, Any]], ArchConfig]], Callable[[dict[str, Any]], ArchConfig]]:
    """Decorator adding `fn(hf_config_dict) -> ArchConfig` to `HF_CONVERTERS` under
    `model_type`; a built-in family or a `model_type` registered before is an error."""
    registry.check_name(model_type, "a model_type")

    def deco(
        fn: Callable[[dict[str, Any]], ArchConfig],
    ) -> Callable[[dict[str, Any]], ArchConfig]:
        if model_type in FAMILIES:
            raise ValueError(f"model family {model_type!r} is already registered (built in)")
        registry.add(HF_CONVERTERS, model_type, fn, "model family")
        return fn

    return deco


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `llama3` follows Llama 3.1's piecewise rescaling of inv_freq."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UnsupportedConfigError(
                f"rope_type {self.rope_type!r} is not implemented (supported: {ROPE_TYPES})"
            )


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Hyper-parameters of one decoder. Field names follow our code, not HF's (see `from_hf`)."""

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    activation: str = "silu"
    # q/k/v projection bias (Qwen2; Llama with attention_bias) and output projection bias
    # (Llama with attention_bias only).
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Sliding-window attention: a key is visible when q_pos - k_pos < sliding_window.
    sliding_window: int | None = None
    # Per layer "full_attention" or "sliding_attention"; empty = every layer full, or every
    # layer sliding when sliding_window is set (Mistral).
    layer_types: tuple[str, ...] = ()
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None  # Gemma2: scale = query_pre_attn_scalar**-0.5
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(field: str, msg: str) -> None:
            raise ValueError(f"{field}: {msg}")

        if self.family not in FAMILIES:
            bad("family", f"unknown model family {self.family!r} (supported: {FAMILIES})")
        if self.activation not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"activation: {self.activation!r} is not implemented (supported: {ACTIVATIONS})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            if getattr(self, name) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        if self.num_heads <= 0 or self.num_kv_heads <= 0:
            bad("num_heads", "heads and kv heads must be positive")
        if self.num_heads % self.num_kv_heads:
            bad(
                "num_kv_heads",
                f"num_heads ({self.num_heads}) is not divisible by num_kv_heads "
                f"({self.num_kv_heads})",
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad("head_dim", "hidden_size is not divisible by num_heads and head_dim is not set")
        if self.resolved_head_dim % 2:
            bad("head_dim", f"RoPE needs an even head_dim, got {self.resolved_head_dim}")
        if self.layer_types:
            if len(self.layer_types) != self.num_layers:
                bad(
                    "layer_types",
                    f"has {len(self.layer_types)} entries for {self.num_layers} layers",
                )
            for t in self.layer_types:
                if t not in LAYER_TYPES:
                    raise UnsupportedConfigError(f"layer_types: {t!r} is not implemented")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                bad("sliding_window", "layer_types has sliding layers but no sliding_window")
        if self.sliding_window is not None and self.sliding_window <= 0:
            bad("sliding_window", f"must be positive, got {self.sliding_window}")

    # -- derived ----------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

    @property
    def is_gemma(self) -> bool:
        return self.family in ("gemma", "gemma2")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None for full causal attention."""
        if self.layer_types:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window

    @property
    def attention_scale(self) -> float:
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return self.resolved_head_dim**-0.5

    def num_params(self) -> int:
        """Closed-form parameter count (checked against `jax.eval_shape` in the tests)."""
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        hd, h, k = self.resolved_head_dim, self.num_heads, self.num_kv_heads
        attn = d * h * hd + 2 * d * k * hd + h * hd * d
        attn += (h * hd + 2 * k * hd) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * f + (2 * f + d) * self.mlp_bias
        norms = (4 if self.family == "gemma2" else 2) * d
        per_layer = attn + mlp + norms
        return self.num_layers * per_layer + v * d * (1 if self.tie_embeddings else 2) + d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchConfig:
        d = dict(d)
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    # -- Hugging Face -----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ArchConfig:
        """Read an HF `config.json` dict. Errors name `source` and the offending field."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: a model config must be a JSON object")
        convert = HF_CONVERTERS.get(hf.get("model_type"))  # type: ignore[arg-type]
        try:
            if convert is not None:
                arch = convert(dict(hf))
                if not isinstance(arch, ArchConfig):
                    raise TypeError(
                        f"the converter of model_type {hf['model_type']!r} returned "
                        f"{type(arch).__name__}, not an ArchConfig"
                    )
                return arch
            return _from_hf(_with_hf_defaults(hf))
        except (UnsupportedConfigError, ValueError, KeyError, TypeError) as e:
            err = UnsupportedConfigError if isinstance(e, UnsupportedConfigError) else ValueError
            raise err(f"{source}: {e}") from e

    @classmethod
    def from_hf_file(cls, path: str | Path) -> ArchConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the model config: {e}") from e
        return cls.from_hf(hf, source=str(path))

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers loads into the equivalent PyTorch model."""
        arch_names = {
            "llama": "LlamaForCausalLM",
            "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM",
            "gemma": "GemmaForCausalLM",
            "gemma2": "Gemma2ForCausalLM",
        }
        rope = self._hf_rope()
        out: dict[str, Any] = {
            "architectures": [arch_names[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.resolved_head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_embeddings,
            "rope_parameters": rope,
            # Older readers of config.json (transformers 4.x) look for these two.
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling.rope_type == "default" else rope,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                list(self.eos_token_id)
                if isinstance(self.eos_token_id, tuple)
                else self.eos_token_id
            ),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        out.update(self._hf_family_fields())
        return out

    def _hf_rope(self) -> dict[str, Any]:
        rope: dict[str, Any] = {
            "rope_type": self.rope_scaling.rope_type,
            "rope_theta": self.rope_theta,
        }
        if self.rope_scaling.rope_type == "linear":
            rope["factor"] = self.rope_scaling.factor
        elif self.rope_scaling.rope_type == "llama3":
            rs = self.rope_scaling
            rope.update(
                factor=rs.factor,
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position_embeddings,
            )
        return rope

    def _hf_family_fields(self) -> dict[str, Any]:
        """The config.json fields only some families have (activation, biases, windows)."""
        out: dict[str, Any] = {}
        act_key = "hidden_activation" if self.is_gemma else "hidden_act"
        out[act_key] = self.activation
        if self.family == "gemma":
            out["hidden_act"] = self.activation
        if self.family == "llama":
            if self.qkv_bias != self.o_bias:
                raise UnsupportedConfigError(
                    "llama's attention_bias sets q/k/v and o biases together; "
                    f"qkv_bias={self.qkv_bias} o_bias={self.o_bias} has no HF equivalent"
                )
            out["attention_bias"] = self.qkv_bias
            out["mlp_bias"] = self.mlp_bias
        if self.family in ("mistral", "qwen2", "gemma2"):
            out["sliding_window"] = self.sliding_window
        if self.family == "qwen2":
            sliding = "sliding_attention" in self.layer_types
            out["use_sliding_window"] = sliding
            out["layer_types"] = list(self.layer_types) or ["full_attention"] * self.num_layers
            if sliding:
                first = self.layer_types.index("sliding_attention")
                out["max_window_layers"] = first
        if self.family == "gemma2":
            out["layer_types"] = list(self.layer_types)
            out["attn_logit_softcapping"] = self.attn_logit_softcap
            out["final_logit_softcapping"] = self.final_logit_softcap
            q = self.query_pre_attn_scalar
            # transformers validates this field as an int
            out["query_pre_attn_scalar"] = int(q) if q is not None and float(q).is_integer() else q
        return out


# Every config.json field this reader knows: either consumed by `_from_hf`, or known not to
# change the forward pass (training knobs, generation defaults, metadata). Anything else is an
# error, because an unknown field may change the math (e.g. a new norm or rope variant).
_HF_KNOWN = {
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "initializer_range",
    "use_cache",
    "attention_dropout",
    "_name_or_path",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "pretraining_tp",
    "tokenizer_class",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "max_window_layers",
    "use_sliding_window",
    "cache_implementation",
    "hidden_act",
    "hidden_activation",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
    "layer_types",
    "attention_bias",
    "mlp_bias",
    "head_dim",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "use_bidirectional_attention",
    "tie_word_embeddings",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "generation_config",
    "task_specific_params",
    "quantization_config",
    "tf_legacy_loss",
    "pruned_heads",
    "torchscript",
    "use_return_dict",
    "finetuning_task",
    "prefix",
    "sep_token_id",
    "decoder_start_token_id",
    "add_cross_attention",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "unsloth_version",
}


def _with_hf_defaults(hf: dict[str, Any]) -> dict[str, Any]:
    """Fill absent keys the way transformers would (its config class defaults), so a hand-written
    config.json means the same here as in PyTorch (e.g. Qwen2's max_window_layers=28)."""
    if hf.get("model_type") not in FAMILIES:
        return hf
    from transformers import AutoConfig

    defaults = AutoConfig.for_model(hf["model_type"]).to_dict()
    keep = {k: v for k, v in defaults.items() if k in _HF_KNOWN and k not in hf}
    # Keys whose absence HF resolves from other keys, not from a constant default.
    for k in (
        "head_dim",
        "layer_types",
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "num_key_value_heads",
        "architectures",
    ):
        keep.pop(k, None)
    if hf["model_type"] in ("gemma", "gemma2") and "head_dim" not in hf:
        keep["head_dim"] = defaults.get("head_dim")
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        )
        if k not in hf
    ]
    if missing:
        raise KeyError(f"missing field(s) {missing}")
    return {**keep, **hf}


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta included); older files write
    # `rope_theta` and `rope_scaling` separately. Accept both.
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    if not params:
        params = dict(legacy)
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rtype = params.pop("rope_type", params.pop("type", "default"))
    allowed = {
        "default": set(),
        "linear": {"factor"},
        "llama3": {
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        },
    }
    extra = set(params) - allowed.get(rtype, set(params))
    if extra:
        raise UnsupportedConfigError(f"rope parameters {sorted(extra)} are not implemented")
    if rtype == "default":
        return theta, RopeScaling()
    if rtype == "linear":
        return theta, RopeScaling("linear", factor=float(params["factor"]))
    if rtype == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedConfigError(
        f"rope type {rtype!r} is not implemented (supported: {ROPE_TYPES})"
    )


def _from_hf(hf: dict[str, Any]) -> ArchConfig:
    family = _check_hf(hf)
    theta, scaling = _rope_from_hf(hf)
    gemma = family in ("gemma", "gemma2")
    n_layers = int(hf["num_hidden_layers"])
    window, layer_types = _hf_windows(hf, family, n_layers)
    attn_bias = bool(hf.get("attention_bias", False))
    if attn_bias and family in ("mistral", "qwen2"):
        # transformers ignores the flag for these two; refuse rather than guess.
        raise UnsupportedConfigError(f"attention_bias=true is not defined for {family}")
    return ArchConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=n_layers,
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        activation=_hf_activation(hf, family),
        qkv_bias=True if family == "qwen2" else attn_bias,
        o_bias=attn_bias,  # llama, gemma, gemma2: q/k/v and o together
        mlp_bias=bool(hf.get("mlp_bias", False)) if family == "llama" else False,
        sliding_window=int(window) if window else None,
        layer_types=layer_types,
        attn_logit_softcap=(
            float(hf["attn_logit_softcapping"]) if hf.get("attn_logit_softcapping") else None
        ),
        final_logit_softcap=(
            float(hf["final_logit_softcapping"]) if hf.get("final_logit_softcapping") else None
        ),
        query_pre_attn_scalar=(float(hf["query_pre_attn_scalar"]) if family == "gemma2" else None),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
    )


def _check_hf(hf: dict[str, Any]) -> str:
    """The family of a config.json, refusing what this decoder would silently get wrong."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UnsupportedConfigError(
            f"model_type {family!r} is not a supported family (supported: "
            f"{FAMILIES + tuple(HF_CONVERTERS)})"
        )
    unknown = sorted(k for k in hf if k not in _HF_KNOWN and not k.startswith("_"))
    if unknown:
        raise UnsupportedConfigError(
            f"unrecognised field(s) {unknown}: they may change the model's math, which this "
            "decoder would silently ignore"
        )
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedConfigError("use_bidirectional_attention=true is not implemented")
    if hf.get("quantization_config"):
        raise UnsupportedConfigError(
            "quantized HF checkpoints (quantization_config) are not supported"
        )
    return family


def _hf_activation(hf: dict[str, Any], family: str) -> str:
    if family == "gemma2":
        return hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if family == "gemma":
        # transformers' GemmaMLP reads `hidden_act`; its "gelu" is the tanh approximation.
        act = hf.get("hidden_act") or hf.get("hidden_activation") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" else act
    return hf.get("hidden_act", "silu")


def _hf_windows(hf: dict[str, Any], family: str, n_layers: int) -> tuple[Any, tuple[str, ...]]:
    """(sliding window, per-layer attention types) as transformers reads them per family."""
    window = hf.get("sliding_window")
    layer_types = tuple(hf.get("layer_types") or ())
    if family in ("llama", "gemma"):
        window, layer_types = None, ()
    elif family == "mistral":
        layer_types = ()
    elif family == "qwen2":
        if not hf.get("use_sliding_window", False):
            window, layer_types = None, ()
        elif not layer_types:
            mwl = int(hf.get("max_window_layers", n_layers))
            layer_types = tuple(
                "sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)
            )
    elif family == "gemma2" and not layer_types:
        layer_types = tuple(
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)
        )
    if layer_types and "sliding_attention" not in layer_types:
        window = None
    return window, layer_types


def llama3_inv_freq_scale(inv_freq: Any, scaling: RopeScaling) -> Any:
    """Llama 3.1's rescaling of RoPE inverse frequencies (works on NumPy arrays)."""
    import numpy as np

    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)
