"""Budgets and top-k: which examples a score keeps (DavIR, arXiv 2310.13008, procedure step 3:
score every example, sort descending, keep a budget given as a count or a fraction).

`rank_order` breaks ties by example id so a selection never depends on row order; `Budget` is
the one parser of `all | count=N | fraction=F` for the command line and the config.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

_BUDGET_HELP = "BUDGET is one of: all, fraction=F (0 < F <= 1), count=N (N >= 1)"


def budget_count(n: int, count: int | None = None, fraction: float | None = None) -> int:
    """Number of examples a budget keeps out of `n`; exactly one of count/fraction.

    fraction -> round half up of fraction * n, computed exactly on the fraction's shortest
    decimal form (so 0.07 * 100 is 7, not ceil(7.000000000000001) = 8): `floor(F*n + 1/2)`.
    Errors: count not an int in [1, n]; fraction not in (0, 1]; a fraction that keeps nothing.
    """
    if (count is None) == (fraction is None):
        raise ValueError("give exactly one of count or fraction")
    if n < 1:
        raise ValueError("cannot select from an empty pool")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int | np.integer):
            raise ValueError(f"count must be an integer, got {count!r}")
        if not 1 <= count <= n:
            raise ValueError(f"count={count} is outside [1, {n}] (pool size {n})")
        return int(count)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float | np.floating):
        raise ValueError(f"fraction must be a number, got {fraction!r}")
    f = float(fraction)
    if not (math.isfinite(f) and 0 < f <= 1):
        raise ValueError(f"fraction={fraction} is outside (0, 1]")
    k = math.floor(Fraction(repr(f)) * n + Fraction(1, 2))
    if k < 1:
        raise ValueError(f"fraction={fraction} of {n} examples rounds to 0; use count=1 or more")
    return int(k)


def rank_order(scores: np.ndarray, example_ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Indices of all rows, highest score first, ties by example_id ascending.

    Sorting on (score, id) rather than on position makes the order a function of the
    (id, score) pairs alone, so shuffling the input rows cannot change which rows win.
    """
    s = np.asarray(scores, dtype=np.float64)
    ids = np.asarray(example_ids, dtype=np.str_)
    if s.ndim != 1 or ids.shape != s.shape:
        raise ValueError(f"scores {s.shape} and example_ids {ids.shape} must be 1-D, same length")
    bad = np.isnan(s)
    if bad.any():
        raise ValueError(f"scores are nan for example(s) {list(ids[bad][:5])}")
    # lexsort: last key is primary. -s sorts descending (and -0.0 == 0.0, so no sign ties).
    return np.lexsort((ids, -s)).astype(np.int64)


def select_top(
    scores: np.ndarray,
    example_ids: Sequence[str] | np.ndarray,
    count: int | None = None,
    fraction: float | None = None,
) -> np.ndarray:
    """Indices int64 [k] of the k best rows, best first (ties: example_id ascending).

    k from `budget_count(len(scores), count, fraction)`.
    """
    order = rank_order(scores, example_ids)
    return order[: budget_count(len(order), count, fraction)]


@dataclass(frozen=True)
class Budget:
    """How many examples a pool contributes: `count` (int >= 1), `fraction` (0 < F <= 1), `all`."""

    kind: Literal["count", "fraction", "all"]
    value: int | float | None = None

    def __post_init__(self) -> None:
        if self.kind == "all":
            if self.value is not None:
                raise ValueError("budget 'all' takes no value")
        elif self.kind == "count":
            v = self.value
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"count must be an integer >= 1, got {v!r}")
        elif self.kind == "fraction":
            v = self.value
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            if not (ok and math.isfinite(v) and 0 < v <= 1):
                raise ValueError(f"fraction must be in (0, 1], got {v!r}")
        else:
            raise ValueError(f"unknown budget kind {self.kind!r}; {_BUDGET_HELP}")

    @classmethod
    def coerce(cls, budget: Budget | str | int | float) -> Budget:
        """Budget from a Budget, a CLI string ("all", "count=N", "fraction=F"), an int
        (a count) or a float (a fraction: 1.0 means everything, 1 means one example)."""
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, str):
            return cls.parse(budget)
        if isinstance(budget, bool):
            raise ValueError(f"bad budget {budget!r}; {_BUDGET_HELP}")
        if isinstance(budget, int | np.integer):
            return cls("count", int(budget))
        if isinstance(budget, float | np.floating):
            return cls("fraction", float(budget))
        raise ValueError(f"bad budget {budget!r}; {_BUDGET_HELP}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse the CLI syntax: `all`, `count=3000`, `fraction=0.06`."""
        t = text.strip()
        if t == "all":
            return cls("all")
        key, eq, val = t.partition("=")
        key, val = key.strip(), val.strip()
        if not eq or key not in ("count", "fraction"):
            raise ValueError(f"bad budget {text!r}; {_BUDGET_HELP}")
        if key == "count":
            if not re.fullmatch(r"[0-9]+", val):
                raise ValueError(f"bad budget {text!r}: count must be a whole number >= 1")
            return cls("count", int(val))
        try:
            f = float(val)
        except ValueError:
            raise ValueError(f"bad budget {text!r}: fraction must be a number") from None
        return cls("fraction", f)

    def spec(self) -> str:
        """The CLI form, e.g. `fraction=0.06`."""
        return "all" if self.kind == "all" else f"{self.kind}={self.value}"

    def resolve(self, n: int) -> int:
        """Number of examples kept out of a pool of `n`."""
        if self.kind == "all":
            if n < 1:
                raise ValueError("cannot select from an empty pool")
            return n
        if self.kind == "count":
            return budget_count(n, count=self.value)
        return budget_count(n, fraction=self.value)
