"""Check a job's inputs and outputs before its first expensive step, and lock its output.

Every job (`score`, `sft`, `dpo`, `eval`, `pipeline`) validates all it will read and write up
front, so a typo in the last input fails in a second instead of after hours of training:

* input data files exist, are files, and yield at least one usable example (read until the
  first one; a file of which every row is skipped fails here with the reasons);
* model sources resolve (a path that exists and is a model, or a registered name);
* a `davir select` output has its manifest and every pool file; `dpo.reference_scores` is a
  scores table with `example_id` and `nll_ref`;
* output directories and `data.cache_dir` are directories this process can write (created,
  then probed with a temporary file); errors name the config key and the exact path.

`data.batch_rows` is checked against the mesh first (as each job did before loading anything).
`checked(job)` wraps a job function: the job's check, then the advisory lock of its output
directory (`runs.lock_run_dir`) for the job's duration. In a multi-process run every process
checks, process 0 alone locks and the others follow its decision.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from jax._src import distributed
from jax.experimental import multihost_utils

from davir_jax.core import storage
from davir_jax.core.errors import UserError
from davir_jax.core.runs import RunLockedError, check_batch_rows, lock_run_dir, unlock_run_dir
from davir_jax.core.sharding import mesh_from_config, use_cpu_devices
from davir_jax.data.dataset import no_examples_error
from davir_jax.data.readers import read_examples, read_pairs
from davir_jax.data.skips import DataError, SkipLog
from davir_jax.models.loading import load_tokenizer_for, resolve_source

F = TypeVar("F", bound=Callable[..., Any])

# -- shared helpers ----------------------------------------------------------------------------


def require(cfg: Any, job: str, keys: list[str]) -> None:
    """Raise naming every config key of `keys` (dotted) that is not set."""
    missing = []
    for key in keys:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) is None:
            missing.append(key)
    if missing:
        raise UserError(f"davir {job} needs {', '.join(missing)}")


def writable_dir(path: str | os.PathLike[str], key: str) -> Path:
    """Create directory `path` if needed and prove it writable with a temporary file (a URL:
    with a small probe object, written and deleted)."""
    if storage.is_url(path):
        return _writable_url(path, key)
    p = _local(path, key)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{key}: {p} is a file, not a directory") from None
    except NotADirectoryError:
        parent = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
        raise UserError(
            f"{key}: cannot create {p}: {parent or 'a parent'} is a file, not a directory"
        ) from None
    except OSError as e:
        raise UserError(f"{key}: cannot create {e.filename or p} ({e.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".davir-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{key}: cannot write to {p} ({e.strerror})") from None
    return p


def token_cache_dir(path: str) -> Any:
    """`data.cache_dir`: a writable folder. A URL: the bucket is writable and so is the local
    mirror the array_record files are built in and read from (`storage.mirror_dir`: their
    reader opens local files only)."""
    if storage.is_url(path):
        writable_dir(storage.mirror_dir(path, "tokens"), "data.cache_dir (its local mirror)")
    return writable_dir(path, "data.cache_dir")


def _local(path: str | os.PathLike[str], key: str) -> Path:
    """A local path, refused when it is a URL that lost a '/' (`gs:/b/x`): otherwise an input
    would be "no such file" and an output a local folder called `gs:`."""
    try:
        storage.check_local(path)
    except ValueError as e:
        raise UserError(f"{key}: {e}") from None
    return Path(path)


def _writable_url(path: Any, key: str) -> Any:
    p = storage.upath(path)
    probe = p / f".davir-probe-{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"{key}: cannot write to {p}: {e}") from None
    return p


def input_path(path: str | os.PathLike[str], key: str, want: str = "file") -> Any:
    """`path` exists (a file, or a directory with `want="dir"`, or either with `want="any"`)
    and is readable."""
    if storage.is_url(path):
        return _input_url(path, key, want)
    p = _local(path, key)
    if not p.exists():
        raise UserError(f"{key}: {p}: no such file or directory")
    if want == "file" and p.is_dir():
        raise UserError(f"{key}: {p} is a directory, not a file")
    if want == "dir" and not p.is_dir():
        raise UserError(f"{key}: {p} is not a directory")
    if not os.access(p, os.R_OK):
        raise UserError(f"{key}: {p} is not readable")
    return p


def _input_url(path: Any, key: str, want: str) -> Any:
    p = storage.upath(path)
    try:
        is_dir = p.is_dir()
        if not is_dir and not p.exists():
            raise FileNotFoundError(f"{p}: {storage._missing(str(p))}")
    except OSError as e:
        raise UserError(f"{key}: {e}") from None
    if want == "file" and is_dir:
        raise UserError(f"{key}: {p} is a directory, not a file")
    if want == "dir" and not is_dir:
        raise UserError(f"{key}: {p} is not a directory")
    return p


def data_file(
    path: str | os.PathLike[str],
    key: str,
    fmt: str = "auto",
    fields: dict[str, str] | None = None,
    pairs: bool = False,
    strict: bool = False,
) -> None:
    """A data file exists, its format resolves and it yields a usable example (read until the
    first; a file with none fails with the skip reasons, as `dataset.prepare` would)."""

    input_path(path, key)
    log = SkipLog(strict=strict)
    reader = read_pairs if pairs else read_examples
    try:
        for _ in reader(path, fmt, log, fields=fields or None):
            return
    except DataError as e:
        msg = str(e)
        raise DataError(msg if msg.startswith(f"{key}:") else f"{key}: {msg}") from None
    except OSError as e:
        raise UserError(f"{key}: cannot read {path} ({e.strerror or e})") from None
    raise no_examples_error(path, log)


def model_source(source: str, key: str) -> None:
    """A model source resolves: a model file or directory, or a registered name."""

    try:
        resolve_source(source)
    except (OSError, ValueError) as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(key) else f"{key}: {msg}") from None


def tokenizer_fits(source: str, key: str, models: tuple[str | None, ...] = ()) -> None:
    """The tokenizer of `source` loads and its ids fit `source`'s vocabulary and every model in
    `models` (`loading.load_tokenizer_for`; the job reuses the checked tokenizer)."""

    try:
        load_tokenizer_for(source, models)  # a TokenizerMismatchError names both sources
    except OSError as e:
        raise UserError(f"{key}: cannot load the tokenizer of {source} ({e})") from None


def selection(sel: str, cfg: Any, key: str = "train.selection") -> None:
    """A `davir select` output: its manifest parses and names pools whose files are usable."""
    p = storage.upath(sel)
    manifest_path = p / "manifest.json" if p.is_dir() else p
    if not manifest_path.is_file():
        raise UserError(f"{key}: {sel}: no selection manifest.json (write one with davir select)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: {manifest_path}: not a readable JSON manifest ({e})") from None
    pools = manifest.get("pools") if isinstance(manifest, dict) else None
    if not pools:
        raise UserError(f"{key}: {manifest_path}: the selection has no pools")
    for i, pool in enumerate(pools):
        if not isinstance(pool, dict) or "file" not in pool:
            raise UserError(f"{key}: {manifest_path}: pools[{i}] names no file")
        fmt = pool.get("format") or pool.get("data", {}).get("format", "auto")
        data_file(
            manifest_path.parent / pool["file"],
            f"{key} pool {pool.get('name', i)!r}",
            fmt,
            cfg.data.fields,
            strict=cfg.data.strict,
        )


def scores_table(path: str, key: str, columns: tuple[str, ...]) -> None:
    """A `davir score` output (or its scores.parquet) that has `columns`."""

    p = input_path(path, key, want="any")
    table = p / "scores.parquet" if p.is_dir() else p
    if not table.is_file():
        raise UserError(f"{key}: {p}: no scores.parquet (a davir score output directory)")
    try:
        names = set(storage.read_parquet_schema(table).names)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{key}: {table}: not a readable parquet table ({e})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"{key}: {table}: no column {', '.join(missing)}")
    nll = [c for c in columns if c.startswith("nll_")]
    for c in nll:  # a scoring run without that model writes the column all null
        col = storage.read_parquet(table, columns=[c]).column(0)
        if len(col) and col.null_count == len(col):
            raise UserError(f"{key}: {table}: {c} is empty (that scoring run had no such model)")


def _pool(cfg: Any, pairs: bool = False) -> None:
    d = cfg.data
    data_file(d.path, "data.path", d.format, d.fields, pairs, d.strict)


# -- one check per job: returns the output directories to lock --------------------------------


def _outputs(out: str, key: str, cfg: Any) -> list[Path]:
    """The job's output directory and the data cache, both writable; the output to lock."""
    locked = writable_dir(out, key)
    token_cache_dir(cfg.data.cache_dir)
    return [locked]


def check_score(cfg: Any) -> list[Path]:
    sc = cfg.scoring
    require(cfg, "score", ["scoring.out", "data.path"])
    models = [m for m in ("base", "reference", "proxy") if getattr(sc, m) is not None]
    if not models:
        raise UserError("davir score needs one of scoring.base, scoring.reference, scoring.proxy")
    unset = [m for m in (*sc.ifd, sc.embed) if m is not None and getattr(sc, m) is None]
    if unset:
        raise UserError(f"scoring.ifd or scoring.embed names {unset[0]}, which is not set")
    for m in (*models, "tokenizer"):
        if getattr(sc, m) is not None:
            model_source(getattr(sc, m), f"scoring.{m}")
    tokenizer_fits(
        sc.tokenizer or getattr(sc, models[0]),
        "scoring.tokenizer" if sc.tokenizer else f"scoring.{models[0]}",
        tuple(getattr(sc, m) for m in models),
    )
    _pool(cfg)
    out = writable_dir(sc.out, "scoring.out")
    token_cache_dir(cfg.data.cache_dir)
    return [out]


def check_sft(cfg: Any) -> list[Path]:
    require(cfg, "sft", ["train.out", "model.source"])
    model_source(cfg.model.source, "model.source")
    tokenizer_fits(cfg.model.source, "model.source")
    if cfg.train.selection is not None:
        selection(cfg.train.selection, cfg)
    elif cfg.data.path is None:
        raise UserError("davir sft needs data.path or train.selection")
    else:
        _pool(cfg)
    if cfg.train.val is not None:
        data_file(cfg.train.val, "train.val", cfg.data.format, cfg.data.fields)
    return _outputs(cfg.train.out, "train.out", cfg)


def check_dpo(cfg: Any) -> list[Path]:
    dc = cfg.dpo
    require(cfg, "dpo", ["model.source", "data.path", "train.out"])
    model_source(cfg.model.source, "model.source")
    if dc.reference is not None:
        model_source(dc.reference, "dpo.reference")
    tokenizer_fits(cfg.model.source, "model.source", (dc.reference,))
    _pool(cfg, pairs=True)
    if dc.reference_scores is not None:
        scores_table(dc.reference_scores, "dpo.reference_scores", ("example_id", "nll_ref"))
    return _outputs(cfg.train.out, "train.out", cfg)


def check_eval(cfg: Any) -> list[Path]:
    require(cfg, "eval", ["model.source", "data.path"])
    model_source(cfg.model.source, "model.source")
    tokenizer_fits(cfg.model.source, "model.source")
    _pool(cfg)
    token_cache_dir(cfg.data.cache_dir)
    return [] if cfg.eval.out is None else [writable_dir(cfg.eval.out, "eval.out")]


def _method_inputs(cfg: Any) -> None:
    """Every pipeline method's score and filters read columns the scoring stage will write,
    and an embedding diversity step has `scoring.embed`: found now, not after the reference."""
    from davir_jax.core.selection import SelectionMethod

    sc = cfg.scoring
    have = {"nll_base", "nll_ref"} | ({"nll_proxy", "nll_proxy_alone"} if sc.proxy else set())
    have |= {f"{'nll_ref' if m == 'reference' else 'nll_' + m}_alone" for m in sc.ifd}
    for spec in cfg.pipeline.methods:
        cols, embeds = SelectionMethod.parse(spec).needs()
        if missing := sorted(cols - have):
            raise UserError(
                f"pipeline.methods: {spec!r} reads {', '.join(missing)}, which the scoring "
                "stage will not write (set scoring.ifd, or scoring.proxy)"
            )
        if embeds and sc.embed is None:
            raise UserError(f"pipeline.methods: {spec!r} needs embeddings: set scoring.embed=base")


def check_pipeline(cfg: Any) -> list[Path]:
    pc, d = cfg.pipeline, cfg.data
    require(cfg, "pipeline", ["pipeline.out", "data.path", "model.source"])
    model_source(cfg.model.source, "model.source")
    if pc.reference is not None:
        model_source(pc.reference, "pipeline.reference")
    sc = cfg.scoring
    if sc.proxy is not None:
        model_source(sc.proxy, "scoring.proxy")
    if "proxy" in (*sc.ifd, sc.embed) and sc.proxy is None:
        raise UserError("scoring.ifd or scoring.embed names the proxy but scoring.proxy is not set")
    tokenizer_fits(cfg.model.source, "model.source", (pc.reference, sc.proxy))
    _method_inputs(cfg)
    _pool(cfg)
    for key in ("test", "val"):
        if getattr(pc, key) is not None:
            # Read with the pool's format settings, never strict (as the pipeline runs it).
            data_file(getattr(pc, key), f"pipeline.{key}", d.format, d.fields)
    for i, spec in enumerate(pc.extra_pools):
        name, eq, file = spec.partition("=")
        if not eq or not name:
            raise UserError(f"pipeline.extra_pools[{i}]: {spec!r} is not NAME=FILE")
        data_file(file, f"pipeline.extra_pools[{i}] ({name})")
    out = writable_dir(pc.out, "pipeline.out")
    token_cache_dir(d.cache_dir)
    return [out]


CHECKS: dict[str, Callable[[Any], list[Path]]] = {
    "score": check_score,
    "sft": check_sft,
    "dpo": check_dpo,
    "eval": check_eval,
    "pipeline": check_pipeline,
}


def _process() -> tuple[int, int]:
    """(process index, count) without starting JAX's backends (which would fix the CPU device
    count before `mesh.cpu_devices` is applied)."""
    try:
        state = distributed.global_state
        return int(state.process_id or 0), int(state.num_processes or 1)
    except (ImportError, AttributeError):
        return int(os.environ.get("DAVIR_PROCESS_ID", "0")), int(
            os.environ.get("DAVIR_NUM_PROCESSES", "1")
        )


def batch_rows(cfg: Any, mesh: Any = None) -> None:
    """`data.batch_rows` splits over the mesh's data-parallel devices and the processes. The
    mesh is made as the job makes it (`mesh_from_config` applies `mesh.cpu_devices` before JAX
    starts), so this starts JAX's backends, as the job's first step would."""

    check_batch_rows(cfg, mesh if mesh is not None else mesh_from_config(cfg.mesh))


@contextlib.contextmanager
def preflight(job: str, cfg: Any, mesh: Any = None) -> Any:
    """Check `cfg` for `job` (the config first, then every file and directory), then hold the
    lock of its output directories while the block runs. `mesh`: the job's, if given."""

    batch_rows(cfg, mesh)
    outs = CHECKS[job](cfg)
    pi, pc = _process()
    locked: list[Path] = []
    error: RunLockedError | None = None
    try:
        if pi == 0:
            for out in outs:
                try:
                    lock_run_dir(out, f"davir {job}")
                except RunLockedError as e:
                    error = e
                    break
                locked.append(out)
        if pc > 1:
            # The others follow process 0's decision (so none waits on a process that stopped).

            use_cpu_devices(cfg.mesh.cpu_devices)  # before the collective starts the backends
            ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
            if not ok and error is None:
                error = RunLockedError(
                    f"{', '.join(map(str, outs))}: process 0 found the output directory in use"
                )
        if error is not None:
            raise error
        yield
    finally:
        for out in reversed(locked):
            unlock_run_dir(out)


def checked(job: str) -> Callable[[F], F]:
    """Decorate a job function `fn(cfg, ...)`: `preflight(job, cfg)` around every call, so the
    library entry point is checked and locked as the command is."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def run(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            # score/sft/dpo(cfg, progress, mesh): the mesh a caller passes is the job's mesh.
            mesh = kwargs.get("mesh", args[1] if len(args) > 1 else None)
            with preflight(job, cfg, mesh):
                return fn(cfg, *args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap
