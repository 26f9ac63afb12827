"""Score functions for data selection: DavIR and its baselines, as a small registry.

Every score is a pure NumPy function of the per-example columns a scoring job writes
(`nll_base` = L_base, `nll_ref` = L_ref, both summed over the response tokens, and
`n_tokens` = T, response tokens including EOS) and returns float64 [N]. Convention for all
scores: **higher = selected first**. See DavIR, arXiv 2310.13008, and docs/method.md.

| name            | formula                  | notes                                              |
| --------------- | ------------------------ | -------------------------------------------------- |
| `davir`         | (L_base - L_ref)/L_base  | the method (paper Eq. for the DavIR score)         |
| `rho`           | L_base - L_ref           | RHO-LOSS for causal LMs; DPO implicit reward       |
| `rho_per_token` | (L_base - L_ref)/T       | token-normalised RHO                               |
| `loss_base`     | L_base/T                 | HIGH base loss first                               |
| `loss_ref`      | L_ref/T                  | HIGH reference loss first                          |
| `low_loss_base` | -L_base/T                | LOW base loss first (the "low" loss baseline)      |
| `low_loss_ref`  | -L_ref/T                 | LOW reference loss first                           |
| `random`        | uniform [0, 1)           | depends on (seed, example_id) only                 |

Input guards (checked once, in `ScoreColumns`): NLLs must be finite and >= 0 (a summed NLL
cannot be negative), T >= 1, example ids unique. `davir` additionally needs L_base > 0 (it
divides by it). Violations raise ValueError naming the offending example ids; nothing is
silently turned into inf or nan.

To add a score: decorate a function `(cols: ScoreColumns, seed: int) -> np.ndarray` with
`@register_score("name")`, here or in a plugin (`davir_jax.plugins`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from davir_jax.core import registry

SCORES_FILE = "scores.parquet"
MANIFEST_FILE = "manifest.json"  # beside the table: what the scoring run was
# Columns every scores.parquet must have (written by the scoring job).
REQUIRED_COLUMNS = (
    "example_id",
    "source",
    "row",
    "content_hash",
    "n_tokens",
    "nll_base",
    "nll_ref",
    "record",
)
# The subset the score functions themselves read.
SCORE_INPUT_COLUMNS = ("example_id", "nll_base", "nll_ref", "n_tokens")

_MAX_IDS_IN_ERROR = 5


def _name_ids(ids: np.ndarray, mask: np.ndarray) -> str:
    """'3 examples (a:1, a:7, b:2)', capped, so errors point at the bad rows."""
    bad = ids[mask]
    shown = ", ".join(str(x) for x in bad[:_MAX_IDS_IN_ERROR])
    more = f", ... {len(bad) - _MAX_IDS_IN_ERROR} more" if len(bad) > _MAX_IDS_IN_ERROR else ""
    return f"{len(bad)} example(s) ({shown}{more})"


@dataclass(frozen=True)
class ScoreColumns:
    """Validated per-example inputs of the score functions, all of length N.

    example_id: str [N], unique. nll_base, nll_ref: float64 [N], summed NLLs (nats), finite, >= 0.
    n_tokens: int64 [N], >= 1.
    """

    example_id: np.ndarray
    nll_base: np.ndarray
    nll_ref: np.ndarray
    n_tokens: np.ndarray

    def __post_init__(self) -> None:
        ids = self.example_id
        n = len(ids)
        for name in ("nll_base", "nll_ref", "n_tokens"):
            arr = getattr(self, name)
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"column {name} has shape {arr.shape}, expected ({n},)")
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != n:
            dup = uniq[counts > 1]
            raise ValueError(
                f"example_id must be unique; duplicated: {_name_ids(dup, np.ones(len(dup), bool))}"
            )
        for name in ("nll_base", "nll_ref"):
            arr = getattr(self, name)
            bad = ~np.isfinite(arr)
            if bad.any():
                raise ValueError(f"{name} is nan or inf for {_name_ids(ids, bad)}")
            bad = arr < 0
            if bad.any():
                # A summed NLL is -sum log p >= 0; a negative value means a corrupt table.
                raise ValueError(f"{name} is negative for {_name_ids(ids, bad)}")
        bad = self.n_tokens < 1
        if bad.any():
            raise ValueError(f"n_tokens (T) must be >= 1; got T < 1 for {_name_ids(ids, bad)}")

    def __len__(self) -> int:
        return len(self.example_id)

    @classmethod
    def from_data(cls, data: pa.Table | Mapping[str, Any] | ScoreColumns) -> ScoreColumns:
        """Build from a pyarrow Table, a mapping of column name -> array-like, or pass through."""
        if isinstance(data, ScoreColumns):
            return data
        if isinstance(data, pa.Table):
            missing = [c for c in SCORE_INPUT_COLUMNS if c not in data.column_names]
            if missing:
                raise ValueError(f"table lacks score input column(s) {missing}")
            for c in SCORE_INPUT_COLUMNS:
                if data.column(c).null_count:
                    raise ValueError(f"column {c} has {data.column(c).null_count} null value(s)")
            get = lambda c: data.column(c).to_numpy(zero_copy_only=False)
        else:
            missing = [c for c in SCORE_INPUT_COLUMNS if c not in data]
            if missing:
                raise ValueError(f"columns lack score input(s) {missing}")
            get = lambda c: data[c]
        ids = np.asarray(get("example_id"), dtype=np.str_)
        n_tokens = np.asarray(get("n_tokens"))
        if n_tokens.size and not np.issubdtype(n_tokens.dtype, np.integer):
            # Token counts are integers; a float column means the wrong column was passed.
            raise ValueError(f"n_tokens must be integers, got dtype {n_tokens.dtype}")
        return cls(
            example_id=ids,
            nll_base=np.asarray(get("nll_base"), dtype=np.float64),
            nll_ref=np.asarray(get("nll_ref"), dtype=np.float64),
            n_tokens=n_tokens.astype(np.int64),
        )


ScoreFn = Callable[[ScoreColumns, int], np.ndarray]

# name -> score function; higher score = selected first.
SCORES: dict[str, ScoreFn] = {}


def register_score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding `fn(cols, seed) -> float64 [N]` to `SCORES` under `name`."""
    registry.check_name(name, "a score name")

    def deco(fn: ScoreFn) -> ScoreFn:
        registry.add(SCORES, name, fn, "score")
        return fn

    return deco


@register_score("davir")
def davir(c: ScoreColumns, seed: int) -> np.ndarray:
    """DavIR: relative loss reduction (L_base - L_ref) / L_base = 1 - L_ref/L_base.

    arXiv 2310.13008 (DavIR score). T cancels, so summed and per-token NLLs give the same value.
    """
    bad = c.nll_base <= 0
    if bad.any():
        raise ValueError(
            f"davir divides by nll_base, which is 0 for {_name_ids(c.example_id, bad)}; "
            "drop these rows or use another score"
        )
    return (c.nll_base - c.nll_ref) / c.nll_base


@register_score("rho")
def rho(c: ScoreColumns, seed: int) -> np.ndarray:
    """RHO-LOSS for causal LMs: L_base - L_ref (arXiv 2310.13008's main baseline).

    Equals the DPO implicit reward log p_ref(y|x) - log p_base(y|x) (times 1/beta); grows with
    response length, which is what DavIR's normalisation removes.
    """
    return c.nll_base - c.nll_ref


@register_score("rho_per_token")
def rho_per_token(c: ScoreColumns, seed: int) -> np.ndarray:
    """Token-normalised RHO: (L_base - L_ref) / T."""
    return (c.nll_base - c.nll_ref) / c.n_tokens


@register_score("loss_base")
def loss_base(c: ScoreColumns, seed: int) -> np.ndarray:
    """Mean per-token base loss L_base / T; high loss (hard examples) first."""
    return c.nll_base / c.n_tokens


@register_score("loss_ref")
def loss_ref(c: ScoreColumns, seed: int) -> np.ndarray:
    """Mean per-token reference loss L_ref / T; high loss first."""
    return c.nll_ref / c.n_tokens


@register_score("low_loss_base")
def low_loss_base(c: ScoreColumns, seed: int) -> np.ndarray:
    """-L_base / T: the low-loss baseline (easy examples first)."""
    return -c.nll_base / c.n_tokens


@register_score("low_loss_ref")
def low_loss_ref(c: ScoreColumns, seed: int) -> np.ndarray:
    """-L_ref / T: low reference loss first."""
    return -c.nll_ref / c.n_tokens


def random_uniform(example_ids: Iterable[str], seed: int) -> np.ndarray:
    """Uniform [0, 1) per id from a hash of (seed, id).

    A hash instead of an RNG stream, so an example's value depends on nothing else: not on
    row order, nor on which other examples are in the table (a subset or a mixture gets the
    same per-example values as the full pool).
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {seed!r}")
    prefix = f"{int(seed)}\x00".encode()
    out = np.empty(len(ids := list(example_ids)), dtype=np.float64)
    for i, eid in enumerate(ids):
        h = hashlib.blake2b(prefix + str(eid).encode(), digest_size=8).digest()
        # Top 53 bits -> an exactly representable double in [0, 1).
        out[i] = (int.from_bytes(h, "big") >> 11) * (1.0 / (1 << 53))
    return out


@register_score("random")
def random_score(c: ScoreColumns, seed: int) -> np.ndarray:
    """Seeded uniform [0, 1) baseline; a function of (seed, example_id) only."""
    return random_uniform(c.example_id, seed)


def compute_scores(
    data: pa.Table | Mapping[str, Any] | ScoreColumns,
    names: str | Iterable[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Scores `names` (default: all registered) for every row of `data`; float64 [N] each.

    `data` is a scores table, a mapping with columns example_id, nll_base, nll_ref, n_tokens,
    or `ScoreColumns`. The output arrays are aligned with the input rows.
    """
    if names is None:
        names = list(SCORES)
    elif isinstance(names, str):
        names = [names]
    else:
        names = list(names)
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; available: {sorted(SCORES)}")
    cols = ScoreColumns.from_data(data)
    out = {}
    for name in names:
        s = np.asarray(SCORES[name](cols, seed), dtype=np.float64)
        if s.shape != (len(cols),):
            raise ValueError(f"score {name} returned shape {s.shape}, expected ({len(cols)},)")
        out[name] = s
    return out


def scores_file(path: str | Path) -> Path:
    """`path` itself if it is a file, else `path/scores.parquet`."""
    p = Path(path)
    return p / SCORES_FILE if p.is_dir() else p


def read_scores(path: str | Path, columns: Iterable[str] | None = None) -> pa.Table:
    """Read a scoring job's `scores.parquet` (given the file or its directory).

    Checks the required columns are all present (whatever `columns` selects), so a table
    from another tool or an older job fails here with the file named, not later.
    """
    f = scores_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"no scores file at {f}")
    try:
        schema = pq.read_schema(f)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise ValueError(f"{f} is not a readable parquet file: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{f} lacks required column(s) {missing}; has {schema.names}")
    return pq.read_table(f, columns=list(columns) if columns is not None else None)
