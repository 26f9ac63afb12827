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


_FILTER_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(<=|>=|<|>)\s*(\S+)\s*")
_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


@dataclass(frozen=True)
class ScoreFilter:
    """Keep the examples whose score `name` satisfies `op value` (e.g. `ifd<1`, Cherry LLM's
    and Superfiltering's rule: IFD >= 1 means the instruction does not help the response).

    Filters and the ranking score are independent: `davir select --method davir --filter
    "ifd<1"` ranks the examples that pass by DavIR.
    """

    name: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str) -> ScoreFilter:
        """`SCORE<VALUE`, `SCORE<=VALUE`, `SCORE>VALUE` or `SCORE>=VALUE`."""
        m = _FILTER_RE.fullmatch(text)
        if not m:
            raise ValueError(f"bad filter {text!r}: expected SCORE<VALUE (also <=, >, >=)")
        try:
            value = float(m.group(3))
        except ValueError:
            raise ValueError(f"bad filter {text!r}: {m.group(3)!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"bad filter {text!r}: the value must be finite")
        return cls(m.group(1), m.group(2), value)

    def spec(self) -> str:
        return f"{self.name}{self.op}{self.value:g}"

    def keep(self, scores: np.ndarray) -> np.ndarray:
        """bool [N]: which rows pass."""
        return _OPS[self.op](np.asarray(scores, np.float64), self.value)


_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class SelectionMethod:
    """A pipeline selection method: a score, optional filters and diversity steps, and the
    label its runs are named by. Text form `SCORE` (label = score) or
    `LABEL=SCORE[;filter=EXPR]...[;diversity=STEP]...`, e.g. `cherry=ifd;filter=ifd<1` (Cherry
    LLM: IFD, instruction-helps rows only) or `davir_deita=davir;diversity=threshold`."""

    label: str
    score: str
    filters: tuple[str, ...] = ()
    diversity: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> SelectionMethod:
        from davir_jax.core.diversity import DiversityStep
        from davir_jax.core.scores import SCORES

        head, *opts = (x.strip() for x in spec.split(";"))
        label, eq, score = head.partition("=")
        score = score.strip() if eq else label.strip()
        label = label.strip()
        if not _LABEL_RE.fullmatch(label):
            raise ValueError(f"method {spec!r}: bad label {label!r} (letters, digits, . _ -)")
        if score not in SCORES:
            raise ValueError(
                f"method {spec!r}: {score!r} is not among the scores {', '.join(SCORES)} "
                "(a plugin's score needs --plugins FILE or the config's plugins key)"
            )
        found: dict[str, list[str]] = {"filter": [], "diversity": []}
        for opt in opts:
            key, eq, value = opt.partition("=")
            if not eq or key.strip() not in found:
                raise ValueError(f"method {spec!r}: {opt!r} is not filter=EXPR or diversity=STEP")
            found[key.strip()].append(value.strip())
        for f in found["filter"]:
            if (name := ScoreFilter.parse(f).name) not in SCORES:
                raise ValueError(f"method {spec!r}: filter score {name!r} is not a score")
        for d in found["diversity"]:
            DiversityStep.parse(d)
        return cls(label, score, tuple(found["filter"]), tuple(found["diversity"]))

    def needs(self) -> tuple[set[str], bool]:
        """(the NLL columns its score and filters read, whether it needs embeddings)."""
        from davir_jax.core.diversity import DiversityStep
        from davir_jax.core.scores import DEFAULT_NEEDS, SCORE_NEEDS

        names = [self.score, *(ScoreFilter.parse(f).name for f in self.filters)]
        cols = {c for n in names for c in SCORE_NEEDS.get(n, DEFAULT_NEEDS)}
        return cols, any(DiversityStep.parse(d).kind == "pick" for d in self.diversity)
