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
| `ifd`           | L_base/L_base_alone      | IFD (Cherry LLM) with the base model               |
| `ifd_ref`       | L_ref/L_ref_alone        | IFD with the reference (Cherry's pre-experienced)  |
| `superfiltering`| L_proxy/L_proxy_alone    | IFD with a small proxy model (Superfiltering)      |
| `*_per_token`   | (L_m - L_m_alone)/T      | each IFD score's per-token log form: -PMI(x; y)/T  |

IFD (Li et al., "From Quantity to Quality", arXiv 2308.12032) is the ratio of the response's mean
token loss given its instruction to its mean token loss alone; both sums run over the same T
response tokens (the `_alone` columns score exactly those token ids after one start token, see
`davir_jax.data.dataset.ResponseAlone`), so the ratio of sums equals Cherry's ratio of means.
IFD >= 1 means the instruction does not help predict the response; Cherry and Superfiltering
(Li et al., arXiv 2402.00530) drop those and rank the rest HIGH IFD first (`davir select
--filter "ifd<1"`). The per-token form (L_m - L_m_alone)/T is the negative pointwise mutual
information of instruction and response per token; it orders like IFD for equal L_m_alone/T.

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

from davir_jax.core import registry, storage

SCORES_FILE = "scores.parquet"
MANIFEST_FILE = "manifest.json"  # beside the table: what the scoring run was
EMBEDDINGS_FILE = "embeddings.npy"  # with scoring.embed: float32 [N, D], rows as the table
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
# The subset every score function may read (the NLL columns may be all null: a run without that
# model); `OPTIONAL_NLL_COLUMNS` are present when the scoring run computed them.
SCORE_INPUT_COLUMNS = ("example_id", "nll_base", "nll_ref", "n_tokens")
OPTIONAL_NLL_COLUMNS = ("nll_proxy", "nll_base_alone", "nll_ref_alone", "nll_proxy_alone")
NLL_COLUMNS = ("nll_base", "nll_ref", *OPTIONAL_NLL_COLUMNS)
# What a score function reads unless it declares otherwise (register_score(needs=...)).
DEFAULT_NEEDS = ("nll_base", "nll_ref")
# How to get a column that a run lacks (for the error naming the missing input).
_HOW = {
    "nll_base": "score with a base model (scoring.base)",
    "nll_ref": "score with a reference model (scoring.reference)",
    "nll_proxy": "score with a proxy model (scoring.proxy)",
    "nll_base_alone": "score with scoring.ifd=[base]",
    "nll_ref_alone": "score with scoring.ifd=[reference]",
    "nll_proxy_alone": "score with a proxy model (scoring.proxy)",
}

_MAX_IDS_IN_ERROR = 5


def _name_ids(ids: np.ndarray, mask: np.ndarray) -> str:
    """'3 examples (a:1, a:7, b:2)', capped, so errors point at the bad rows."""
    bad = ids[mask]
    shown = ", ".join(str(x) for x in bad[:_MAX_IDS_IN_ERROR])
    more = f", ... {len(bad) - _MAX_IDS_IN_ERROR} more" if len(bad) > _MAX_IDS_IN_ERROR else ""
    return f"{len(bad)} example(s) ({shown}{more})"


class MissingScoreInput(ValueError):
    """A score needs an NLL column that this scoring run did not compute."""


def _check_nll(name: str, arr: np.ndarray, ids: np.ndarray) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{name} is nan or inf for {_name_ids(ids, bad)}")
    bad = arr < 0
    if bad.any():
        # A summed NLL is -sum log p >= 0; a negative value means a corrupt table.
        raise ValueError(f"{name} is negative for {_name_ids(ids, bad)}")


@dataclass(frozen=True)
class ScoreColumns:
    """Validated per-example inputs of the score functions, all of length N.

    example_id: str [N], unique. n_tokens: int64 [N], >= 1. nll: the summed NLL columns (nats)
    this run computed, by name (`NLL_COLUMNS`), each float64 [N], finite, >= 0; a model the run
    did not score has no entry. `nll_base`, `nll_ref` and `column(name)` read them, raising
    `MissingScoreInput` (saying how to compute it) for an absent one.
    """

    example_id: np.ndarray
    n_tokens: np.ndarray
    nll: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        ids = self.example_id
        n = len(ids)
        for name, arr in [("n_tokens", self.n_tokens), *self.nll.items()]:
            if arr.ndim != 1 or len(arr) != n:
                raise ValueError(f"column {name} has shape {arr.shape}, expected ({n},)")
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != n:
            dup = uniq[counts > 1]
            raise ValueError(
                f"example_id must be unique; duplicated: {_name_ids(dup, np.ones(len(dup), bool))}"
            )
        for name, arr in self.nll.items():
            if name not in NLL_COLUMNS:
                raise ValueError(f"unknown NLL column {name!r}; known: {', '.join(NLL_COLUMNS)}")
            _check_nll(name, arr, ids)
        bad = self.n_tokens < 1
        if bad.any():
            raise ValueError(f"n_tokens (T) must be >= 1; got T < 1 for {_name_ids(ids, bad)}")

    def __len__(self) -> int:
        return len(self.example_id)

    def column(self, name: str) -> np.ndarray:
        """The NLL column `name` (float64 [N]); `MissingScoreInput` if the run lacks it."""
        if name not in self.nll:
            how = _HOW.get(name, "")
            raise MissingScoreInput(f"no {name} in these scores" + (f"; {how}" if how else ""))
        return self.nll[name]

    @property
    def nll_base(self) -> np.ndarray:
        """L_base: the response's summed NLL under the base model."""
        return self.column("nll_base")

    @property
    def nll_ref(self) -> np.ndarray:
        """L_ref: the response's summed NLL under the reference model."""
        return self.column("nll_ref")

    @classmethod
    def from_data(cls, data: pa.Table | Mapping[str, Any] | ScoreColumns) -> ScoreColumns:
        """Build from a pyarrow Table, a mapping of column name -> array-like, or pass through.

        An NLL column that is absent or entirely null is a model the run did not score; one
        that is partly null is a corrupt table (an error)."""
        if isinstance(data, ScoreColumns):
            return data
        if isinstance(data, pa.Table):
            names = data.column_names
            get = lambda c: data.column(c).to_numpy(zero_copy_only=False)
            nulls = lambda c: data.column(c).null_count
        else:
            names = list(data)
            get = lambda c: data[c]
            nulls = lambda c: sum(v is None for v in data[c]) if data[c] is not None else 0
        missing = [c for c in ("example_id", "n_tokens") if c not in names]
        if missing:
            raise ValueError(f"scores lack input column(s) {missing}")
        for c in ("example_id", "n_tokens"):
            if nulls(c):
                raise ValueError(f"column {c} has {nulls(c)} null value(s)")
        n = len(get("example_id"))
        nll = {}
        for c in NLL_COLUMNS:
            if c not in names or data[c] is None or (n and nulls(c) == n):
                continue
            if nulls(c):
                raise ValueError(f"column {c} has {nulls(c)} null value(s) of {n}")
            nll[c] = np.asarray(get(c), dtype=np.float64)
        n_tokens = np.asarray(get("n_tokens"))
        if n_tokens.size and not np.issubdtype(n_tokens.dtype, np.integer):
            # Token counts are integers; a float column means the wrong column was passed.
            raise ValueError(f"n_tokens must be integers, got dtype {n_tokens.dtype}")
        ids = np.asarray(get("example_id"), dtype=np.str_)
        return cls(example_id=ids, n_tokens=n_tokens.astype(np.int64), nll=nll)


ScoreFn = Callable[[ScoreColumns, int], np.ndarray]

# name -> score function; higher score = selected first.
SCORES: dict[str, ScoreFn] = {}
# name -> the NLL columns the score reads (to list the scores a table can give).
SCORE_NEEDS: dict[str, tuple[str, ...]] = {}


def register_score(name: str, needs: Iterable[str] = DEFAULT_NEEDS) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator adding `fn(cols, seed) -> float64 [N]` to `SCORES` under `name`.

    `needs`: the NLL columns (`NLL_COLUMNS`) the score reads; a table without one of them does
    not offer the score (`available_scores`) and computing it names the missing column."""
    registry.check_name(name, "a score name")
    needs = tuple(needs)
    unknown = [c for c in needs if c not in NLL_COLUMNS]
    if unknown:
        raise ValueError(f"score {name}: unknown input column(s) {unknown}; known: {NLL_COLUMNS}")

    def deco(fn: ScoreFn) -> ScoreFn:
        registry.add(SCORES, name, fn, "score")
        SCORE_NEEDS[name] = needs
        return fn

    return deco


def available_scores(data: pa.Table | Mapping[str, Any] | ScoreColumns) -> list[str]:
    """The registered scores whose inputs `data` holds, in registration order."""
    have = set(ScoreColumns.from_data(data).nll)
    return [n for n in SCORES if set(SCORE_NEEDS.get(n, DEFAULT_NEEDS)) <= have]


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


@register_score("loss_base", needs=("nll_base",))
def loss_base(c: ScoreColumns, seed: int) -> np.ndarray:
    """Mean per-token base loss L_base / T; high loss (hard examples) first."""
    return c.nll_base / c.n_tokens


@register_score("loss_ref", needs=("nll_ref",))
def loss_ref(c: ScoreColumns, seed: int) -> np.ndarray:
    """Mean per-token reference loss L_ref / T; high loss first."""
    return c.nll_ref / c.n_tokens


@register_score("low_loss_base", needs=("nll_base",))
def low_loss_base(c: ScoreColumns, seed: int) -> np.ndarray:
    """-L_base / T: the low-loss baseline (easy examples first)."""
    return -c.nll_base / c.n_tokens


@register_score("low_loss_ref", needs=("nll_ref",))
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


@register_score("random", needs=())
def random_score(c: ScoreColumns, seed: int) -> np.ndarray:
    """Seeded uniform [0, 1) baseline; a function of (seed, example_id) only."""
    return random_uniform(c.example_id, seed)


# IFD's three models: score name -> the NLL column with the prompt (the `_alone` column is the
# same response after one start token).
IFD_SCORES = {"ifd": "nll_base", "ifd_ref": "nll_ref", "superfiltering": "nll_proxy"}


def _ifd_inputs(c: ScoreColumns, cond: str) -> tuple[np.ndarray, np.ndarray]:
    with_prompt, alone = c.column(cond), c.column(cond + "_alone")
    bad = alone <= 0
    if bad.any():
        raise ValueError(
            f"IFD divides by {cond}_alone, which is 0 for {_name_ids(c.example_id, bad)}"
        )
    return with_prompt, alone


def _register_ifd(name: str, cond: str) -> None:
    """`name` = L_m / L_m_alone (Cherry's IFD, arXiv 2308.12032) and `name`_per_token =
    (L_m - L_m_alone) / T, for the model whose prompted NLL column is `cond`."""

    @register_score(name, needs=(cond, cond + "_alone"))
    def ratio(c: ScoreColumns, seed: int) -> np.ndarray:
        with_prompt, alone = _ifd_inputs(c, cond)
        return with_prompt / alone

    @register_score(name + "_per_token", needs=(cond, cond + "_alone"))
    def per_token(c: ScoreColumns, seed: int) -> np.ndarray:
        return (c.column(cond) - c.column(cond + "_alone")) / c.n_tokens

    ratio.__doc__ = f"IFD from {cond}: {cond} / {cond}_alone (higher: the prompt helps less)."
    per_token.__doc__ = f"({cond} - {cond}_alone) / T: IFD's per-token log form (-PMI / T)."


for _name, _cond in IFD_SCORES.items():
    _register_ifd(_name, _cond)


def compute_scores(
    data: pa.Table | Mapping[str, Any] | ScoreColumns,
    names: str | Iterable[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Scores `names` (default: every score `data` has the inputs for) for every row of
    `data`; float64 [N] each.

    `data` is a scores table, a mapping with columns example_id, n_tokens and the NLL columns
    (`NLL_COLUMNS`), or `ScoreColumns`. The output arrays are aligned with the input rows. A
    score whose input the run did not compute raises `MissingScoreInput` naming it.
    """
    cols = ScoreColumns.from_data(data)
    if names is None:
        names = available_scores(cols)
    elif isinstance(names, str):
        names = [names]
    else:
        names = list(names)
    unknown = [n for n in names if n not in SCORES]
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; available: {sorted(SCORES)}")
    for name in names:
        lacking = [c for c in SCORE_NEEDS.get(name, DEFAULT_NEEDS) if c not in cols.nll]
        if lacking:
            raise MissingScoreInput(
                f"score {name} needs {', '.join(lacking)}: "
                + "; ".join(dict.fromkeys(_HOW[c] for c in lacking))
            )
    out = {}
    for name in names:
        s = np.asarray(SCORES[name](cols, seed), dtype=np.float64)
        if s.shape != (len(cols),):
            raise ValueError(f"score {name} returned shape {s.shape}, expected ({len(cols)},)")
        out[name] = s
    return out


def scores_file(path: str | Path) -> Any:
    """`path` itself if it is a file, else `path/scores.parquet` (a local path or URL)."""
    p = storage.upath(path)
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
        schema = storage.read_parquet_schema(f)
    except Exception as e:  # pyarrow raises several types for a non-parquet file
        raise ValueError(f"{f} is not a readable parquet file: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise ValueError(f"{f} lacks required column(s) {missing}; has {schema.names}")
    return storage.read_parquet(f, columns=list(columns) if columns is not None else None)
