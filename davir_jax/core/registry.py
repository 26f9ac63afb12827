"""The one rule for the name tables a user extends (preference objectives, selection scores,
model families): a name is a non-empty string, taken once, and what it names is callable. The
errors say which module holds a taken name, so a plugin that clashes knows with whom."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def check_name(name: object, what: str) -> str:
    """`name` if it is a non-empty string; `what` names the kind ("an objective name")."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    return name


def add(
    table: dict[str, Any],
    name: str,
    fn: Any,
    kind: str,
    entry: Any = None,
    owner: Callable[[Any], Any] = lambda e: e,
) -> None:
    """Put `entry` (default `fn`) in `table` under `name`. A name `table` holds is an error
    naming the module of the callable that holds it (`owner(entry)`); so is an `fn` that is not
    callable. `kind` names the table's entries in the messages ("score")."""
    if name in table:
        holder = getattr(owner(table[name]), "__module__", "?")
        raise ValueError(f"{kind} {name!r} is already registered (by {holder})")
    if not callable(fn):
        raise ValueError(f"{kind} {name!r}: {fn!r} is not callable")
    table[name] = fn if entry is None else entry
