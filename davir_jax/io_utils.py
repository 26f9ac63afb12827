"""Atomic writes of files and directories (checkpoints, exports, results), and file hashes."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Content hash of a file, streamed (data files, score tables)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Write `data` to `path` via a temp file in the same directory and os.replace, so readers
    (and a resumed run) see either the old file or the whole new one."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a fully written `tmp` directory to `out`, replacing any previous `out`.

    The old directory is renamed aside first, so a crash leaves either the old or the new copy
    in place (or the old one next to it as `.<name>.old`), never neither.
    """
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def progress_bar(
    total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0
) -> Any:
    """The one progress bar of long work (rate and ETA on stderr, refreshed at most each second)."""
    from tqdm.auto import tqdm

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
