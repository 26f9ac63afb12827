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

A target may be a URL (`gs://...`, `core.storage`): an object store has no atomic rename, so a
file is built in a local temp file and uploaded as one object (visible only once whole), and a
folder is built locally, uploaded file by file, and committed by a marker written last
(`storage.PUBLISHED`, which readers require: `storage.is_published`).
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

from davir_jax.core import storage


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, streamed (data files, score tables)."""
    h = hashlib.sha256()
    with storage.upath(path).open("rb") as f:
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
    for large files (weights) whose loss after a power cut would cost a long rebuild. A URL
    target: the temp file is local and uploaded as one object when the block ends.
    """
    if storage.is_url(path):
        with tempfile.TemporaryDirectory(prefix=".davir-upload-") as d:
            local = Path(d) / "object"
            with open(local, "wb") as f:
                yield f
            storage.upload(local, path)
        return
    storage.check_local(path)
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
    `publish_dir`; unique, so several processes may each build one for the same `out`. For a
    URL `out`, a local temp folder."""
    if storage.is_url(out):
        return Path(tempfile.mkdtemp(prefix=".davir-publish-"))
    storage.check_local(out)
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

    A URL `out` (object store): its marker is deleted first (readers stop trusting it), the old
    objects next, then `tmp`'s files are uploaded and the marker written last; `tmp` is removed.
    A crash leaves a folder without its marker, which readers refuse and a rerun replaces.
    """
    if storage.is_url(out):
        _publish_url(tmp, str(out))
        return
    tmp, out = Path(tmp), Path(out)
    old = out.with_name(f"{_old_prefix(out)}{uuid.uuid4().hex}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _publish_url(tmp: Any, out: str) -> None:
    """`publish_dir` to a URL, from a local folder or from another published URL folder (a
    run's best epoch promoted to its model: copied object by object). The marker goes first
    (readers stop trusting the folder), the new files overwrite the old ones (each object is
    replaced whole), the old files the new set lacks are deleted, and the marker is written
    last, with a new id. A source URL folder loses its marker before its other files."""
    target = storage.upath(out)
    fs = storage.filesystem(out)
    src = storage.upath(tmp) if storage.is_url(tmp) else None
    files = None if src is None else storage.published_files(src)
    if src is not None and files is None:  # checked before `out` is touched
        raise FileNotFoundError(f"{src}: not a published folder ({storage.PUBLISHED} missing)")
    (target / storage.PUBLISHED).unlink(missing_ok=True)
    if src is not None:
        for rel in files:
            with storage.named_errors(src / rel, "copying"):
                fs.copy(str(src / rel), str(target / rel))
    else:
        tmp = Path(tmp)
        files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
        storage.upload_dir(tmp, out)
    keep = set(files)
    for rel in storage.list_files(target):
        if rel not in keep:
            (target / rel).unlink(missing_ok=True)
    # A new id per publication: copies of the folder (`storage.local_copy`) are keyed by it.
    write_json(target / storage.PUBLISHED, {"files": files, "id": uuid.uuid4().hex})
    if storage.is_url(tmp):
        (storage.upath(tmp) / storage.PUBLISHED).unlink(missing_ok=True)
    storage.rmtree(tmp)


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
    On an object store (a URL), builds are local temp folders and there is nothing to clear.
    """
    if storage.is_url(out):
        return
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
