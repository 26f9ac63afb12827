"""Top-k selection by a score, and mixtures of several scored pools.

Selection (DavIR, arXiv 2310.13008, procedure step 3): score every example, sort descending,
keep a budget given as a count or a fraction. Mixtures (the paper's Alpaca + GSM8K experiment;
the exact recipe is not public): select within each pool by that pool's own scores, then
concatenate with per-pool budgets.

Output of `select_mixture` (one directory, published atomically):
- `<pool>.jsonl`: the selected rows' original `record` text, one per line, best first, so the
  trainer reads it back with the same JSON-lines reader it uses for the source;
- `manifest.json`: method, seed, per-pool budget/sizes/data/template, every selected example
  with its score and rank, and the input fingerprints (scores file sha256 + the scoring job's
  fingerprints).

Filters (`ScoreFilter`, e.g. `ifd<1`: Cherry LLM's and Superfiltering's rule) drop rows before
ranking; a budget still counts against the whole pool (a fraction means the same number of
examples with or without filters), and a pool with fewer rows passing than its budget gives what
passes (`n_short` in its manifest entry says by how many). Diversity steps (`DiversityStep`:
`minhash[:threshold=0.8]`, `threshold[:min_distance=0.1]`, `facility[:pool=N]`) then work down
the ranking: MinHash drops near-duplicates of better-ranked rows (their record texts), and one
embedding step (last; DEITA's distance threshold, arXiv 2312.15685, or Superfiltering.D's
facility location, on the scoring run's `embeddings.npy`) chooses the budget. Each pool's
manifest entry lists what every step removed, as (removed, kept) example ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from davir_jax.core import storage
from davir_jax.core.diversity import (
    DiversityStep,
    facility_location_diversity,
    minhash_dedupe,
    threshold_diversity,
)
from davir_jax.core.io import atomic_dir, dumps_json, file_sha256
from davir_jax.core.scores import (
    EMBEDDINGS_FILE,
    SCORES_FILE,
    compute_scores,
    read_scores,
    scores_file,
)
from davir_jax.core.selection import _BUDGET_HELP, Budget, ScoreFilter, rank_order

MANIFEST_FILE = "manifest.json"
SELECTION_KIND = "davir-selection"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_POOL_HELP = f"expected [NAME=]SCORES_DIR:BUDGET, e.g. alpaca=runs/a:fraction=0.06; {_BUDGET_HELP}"


# ---------------------------------------------------------------------------------------------
# Budgets and top-k


# ---------------------------------------------------------------------------------------------
# Pools and the CLI syntax


@dataclass(frozen=True)
class Pool:
    """One scored source in a mixture.

    name: output file stem (`<name>.jsonl`); None -> the data source's name (score manifest
    `data.name`/`data.source`, else the table's single `source` value, else the scores
    directory's name). scores_dir: a scoring job's output directory
    (or its scores.parquet). budget: Budget, "all"/"count=N"/"fraction=F", int (count) or
    float (fraction).
    """

    name: str | None
    scores_dir: Path
    budget: Budget

    def __init__(
        self, name: str | None, scores_dir: str | Path, budget: Budget | str | int | float
    ) -> None:
        if name is not None:
            _check_name(name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "scores_dir", storage.upath(scores_dir))
        object.__setattr__(self, "budget", Budget.coerce(budget))


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"bad pool name {name!r}: use letters, digits, '.', '_', '-' (it names <name>.jsonl)"
        )


def parse_pool(spec: str) -> Pool:
    """Parse `[NAME=]SCORES_DIR:BUDGET`, e.g. `alpaca=runs/a:fraction=0.06`, `runs/g:all`.

    The budget is after the last ':'. A leading `NAME=` is taken as the name only when NAME is
    a plain name (no '/'), so a directory whose path holds '=' still works.
    """
    head, colon, budget = spec.rpartition(":")
    if not colon or not head.strip():
        raise ValueError(f"bad pool {spec!r}: {_POOL_HELP}")
    try:
        b = Budget.parse(budget)
    except ValueError as e:
        raise ValueError(f"bad pool {spec!r}: {e}") from None
    name: str | None = None
    maybe_name, eq, rest = head.partition("=")
    if eq and "/" not in maybe_name and os.sep not in maybe_name:
        name, head = maybe_name.strip(), rest
        if not name:
            raise ValueError(f"bad pool {spec!r}: empty name before '='; {_POOL_HELP}")
        _check_name(name)
    if not head.strip():
        raise ValueError(f"bad pool {spec!r}: empty scores directory; {_POOL_HELP}")
    return Pool(name, head.strip(), b)


# ---------------------------------------------------------------------------------------------
# Mixtures


def read_score_manifest(scores_path: str | Path) -> dict[str, Any]:
    """The scoring job's `manifest.json` beside its scores.parquet, checked for the keys
    selection copies (`data`, `template`, `fingerprints`)."""
    f = scores_file(scores_path).parent / MANIFEST_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no score manifest at {f} (the scoring job writes it)")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(m, dict):
        raise ValueError(f"{f} must hold a JSON object")
    missing = [k for k in ("data", "template", "fingerprints") if k not in m]
    if missing:
        raise ValueError(f"{f} lacks key(s) {missing}")
    if not isinstance(m["data"], dict):
        raise ValueError(f"{f}: 'data' must be an object")
    return m


def _default_name(pool: Pool, manifest: dict[str, Any], sources: list[str]) -> str:
    """A pool's name when none is given: the score manifest's `data.name` or `data.source`,
    else the table's `source` value if it has only one, else the scores directory's name."""
    candidates = [manifest["data"].get(k) for k in ("name", "source")]
    candidates += sources if len(sources) == 1 else []
    candidates.append(scores_file(pool.scores_dir).parent.resolve().name)
    for c in candidates:
        if isinstance(c, str):
            c = re.sub(r"[^A-Za-z0-9._-]", "_", c).lstrip("._-")
            if c:
                return c
    raise ValueError(f"cannot derive a name for pool {pool.scores_dir}; give NAME=")


def _jsonl_line(record: str, example_id: str) -> str:
    """The record text as one JSONL line, unchanged unless it spans several lines."""
    try:
        obj = json.loads(record)
    except json.JSONDecodeError as e:
        raise ValueError(f"record of {example_id} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"record of {example_id} is not a JSON object")
    if "\n" in record or "\r" in record:
        # A raw newline in valid JSON can only be whitespace between tokens, so compacting it
        # keeps the content; without it one record would span lines and break the reader.
        return json.dumps(obj, ensure_ascii=False)
    return record


def _check_out_dir(out: Path, scores_paths: list[Path]) -> None:
    """Refuse outputs that publishing (a directory replace) would make destroy data."""
    out_r = out.resolve()
    for p in scores_paths:
        if p.parent.resolve().is_relative_to(out_r):
            raise ValueError(f"output {out} would replace the scores directory {p.parent}")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"output {out} exists and is not a directory")
        if any(out.iterdir()):
            mf = out / MANIFEST_FILE
            try:
                kind = json.loads(mf.read_text(encoding="utf-8")).get("kind")
            except (OSError, ValueError, AttributeError):
                kind = None
            if kind != SELECTION_KIND:
                raise ValueError(
                    f"output {out} exists and is not a previous selection output; "
                    "refusing to replace it"
                )


def _rank_pool(
    table: Any, ids: np.ndarray, method: str, seed: int, filters: Sequence[ScoreFilter]
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(the pool's ranking: indices of the rows that pass every filter, best first by
    `method`; the `method` scores of all rows; what each filter removed)."""
    scores = compute_scores(table, list(dict.fromkeys([method, *(f.name for f in filters)])), seed)
    keep = np.ones(len(ids), bool)
    report = []
    for f in filters:
        passed = f.keep(scores[f.name])
        report.append({"filter": f.spec(), "removed": int((keep & ~passed).sum())})
        keep &= passed
    order = rank_order(scores[method], ids)
    return order[keep[order]], scores[method], report


def record_text(record: str) -> str:
    """The text a MinHash compares: every string value of a record, nested ones included (a
    chat record's `messages[i].content`), in order, one per line; not its keys, which every row
    shares."""
    parts: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(json.loads(record))
    return "\n".join(parts)


def pool_embeddings(f: Path, n: int) -> np.ndarray:
    """The scoring run's `embeddings.npy` beside `f` (float32 [n, D], rows as the table)."""
    e = f.parent / EMBEDDINGS_FILE
    if not e.is_file():
        raise FileNotFoundError(
            f"no {EMBEDDINGS_FILE} beside {f}: score with --scoring.embed=base for an "
            "embedding diversity step (or use --diversity minhash)"
        )
    if storage.is_url(e):
        emb = storage.load_npy(e)
    else:
        emb = np.load(e, allow_pickle=False, mmap_mode="r")
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"{e}: shape {emb.shape} does not match the {n} rows of {f}")
    return emb


def _diversify(
    steps: Sequence[DiversityStep], ranked: np.ndarray, k: int, f: Path, table: Any, score: Any
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Run the diversity steps on the ranking (best first): dedupe steps drop items, a pick
    step chooses the budget; returns (the chosen indices, best first, the manifest entries
    with example ids in place of indices)."""
    ids = table.column("example_id").to_numpy(zero_copy_only=False).astype(np.str_)
    entries = []
    for step in steps:
        if step.method == "minhash":
            recs = table.column("record").take(ranked).to_pylist()
            o = step.options
            texts = [record_text(r) for r in recs]
            if texts and not any(t.strip() for t in texts):
                # All-empty texts would all be duplicates of the first: refuse, not keep one.
                raise ValueError(f"{f}: the records hold no text for --diversity minhash")
            res = minhash_dedupe(
                texts,
                np.arange(len(ranked)),
                o["threshold"],
                num_perm=o["num_perm"],
                ngram=o["ngram"],
            )
            res = dataclasses.replace(
                res, selected=ranked[res.selected], removed=ranked[res.removed]
            )
        elif step.method == "threshold":
            emb = pool_embeddings(f, len(ids))
            res = threshold_diversity(emb, ranked, k, step.options["min_distance"])
        else:
            emb = pool_embeddings(f, len(ids))
            res = facility_location_diversity(emb, score, k, step.options["pool"], order=ranked)
        ranked = res.selected
        entry = res.manifest()
        entry["removed"] = [[str(ids[a]), str(ids[b])] for a, b in entry["removed"]]
        entries.append(entry)
    return ranked[:k], entries


def _select_pool(
    loaded: tuple[Pool, Path, Any, dict[str, Any], str],
    method: str,
    seed: int,
    filters: Sequence[ScoreFilter],
    steps: Sequence[DiversityStep],
) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """One pool's selection: (its rows file, its `selected` entries, its manifest entry)."""
    pool, f, table, manifest, name = loaded
    ids = table.column("example_id").to_numpy(zero_copy_only=False).astype(np.str_)
    k = pool.budget.resolve(len(ids))
    ranked, score, filtered = _rank_pool(table, ids, method, seed, filters)
    idx, div = _diversify(steps, ranked, k, f, table, score)
    selected = [
        {"example_id": str(ids[i]), "pool": name, "score": float(score[i]), "rank": r + 1}
        for r, i in enumerate(idx)
    ]
    entry = _pool_entry(pool, f, manifest, name, len(ids), len(idx))
    if filters or steps:
        # n_passed: rows through the filters; n_short: budget minus what was selected.
        entry |= {"filters": filtered, "n_passed": len(ranked), "n_short": k - len(idx)}
        entry |= {"diversity": div} if steps else {}
    return _pool_file(f, table, ids, idx), selected, entry


def select_mixture(
    pools: Sequence[Pool],
    method: str,
    seed: int,
    out_dir: str | Path,
    filters: Sequence[ScoreFilter | str] = (),
    diversity: Sequence[DiversityStep | str] = (),
) -> dict[str, Any]:
    """Select within each pool by its own `method` scores, write the mixture to `out_dir`.
    `filters` and `diversity` (objects or their text forms): see the module docstring.

    Returns the manifest written to `out_dir/manifest.json` (see the module docstring). The
    directory is built beside `out_dir` and published with one rename, so readers never see a
    half-written selection; a previous selection output at `out_dir` is replaced.
    """
    if not pools:
        raise ValueError("no pools given")
    filters, steps = _options(filters, diversity)
    out = storage.upath(out_dir)
    loaded = _load_pools(pools)
    _check_out_dir(out, [x[1] for x in loaded])
    pool_entries, selected, inputs, files = [], [], {}, {}
    seen_ids: dict[str, str] = {}
    for pool, f, table, manifest, name in loaded:
        ids = table.column("example_id").to_numpy(zero_copy_only=False).astype(np.str_)
        # Mixing the same examples twice (the same scores dir or source in two pools) would
        # duplicate training rows silently.
        clash = [i for i in ids if i in seen_ids]
        if clash:
            raise ValueError(
                f"pool {name} repeats example(s) of pool {seen_ids[clash[0]]}: {clash[:5]}"
            )
        seen_ids.update(dict.fromkeys(ids, name))
        text, chosen, entry = _select_pool(
            (pool, f, table, manifest, name), method, seed, filters, steps
        )
        files[f"{name}.jsonl"] = text
        selected += chosen
        pool_entries.append(entry)
        inputs[name] = {"scores_sha256": file_sha256(f), "fingerprints": manifest["fingerprints"]}
    result = {
        "kind": SELECTION_KIND,
        "method": method,
        "seed": int(seed),
        "filters": [f.spec() for f in filters],
        "diversity": [d.spec() for d in steps],
        "n_selected": len(selected),
        "pools": pool_entries,
        # rank: 1-based position within its pool's file (line number), best first.
        "selected": selected,
        "inputs": inputs,
    }
    _publish(out, files, result)
    return result


def _options(
    filters: Sequence[ScoreFilter | str], diversity: Sequence[DiversityStep | str]
) -> tuple[list[ScoreFilter], list[DiversityStep]]:
    """Filters and diversity steps from their text forms; an embedding step only last."""
    fs = [f if isinstance(f, ScoreFilter) else ScoreFilter.parse(f) for f in filters]
    steps = [d if isinstance(d, DiversityStep) else DiversityStep.parse(d) for d in diversity]
    if any(d.kind == "pick" for d in steps[:-1]):
        raise ValueError("an embedding diversity step (threshold, facility) must be the last")
    return fs, steps


def _publish(out: Path, files: dict[str, str], manifest: dict[str, Any]) -> None:
    with atomic_dir(out) as tmp:  # readers see the whole selection or none of it
        for fname, text in files.items():
            (tmp / fname).write_text(text, encoding="utf-8", newline="\n")
        (tmp / MANIFEST_FILE).write_text(
            dumps_json(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def _load_pools(pools: Sequence[Pool]) -> list[tuple[Pool, Path, Any, dict[str, Any], str]]:
    """(pool, scores file, table, manifest, name) per pool; names must be distinct."""
    loaded = []
    for pool in pools:
        f = scores_file(pool.scores_dir)
        table = read_scores(f)
        manifest = read_score_manifest(f)
        name = pool.name or _default_name(
            pool, manifest, table.column("source").unique().to_pylist()
        )
        loaded.append((pool, f, table, manifest, name))
    names = [x[4] for x in loaded]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"pool name(s) {dup} used more than once; give distinct NAME=")
    return loaded


def _pool_file(f: Path, table: Any, ids: np.ndarray, idx: np.ndarray) -> str:
    """The selected source rows, unchanged, best first (JSON lines)."""
    records = table.column("record")
    if records.null_count:
        raise ValueError(f"{f}: column record has {records.null_count} null value(s)")
    rec = records.take(idx).to_pylist()
    return "".join(_jsonl_line(r, ids[i]) + "\n" for r, i in zip(rec, idx, strict=True))


def _pool_entry(
    pool: Pool, f: Path, manifest: dict[str, Any], name: str, n_pool: int, n_selected: int
) -> dict[str, Any]:
    return {
        "name": name,
        "scores": str(f.resolve()),
        "data": manifest["data"],
        "template": manifest["template"],
        "budget": {"spec": pool.budget.spec(), "kind": pool.budget.kind}
        | ({"value": pool.budget.value} if pool.budget.kind != "all" else {}),
        "n_pool": n_pool,
        "n_selected": n_selected,
        "file": f"{name}.jsonl",  # JSON lines, each the source row unchanged
        "format": manifest["data"].get("format", "auto"),  # the rows' data format
    }


def run_select(
    pools: list[str],
    method: str,
    out: str,
    seed: int,
    filters: Sequence[str] = (),
    diversity: Sequence[str] = (),
) -> dict[str, Any]:
    """`davir select`: parse the pool specs (see `parse_pool`) and run `select_mixture`."""
    if not pools:
        raise ValueError(f"give at least one pool: {_POOL_HELP}")
    return select_mixture([parse_pool(p) for p in pools], method, seed, out, filters, diversity)


__all__ = [
    "SCORES_FILE",
    "Pool",
    "parse_pool",
    "read_score_manifest",
    "run_select",
    "select_mixture",
]
