"""The package's floors: imports run one way only (cli -> jobs -> engine, reports -> models,
data -> core), read from the source with `ast` (imports under `if TYPE_CHECKING:` are type
annotations, not dependencies, and are skipped)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "davir_jax"

# floor of each top-level part; a module may import its own part and any part below it, and
# parts on the same floor (models and data; engine and reports) do not import each other.
FLOORS: dict[str, float] = {
    "core": 0,
    "models": 1,
    "data": 1,
    "engine": 2,
    "reports": 2,
    "plugins": 1.5,  # the public extension API: registers into core and models
    "config": 3,
    "jobs": 4,
    "demo": 4,
    "cli": 5,
    "cli_schema": 4.5,  # the options generated from the schema, for cli
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "davir_jax" or len(parts) < 2:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every davir_jax import, outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "davir_jax":  # from davir_jax import x: x is a part
                out += [(node.lineno, f"davir_jax.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in out if m.startswith("davir_jax.")]


def violations() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        here = _part(_module_name(path))
        if here is None or here == "__init__":
            continue
        assert here in FLOORS, f"{path}: a part of the package with no floor; add it to FLOORS"
        for line, module in _imports(path):
            there = _part(module)
            if there is None or there == here:
                continue
            assert there in FLOORS, f"{path}:{line}: imports {module}, a part with no floor"
            if FLOORS[there] >= FLOORS[here]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {here} imports {module}")
    return bad


def test_every_part_of_the_package_has_a_floor():
    parts = {p.stem if p.is_file() else p.name for p in PKG.iterdir()}
    parts = {p for p in parts if not p.startswith("__")}
    assert parts <= set(FLOORS), parts - set(FLOORS)


def test_imports_run_one_way():
    assert violations() == []


def test_the_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a core module importing a job is reported."""
    pkg = tmp_path / "davir_jax"
    (pkg / "core").mkdir(parents=True)
    (pkg / "jobs").mkdir()
    (pkg / "core" / "x.py").write_text("from davir_jax.jobs.sft import fit\n")
    (pkg / "jobs" / "y.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from davir_jax.cli import main\n"
        "from davir_jax.core.x import fit\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    assert violations() == ["davir_jax/core/x.py:1: core imports davir_jax.jobs.sft"]


# Each function reads on one screen (issue 16): the longest in the package, docstring included.
MAX_FUNCTION_LINES = 60


def long_functions(root: Path | None = None) -> list[str]:
    root = PKG if root is None else root
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    rel = path.relative_to(root.parent).as_posix()
                    out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_function_over_60_lines():
    assert long_functions() == []


def test_the_length_rule_catches_a_long_function(tmp_path):
    pkg = tmp_path / "davir_jax"
    pkg.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    (pkg / "m.py").write_text("def short():\n    return 1\n\n\ndef long():\n" + body)
    assert long_functions(pkg) == [f"davir_jax/m.py:5 long ({MAX_FUNCTION_LINES + 1} lines)"]
