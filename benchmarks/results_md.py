"""Adding a run to benchmarks/RESULTS.md: a new section goes among the current figures, just
above `## History` (the file opens with the current figures; superseded runs live below), and
the file is replaced atomically. Whoever adds a run also updates the current-figures table and
moves the run it supersedes under History."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from davir_jax.core.io import write_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HISTORY = "\n## History\n"


def add_section(text: str, path: Path = RESULTS) -> None:
    """Insert `text` (a Markdown section) before the History heading, or at the end."""
    old = path.read_text(encoding="utf-8")
    section = "\n" + text.strip("\n") + "\n"
    at = old.find(HISTORY)
    new = old.rstrip("\n") + "\n" + section if at < 0 else old[:at] + section + old[at:]
    write_atomic(path, new)
