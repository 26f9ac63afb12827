"""Atomic publication of output directories (checkpoints, exports, results)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
