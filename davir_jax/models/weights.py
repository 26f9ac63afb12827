"""Weight import and export: one table maps our parameters to Hugging Face tensor names.

The same table serves HF safetensors import, GGUF import (after GGUF names are mapped to HF
names) and `export_hf`, so the three cannot drift apart. Import builds the abstract model with
`nnx.eval_shape`, derives each parameter's sharding, then reads the file tensor by tensor and
places each one straight into its sharding: the whole model is never gathered on one host.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from davir_jax.core import storage
from davir_jax.core.io import dumps_json, publish_dir, temp_dir
from davir_jax.core.sharding import state_shardings
from davir_jax.models.arch import ArchConfig
from davir_jax.models.decoder import Decoder, RunConfig, to_dtype
from davir_jax.models.safetensors_io import (
    SafetensorsFile,
    WeightFileError,
    write_streaming,
)


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: our state path, the HF tensor name, and the layout conversions."""

    path: str
    hf_name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _ident(w: np.ndarray) -> np.ndarray:
    return w


def _t(w: np.ndarray) -> np.ndarray:
    return w.T


def param_table(arch: ArchConfig) -> list[TensorMap]:
    """Every parameter of `Decoder(arch)` with its HF name (HF weights are `[out, in]`)."""
    e, hd = arch.hidden_size, arch.resolved_head_dim
    h = arch.num_heads

    def in_proj(n: int) -> tuple[Callable, Callable]:  # [n*hd, e] <-> [e, n, hd]
        return (lambda w: w.T.reshape(e, n, hd)), (lambda w: w.reshape(e, n * hd).T)

    def head_bias(n: int) -> tuple[Callable, Callable]:  # [n*hd] <-> [n, hd]
        return (lambda b: b.reshape(n, hd)), (lambda b: b.reshape(n * hd))

    out_proj = (lambda w: w.T.reshape(h, hd, e)), (lambda w: w.reshape(h * hd, e).T)

    rows = [TensorMap("embed", "model.embed_tokens.weight", _ident, _ident)]
    for i in range(arch.num_layers):
        rows += _layer_rows(arch, f"layers.{i}", f"model.layers.{i}", in_proj, out_proj, head_bias)
    rows.append(TensorMap("final_norm.scale", "model.norm.weight", _ident, _ident))
    if not arch.tie_embeddings:
        rows.append(TensorMap("lm_head", "lm_head.weight", _t, _t))
    return rows


def _layer_rows(
    arch: ArchConfig, p: str, hp: str, in_proj: Callable, out_proj: tuple, head_bias: Callable
) -> list[TensorMap]:
    """The parameters of one decoder layer (`p` here, `hp` in HF names)."""
    h, k = arch.num_heads, arch.num_kv_heads
    rows = [
        TensorMap(f"{p}.input_norm.scale", f"{hp}.input_layernorm.weight", _ident, _ident),
        TensorMap(
            f"{p}.post_attn_norm.scale", f"{hp}.post_attention_layernorm.weight", _ident, _ident
        ),
        TensorMap(f"{p}.attn.q_proj", f"{hp}.self_attn.q_proj.weight", *in_proj(h)),
        TensorMap(f"{p}.attn.k_proj", f"{hp}.self_attn.k_proj.weight", *in_proj(k)),
        TensorMap(f"{p}.attn.v_proj", f"{hp}.self_attn.v_proj.weight", *in_proj(k)),
        TensorMap(f"{p}.attn.o_proj", f"{hp}.self_attn.o_proj.weight", *out_proj),
        TensorMap(f"{p}.mlp.gate_proj", f"{hp}.mlp.gate_proj.weight", _t, _t),
        TensorMap(f"{p}.mlp.up_proj", f"{hp}.mlp.up_proj.weight", _t, _t),
        TensorMap(f"{p}.mlp.down_proj", f"{hp}.mlp.down_proj.weight", _t, _t),
    ]
    if arch.family == "gemma2":
        rows += [
            TensorMap(
                f"{p}.pre_mlp_norm.scale",
                f"{hp}.pre_feedforward_layernorm.weight",
                _ident,
                _ident,
            ),
            TensorMap(
                f"{p}.post_mlp_norm.scale",
                f"{hp}.post_feedforward_layernorm.weight",
                _ident,
                _ident,
            ),
        ]
    if arch.qkv_bias:
        rows += [
            TensorMap(f"{p}.attn.q_bias", f"{hp}.self_attn.q_proj.bias", *head_bias(h)),
            TensorMap(f"{p}.attn.k_bias", f"{hp}.self_attn.k_proj.bias", *head_bias(k)),
            TensorMap(f"{p}.attn.v_bias", f"{hp}.self_attn.v_proj.bias", *head_bias(k)),
        ]
    if arch.o_bias:
        rows.append(TensorMap(f"{p}.attn.o_bias", f"{hp}.self_attn.o_proj.bias", _ident, _ident))
    if arch.mlp_bias:
        rows += [
            TensorMap(f"{p}.mlp.{n}_bias", f"{hp}.mlp.{n}_proj.bias", _ident, _ident)
            for n in ("gate", "up", "down")
        ]
    return rows


# HF tensors that carry no information for us (buffers some old checkpoints saved).
_BENIGN_EXTRA = ("rotary_emb.inv_freq",)


def path_str(key_path: tuple[Any, ...]) -> str:
    parts = []
    for k in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    # nnx State leaves may end in a `.value`-like accessor; keep module/param names only.
    return ".".join(p for p in parts if p not in ("value", "raw_value"))


def iter_params(model_or_state: Any) -> Iterator[tuple[str, nnx.Variable]]:
    """(dotted path, Variable) for every nnx.Param, in a stable order."""
    state = (
        model_or_state
        if isinstance(model_or_state, nnx.State)
        else nnx.state(model_or_state, nnx.Param)
    )
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    for kp, v in leaves:
        yield path_str(kp), v


def abstract_model(arch: ArchConfig, run: RunConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and abstract (shape-only) state of `Decoder(arch)`: no memory used."""
    abstract = nnx.eval_shape(lambda: Decoder(arch, run, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def build_model(
    arch: ArchConfig,
    run: RunConfig,
    mesh: Mesh | None,
    get_hf: Callable[[str], np.ndarray],
    source: str | Callable[[str], str],
) -> Decoder:
    """Create a Decoder whose parameters come from `get_hf(hf_name)`, placed shard by shard.

    Each tensor is converted to our layout, shape-checked against the abstract model, cast to the
    parameter dtype and handed to `jax.make_array_from_callback`, which copies to each device
    only its own slice.
    """
    graphdef, abs_state = abstract_model(arch, run)
    shardings = state_shardings(abs_state, mesh)
    want = {p: v for p, v in iter_params(abs_state)}
    sh = dict(iter_params(shardings))
    table = {t.path: t for t in param_table(arch)}
    if set(table) != set(want):
        raise AssertionError(f"weight table and model disagree: {set(table) ^ set(want)}")
    pd = to_dtype(run.param_dtype)
    values: dict[str, jax.Array] = {}
    for t in table.values():  # HF order: errors name the first bad tensor a reader expects
        path, abs_var = t.path, want[t.path]
        shape = tuple(abs_var.get_value().shape)
        hf_shape = jax.eval_shape(t.to_hf, jax.ShapeDtypeStruct(shape, np.float32)).shape
        raw = get_hf(t.hf_name)
        if tuple(raw.shape) != tuple(hf_shape):
            where = source(t.hf_name) if callable(source) else source
            raise WeightFileError(
                f"{where}: tensor {t.hf_name!r} has shape {tuple(raw.shape)} in the file but "
                f"the config implies {tuple(hf_shape)}"
            )
        host = np.asarray(t.to_ours(raw))
        host = host.astype(pd)
        sharding = sh[path].get_value() if isinstance(sh[path], nnx.Variable) else sh[path]
        values[path] = jax.make_array_from_callback(shape, sharding, lambda idx, a=host: a[idx])

    def fill(kp: tuple[Any, ...], v: Any) -> Any:
        if isinstance(v, nnx.Variable) and path_str(kp) in values:
            return v.replace(values[path_str(kp)])
        return v

    state = jax.tree_util.tree_map_with_path(
        fill, abs_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.merge(graphdef, state)


# -- Hugging Face safetensors -----------------------------------------------------------------


class HFWeights:
    """The tensors of an HF directory: `model.safetensors` or sharded with an index."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightFileError(f"{index}: not a safetensors index ({e})") from e
            for name, fname in weight_map.items():
                if fname not in self.files:
                    self.files[fname] = SafetensorsFile(self.dir / fname)
                self.where[name] = fname
        elif single.is_file():
            self.files["model.safetensors"] = SafetensorsFile(single)
            self.where = {n: "model.safetensors" for n in self.files["model.safetensors"].keys()}
        else:
            if any(self.dir.glob("*.bin")) or any(self.dir.glob("*.pt")):
                raise WeightFileError(
                    f"{self.dir}: only pickle weights (*.bin/*.pt) found; davir-jax reads "
                    "safetensors only (convert them with a trusted tool first)"
                )
            raise WeightFileError(
                f"{self.dir}: no model.safetensors or model.safetensors.index.json"
            )

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise WeightFileError(f"{self.dir}: tensor {name!r} is missing from the weights")
        return self.files[self.where[name]].get(name)

    def file_of(self, name: str) -> str:
        return str(self.dir / self.where.get(name, "model.safetensors"))

    def check_names(self, arch: ArchConfig) -> None:
        """Refuse weights with tensors the config does not explain (e.g. more layers)."""
        expected = {t.hf_name for t in param_table(arch)}
        if arch.tie_embeddings:
            expected.add("lm_head.weight")  # some tied checkpoints still store it
        extra = sorted(n for n in self.where if n not in expected and not n.endswith(_BENIGN_EXTRA))
        if extra:
            raise WeightFileError(
                f"{self.dir}: tensors not explained by config.json: {extra[:5]}"
                f"{' ...' if len(extra) > 5 else ''} (config and weights disagree)"
            )


def load_hf(directory: str | os.PathLike, run: RunConfig, mesh: Mesh | None) -> Decoder:
    directory = Path(directory)
    arch = ArchConfig.from_hf_file(directory / "config.json")
    weights = HFWeights(directory)
    weights.check_names(arch)
    return build_model(arch, run, mesh, weights.get, weights.file_of)


# -- export ------------------------------------------------------------------------------------


def _to_host(x: jax.Array) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(model: Decoder) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) for every parameter, gathered to the host one tensor at a time."""
    params = dict(iter_params(model))
    for t in param_table(model.arch):
        yield t.hf_name, np.ascontiguousarray(t.to_hf(_to_host(params[t.path].get_value())))


def export_hf(model: Decoder, tokenizer: Any | None, out_dir: str | os.PathLike) -> Path:
    """Write an HF directory (`config.json`, `model.safetensors`, tokenizer files) that
    `transformers.AutoModelForCausalLM` / `AutoTokenizer` load offline with the same logits.

    The directory appears atomically: everything is written to a sibling temp dir and renamed.
    A model with LoRA adapters is exported merged (`lora.merge_lora`) or as PEFT adapters.
    """
    if nnx.state(model, nnx.LoRAParam):
        raise ValueError("export_hf: the model has LoRA adapters; merge them first (merge_lora)")
    out = storage.upath(out_dir)  # a local path or a URL (gs://: published with its marker)
    # Every process makes its own temp folder (unique name); only process 0 fills and publishes.
    tmp = temp_dir(out)
    try:
        cfg = model.arch.to_hf()
        cfg["torch_dtype"] = model.run.param_dtype
        params = dict(iter_params(model))
        table = param_table(model.arch)
        specs = []
        for t in table:
            v = params[t.path].get_value()
            hf = jax.eval_shape(t.to_hf, jax.ShapeDtypeStruct(v.shape, v.dtype))
            specs.append((t.hf_name, tuple(hf.shape), np.dtype(hf.dtype)))
        # Every process gathers (a collective on multi-host); process 0 writes, streaming one
        # tensor at a time so host memory holds a single tensor, not the model.
        arrays = (a for _, a in hf_tensors(model))
        if jax.process_index() == 0:
            (tmp / "config.json").write_text(dumps_json(cfg, indent=2))
            write_streaming(specs, arrays, tmp / "model.safetensors")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            publish_dir(tmp, out)
        else:
            for _ in arrays:  # take part in every gather
                pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def sharding_of(model: Decoder) -> dict[str, NamedSharding | PartitionSpec]:
    """Each parameter's sharding, by dotted path (for inspection and tests)."""
    return {p: v.get_value().sharding for p, v in iter_params(model)}
