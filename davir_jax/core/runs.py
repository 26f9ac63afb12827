"""Run directories that refuse to mix: `run.json` records what a run is (models, data, config);
a rerun with the same identity resumes, a different one is refused unless `overwrite`.

Run directories that refuse to be shared: a job holds an advisory lock (`fcntl.flock`) on
`OUT/.davir.lock` while it runs, so a second process started into the same directory stops at
once, naming the holder, instead of doing all the work again and racing on the same files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils

from davir_jax.core import storage
from davir_jax.core.errors import UserError
from davir_jax.core.io import dumps_json, write_json
from davir_jax.core.sharding import data_parallel_size

RUN_FILE = "run.json"
LOCK_FILE = ".davir.lock"


class MixedRunError(UserError):
    """The output directory holds another run's results (other models, data or settings)."""


class RunLockedError(UserError):
    """Another process holds the lock of the output directory."""


# Locks this process holds: resolved directory -> [fd, depth]. flock locks belong to an open
# file, so a second open in the same process would block on itself; nested jobs re-enter.
_HELD: dict[str, list[int]] = {}


def lock_run_dir(out: str | os.PathLike[str], what: str = "davir job") -> None:
    """Take the advisory lock of run directory `out` (created if needed) or raise
    `RunLockedError` at once naming the holder (pid, host, start time, command). Re-entrant
    within a process; `unlock_run_dir` releases one level.

    A URL (an object store) has no advisory lock: only this process's nesting is tracked, and
    one job per run directory in a bucket is the user's to ensure (the README says so)."""
    key = _lock_key(out)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    if storage.is_url(out):
        _HELD[key] = [-1, 1]
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raw = os.pread(fd, 4096, 0)
        os.close(fd)
        try:
            h = json.loads(raw)
            holder = (
                f"pid {h['pid']} on {h['host']}, started {h['started']}, running {h['what']}: "
                f"{h['command']}"
            )
        except (ValueError, KeyError, TypeError):
            holder = "a process that has not written its details yet"
        raise RunLockedError(
            f"{out} is in use by another davir process ({holder}); wait for it to finish, or "
            "use another output directory"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "what": what,
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (dumps_json(info) + "\n").encode(), 0)
    _HELD[key] = [fd, 1]


def unlock_run_dir(out: str | os.PathLike[str]) -> None:
    """Release one level of this process's lock on `out` (the file stays: removing it would let
    a waiting process lock a file that a third one no longer sees)."""
    key = _lock_key(out)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        if held[0] < 0:  # a URL: nothing was locked
            return
        fcntl.flock(held[0], fcntl.LOCK_UN)
        os.close(held[0])


def _lock_key(out: str | os.PathLike[str]) -> str:
    return str(out).rstrip("/") if storage.is_url(out) else os.path.realpath(out)


def holds_lock(out: str | os.PathLike[str]) -> bool:
    return _lock_key(out) in _HELD


@contextlib.contextmanager
def locked_run_dir(out: str | os.PathLike[str], what: str = "davir job") -> Iterator[None]:
    """`lock_run_dir` for the duration of a `with` block."""
    lock_run_dir(out, what)
    try:
        yield
    finally:
        unlock_run_dir(out)


def _clear_dir(out: Any) -> None:
    """Remove everything in `out` except its lock file (held by this process)."""
    for p in out.iterdir():
        if p.name == LOCK_FILE:
            continue
        if isinstance(p, Path) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)  # local: a folder that cannot be removed is an error, as before
        elif not isinstance(p, Path) and p.is_dir():
            storage.rmtree(p)
        else:
            p.unlink()


def _contents(out: Any) -> list[Any]:
    return [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []


def batching_identity(cfg: Any) -> dict[str, Any]:
    """The batch layout of a run (it decides which examples share a step)."""
    d = cfg.data
    return {
        "pack": d.pack,
        "row_len": d.packed_row_len,
        "max_segments": d.max_segments,
        "bucket_min": d.bucket_min,
        "batch_rows": d.batch_rows,
    }


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def claim_run_dir(out: Any, identity: dict[str, Any], overwrite: bool, what: str) -> None:
    """Make `out` (a local path or URL) this run's directory: keep it if it holds the same run
    (resume), refuse it if it holds another run or anything else, unless `overwrite` (then start
    afresh). Process 0 decides, holding the directory's lock (taken here unless the job already
    holds it); every process returns only once it has."""
    out = storage.upath(out)
    run_file = out / RUN_FILE
    if jax.process_index() == 0:
        if not holds_lock(out):
            lock_run_dir(out, what)  # a caller without `preflight.checked`: held until exit
        if run_file.is_file():
            old = json.loads(run_file.read_text())
            if old != identity:
                if not overwrite:
                    diff = sorted(
                        k for k in set(old) | set(identity) if old.get(k) != identity.get(k)
                    )
                    raise MixedRunError(
                        f"{out} holds another {what} (different {', '.join(diff)}); use another "
                        "output directory, or --overwrite to discard it"
                    )
                _clear_dir(out)
        elif _contents(out):
            if not overwrite:
                raise MixedRunError(
                    f"{out} is not empty and is not a {what}; use another output directory or "
                    "--overwrite"
                )
            _clear_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        if not run_file.is_file():
            write_json(run_file, identity, sort_keys=True)
    _barrier(f"davir claim {out}")
    if json.loads(run_file.read_text()) != identity:
        raise MixedRunError(f"{out}: process {jax.process_index()} sees a different run")


def check_batch_rows(cfg: Any, mesh: Any) -> None:
    """Global batch rows must split evenly over the data-parallel devices and the processes."""
    dp, pc = data_parallel_size(mesh), jax.process_count()
    if cfg.data.batch_rows % dp or cfg.data.batch_rows % pc:
        raise ValueError(
            f"data.batch_rows={cfg.data.batch_rows} must be a multiple of the data-parallel size "
            f"{dp} (mesh data*fsdp, over {mesh.size} devices; mesh.cpu_devices sets how many a "
            f"CPU host has) and of the process count {pc}"
        )
