"""Atomic writes of files and directories (checkpoints, exports, results, token stores), strict
JSON, and file hashes.

One family publishes everything the package writes, so a reader (or a resumed run) sees either
the old version or the whole new one, never a half-written file or folder:

- files: `atomic_file` (stream into it), `write_atomic` (bytes or text), `write_json`;
  temp names ``.<name>.tmp-*`` next to the target.
- folders: `temp_dir` + `publish_dir`, or `atomic_dir` for both; temp names ``.tmp-<name>-*``
  and ``.old-<name>-*`` next to the target, which `remove_leftovers` clears after a crash.

Everything published gets the modes a plain `open`/`mkdir` would give (`umask_mode`), not the
private 0600/0700 of `tempfile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, streamed (data files, score tables)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def umask_mode(directory: bool = False) -> int:
    """The mode `open`/`mkdir` would give a new file (0o666) or folder (0o777) under the process
    umask: `tempfile.mkstemp` makes 0600 files and `mkdtemp` 0700 folders, which an atomic
    write (temp, then rename) would otherwise publish as private."""
    mask = None
    try:
        with open("/proc/self/status") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    except OSError:
        pass
    if mask is None:  # elsewhere: set and restore (not thread-safe, hence the fallback only)
        mask = os.umask(0o022)
        os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], fsync: bool = False) -> Iterator[IO[bytes]]:
    """A binary file object whose content replaces `path` when the block ends without error.

    Written to a temp file in the same folder (same file system, so the final `os.replace` is
    atomic) and removed if the block raises. `fsync`: flush the data to disk before the rename,
    for large files (weights) whose loss after a power cut would cost a long rebuild.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically (`atomic_file`)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_file(path) as f:
        f.write(data)


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf; Python or NumPy) as None, NumPy scalars and
    arrays as plain Python values: what a strict JSON parser accepts (NaN is not JSON)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    tolist = getattr(obj, "tolist", None)  # NumPy scalars and arrays (without importing NumPy)
    if tolist is not None and hasattr(obj, "dtype"):
        return strict_json(tolist())
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that always writes strict JSON (non-finite floats become null)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def write_json(
    path: str | os.PathLike[str], obj: Any, indent: int | None = 1, **kwargs: Any
) -> None:
    """Write `obj` to `path` as strict JSON (see `dumps_json`), atomically (`write_atomic`).
    Every JSON file the package writes goes through here or `dumps_json`."""
    write_atomic(path, dumps_json(obj, indent=indent, **kwargs))


def _tmp_prefix(out: Path) -> str:
    return f".tmp-{out.name}-"


def _old_prefix(out: Path) -> str:
    return f".old-{out.name}-"


def temp_dir(out: str | os.PathLike[str]) -> Path:
    """A new, empty folder next to `out` (creating `out`'s parent), to fill and then hand to
    `publish_dir`; unique, so several processes may each build one for the same `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
    tmp.chmod(umask_mode(directory=True))  # mkdtemp makes 0700; what we publish is for sharing
    return tmp


def publish_dir(tmp: str | os.PathLike[str], out: str | os.PathLike[str]) -> None:
    """Move a fully written `tmp` folder to `out`, replacing any previous `out`.

    `os.replace` cannot replace a non-empty folder, so the old one is first renamed aside (under
    a unique name, so concurrent publishers never collide) and deleted after the swap: a crash
    leaves the old or the new copy in place (the old one perhaps next to it as ``.old-<name>-*``,
    see `remove_leftovers`), never neither.
    """
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f"{_old_prefix(out)}{uuid.uuid4().hex}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp folder (`temp_dir`) to fill in the block; published as `out` when the block ends
    without error (`publish_dir`), removed if it raises."""
    tmp = temp_dir(out)
    try:
        yield tmp
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_leftovers(out: str | os.PathLike[str]) -> None:
    """Delete the temp and set-aside folders a crashed build or publish of `out` left next to it.

    Only for a caller that is the one writer of `out` at this time: another process's build in
    progress would be deleted too.
    """
    out = Path(out)
    for prefix in (_tmp_prefix(out), _old_prefix(out)):
        for stale in out.parent.glob(f"{prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)


def progress_bar(
    total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0
) -> Any:
    """The one progress bar of long work (rate and ETA on stderr, refreshed at most each second)."""

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )
