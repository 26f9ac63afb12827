"""GGUF import (llama.cpp's format) without torch: metadata -> ArchConfig, tensors -> HF layout.

Tensors are dequantized one at a time with `gguf.quants.dequantize` and handed to the shared
weight table (`weights.build_model`), so placement and sharding are the same as for HF files.
llama.cpp permutes the rows of `attn_q`/`attn_k` for its RoPE kernel; we undo that here.
"""

from __future__ import annotations

import os
import pathlib
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from davir_jax.models.arch import ArchConfig, UnsupportedConfigError
from davir_jax.models.safetensors_io import WeightFileError

SUPPORTED_ARCHS = ("llama",)
# Quantisation types gguf.quants can dequantize and that we have seen work end to end.
SUPPORTED_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)


class GGUFMetadata:
    """Typed access to a GGUF file's key/value metadata, with errors that name file and key."""

    def __init__(self, path: pathlib.Path, fields: Any = None) -> None:
        self.path = path
        if fields is not None:  # an already open reader's fields: read the file once
            self._fields = fields
            return
        try:
            self._fields = gguf.GGUFReader(path, "r").fields
        except Exception as e:  # the reader raises assorted types on corrupt files
            raise ValueError(f"{path}: cannot read GGUF metadata: {e}") from e

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def _field(self, key: str, *types: gguf.GGUFValueType) -> Any:
        field = self._fields.get(key)
        if field is None:
            raise ValueError(f"{self.path}: GGUF metadata field {key!r} is missing")
        if list(field.types[: len(types)]) != list(types):
            names = "/".join(t.name for t in field.types)
            raise ValueError(
                f"{self.path}: GGUF metadata field {key!r} has type {names}, "
                f"expected {'/'.join(t.name for t in types)}"
            )
        return field

    def _decode(self, key: str, raw: Any) -> str:
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: GGUF field {key!r} holds invalid UTF-8: {e}") from e

    def string(self, key: str) -> str:
        field = self._field(key, gguf.GGUFValueType.STRING)
        return self._decode(key, field.parts[field.data[0]])

    def _scalar(self, key: str, what: str, excluded: tuple[Any, ...]) -> Any:
        field = self._fields.get(key)
        if field is None:
            raise ValueError(f"{self.path}: GGUF metadata field {key!r} is missing")
        if len(field.types) != 1 or field.types[0] in excluded:
            raise ValueError(f"{self.path}: GGUF metadata field {key!r} is not {what}")
        return field.parts[field.data[0]][0]

    def integer(self, key: str) -> int:
        T = gguf.GGUFValueType
        return int(
            self._scalar(key, "an integer", (T.STRING, T.ARRAY, T.BOOL, T.FLOAT32, T.FLOAT64))
        )

    def number(self, key: str) -> float:
        T = gguf.GGUFValueType
        return float(self._scalar(key, "a number", (T.STRING, T.ARRAY, T.BOOL)))

    def boolean(self, key: str) -> bool:
        field = self._field(key, gguf.GGUFValueType.BOOL)
        return bool(field.parts[field.data[0]][0])

    def strings(self, key: str) -> list[str]:
        field = self._field(key, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
        return [self._decode(key, field.parts[i]) for i in field.data]

    def integers(self, key: str) -> list[int]:
        field = self._field(key, gguf.GGUFValueType.ARRAY)
        if len(field.types) != 2 or field.types[1] in (
            gguf.GGUFValueType.STRING,
            gguf.GGUFValueType.ARRAY,
        ):
            raise ValueError(f"{self.path}: GGUF metadata field {key!r} is not an integer array")
        return [int(field.parts[i][0]) for i in field.data]

    def get(self, kind: str, key: str, default: Any = None) -> Any:
        """`getattr(self, kind)(key)` when the field exists, else `default`."""
        return getattr(self, kind)(key) if key in self else default


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's convert script interleaves each head's two rotary halves; restore HF order.
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


class GGUFWeights:
    """Architecture and lazily dequantized tensors of one GGUF file, named as in HF."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightFileError(f"{self.path}: GGUF file not found")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises bare ValueError/struct errors on bad bytes
            raise WeightFileError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.meta = GGUFMetadata(self.path, self.reader.fields)
        arch = self.meta.get("string", "general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedConfigError(
                f"{self.path}: GGUF architecture {arch!r} is not supported "
                f"(supported: {SUPPORTED_ARCHS})"
            )
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self._arch(arch)
        self._hf_to_gguf = self._name_map()

    def _arch(self, a: str) -> ArchConfig:
        m = self.meta
        rope_type = m.get("string", f"{a}.rope.scaling.type", "none")
        if rope_type != "none" or "rope_freqs.weight" in self.tensors:
            raise UnsupportedConfigError(
                f"{self.path}: GGUF rope scaling ({rope_type}) is not supported"
            )
        if "token_embd.weight" not in self.tensors:
            raise WeightFileError(f"{self.path}: tensor 'token_embd.weight' is missing")
        n_heads = m.integer(f"{a}.attention.head_count")
        d = m.integer(f"{a}.embedding_length")
        return ArchConfig(
            family="llama",
            vocab_size=int(self.tensors["token_embd.weight"].shape[-1]),
            hidden_size=d,
            intermediate_size=m.integer(f"{a}.feed_forward_length"),
            num_layers=m.integer(f"{a}.block_count"),
            num_heads=n_heads,
            num_kv_heads=m.get("integer", f"{a}.attention.head_count_kv", n_heads),
            head_dim=m.get("integer", f"{a}.attention.key_length", d // n_heads),
            rope_theta=m.get("number", f"{a}.rope.freq_base", 10000.0),
            rms_norm_eps=m.number(f"{a}.attention.layer_norm_rms_epsilon"),
            max_position_embeddings=m.get("integer", f"{a}.context_length", 4096),
            tie_embeddings="output.weight" not in self.tensors,
            qkv_bias="blk.0.attn_q.bias" in self.tensors,
            o_bias="blk.0.attn_output.bias" in self.tensors,
            bos_token_id=m.get("integer", "tokenizer.ggml.bos_token_id"),
            eos_token_id=m.get("integer", "tokenizer.ggml.eos_token_id"),
            pad_token_id=m.get("integer", "tokenizer.ggml.padding_token_id"),
        )

    def _name_map(self) -> dict[str, tuple[str, int | None]]:
        """HF name -> (GGUF name, heads to un-permute by or None)."""
        a = self.arch
        m: dict[str, tuple[str, int | None]] = {
            "model.embed_tokens.weight": ("token_embd.weight", None),
            "model.norm.weight": ("output_norm.weight", None),
        }
        if not a.tie_embeddings:
            m["lm_head.weight"] = ("output.weight", None)
        for i in range(a.num_layers):
            hp, gp = f"model.layers.{i}", f"blk.{i}"
            m[f"{hp}.input_layernorm.weight"] = (f"{gp}.attn_norm.weight", None)
            m[f"{hp}.post_attention_layernorm.weight"] = (f"{gp}.ffn_norm.weight", None)
            for hf, gg, heads in (
                ("q_proj", "attn_q", a.num_heads),
                ("k_proj", "attn_k", a.num_kv_heads),
                ("v_proj", "attn_v", None),
                ("o_proj", "attn_output", None),
            ):
                m[f"{hp}.self_attn.{hf}.weight"] = (f"{gp}.{gg}.weight", heads)
                m[f"{hp}.self_attn.{hf}.bias"] = (f"{gp}.{gg}.bias", heads)
            for n in ("gate", "up", "down"):
                m[f"{hp}.mlp.{n}_proj.weight"] = (f"{gp}.ffn_{n}.weight", None)
        return m

    def get(self, hf_name: str) -> np.ndarray:
        if hf_name not in self._hf_to_gguf:
            raise WeightFileError(f"{self.path}: no GGUF tensor corresponds to {hf_name!r}")
        name, heads = self._hf_to_gguf[hf_name]
        t = self.tensors.get(name)
        if t is None:
            raise WeightFileError(f"{self.path}: tensor {name!r} is missing")
        qtype = gguf.GGMLQuantizationType(t.tensor_type).name
        if qtype not in SUPPORTED_TYPES:
            raise WeightFileError(f"{self.path}: tensor {name!r} has unsupported type {qtype}")
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as e:
            raise WeightFileError(
                f"{self.path}: tensor {name!r} ({qtype}) could not be dequantized: {e}"
            ) from e
        # GGUF lists dims fastest-first; NumPy order is the reverse (HF's [out, in]).
        want = tuple(int(x) for x in reversed(t.shape))
        if w.size != int(np.prod(want)):
            raise WeightFileError(f"{self.path}: tensor {name!r} is truncated or corrupt")
        w = w.reshape(want)
        if heads is not None:
            w = _unpermute(w, heads) if w.ndim == 2 else _unpermute(w[:, None], heads)[:, 0]
        return w

    def check_names(self) -> None:
        """Up front, before anything is placed: every tensor's type is readable and every
        tensor is one the metadata explains."""
        for name, t in self.tensors.items():
            qtype = gguf.GGMLQuantizationType(t.tensor_type).name
            if qtype not in SUPPORTED_TYPES:
                raise WeightFileError(f"{self.path}: tensor {name!r} has unsupported type {qtype}")
        known = {g for g, _ in self._hf_to_gguf.values()}
        extra = sorted(n for n in self.tensors if n not in known)
        if extra:
            raise WeightFileError(
                f"{self.path}: tensors not explained by the metadata: {extra[:5]}"
            )
