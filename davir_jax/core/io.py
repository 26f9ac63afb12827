"""Atomic writes of files and directories (checkpoints, exports, results), strict JSON, and file
hashes."""

from __future__ import annotations

import hashlib
import json
import math
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
