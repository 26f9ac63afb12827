"""The embedded demo's data: real instruction data shipped with the package, split i.i.d.

`davir_jax/demo/data/instructions.jsonl` holds 1,200 real rows (alpaca-libre instructions and
GSM8K math problems, MIT-licensed, near-duplicate prompts removed; `davir_jax/demo/build.py`
says how they were drawn). `make_splits` draws, for a seed, three disjoint sets from them,
stratified by `task` so that each holds the same task mix as the whole:

* `pool.jsonl`: what DavIR scores and selects from, and what the reference is trained on;
* `val.jsonl`: a split of the pool kept out of the reference's training; its loss chooses the
  reference's recipe (the epoch, `train.val`), never the selection results;
* `test.jsonl`: the held-out evaluation set, i.i.d. with the pool and clean.

Quality varies as real data does. On top of that, a standard corruption marks a random share
of the POOL (`corrupt`, default 10%): those rows' responses are swapped among themselves (a
random cyclic shift, so each gets another row's real response). Every row says what it is in
`quality` (`original` or `swapped`) and `task`; these labels describe selections in the report
only, no selection method reads them. Validation and test rows are never corrupted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from davir_jax.core import storage
from davir_jax.core.io import dumps_json, write_atomic

DATA_FILE = Path(__file__).resolve().parent / "data" / "instructions.jsonl"
LABELS = ("task", "quality")


def vendored_rows(path: Path = DATA_FILE) -> list[dict]:
    """The shipped rows (one JSON object per line)."""
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _stratified(rows: list[dict], sizes: dict[str, int], rng: random.Random) -> dict[str, list]:
    """Split `rows` into disjoint sets of the given sizes, each with the task mix of `rows`."""
    total = sum(sizes.values())
    if total > len(rows):
        raise ValueError(f"the splits need {total} rows; there are {len(rows)}")
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    out: dict[str, list[dict]] = {name: [] for name in sizes}
    for _task, items in sorted(by_task.items()):
        rng.shuffle(items)
        start = 0
        for name, n in sizes.items():
            k = round(n * len(items) / len(rows))
            out[name] += items[start : start + k]
            start += k
    for items in out.values():
        rng.shuffle(items)
    return out


def swap_responses(rows: list[dict], fraction: float, rng: random.Random) -> list[dict]:
    """A copy of `rows` where a random `fraction` of them have their responses swapped among
    themselves (a cyclic shift over a random order); labels in `quality`."""
    out = [{**r, "quality": "original"} for r in rows]
    k = round(fraction * len(rows))
    if k < 2:
        return out
    idx = rng.sample(range(len(rows)), k)
    responses = [rows[i]["output"] for i in idx]
    for n, i in enumerate(idx):
        out[i]["output"] = responses[(n + 1) % k]
        out[i]["quality"] = "swapped"
    return out


def write_splits(
    rows: list[dict], out_dir: str | Path, sizes: dict[str, int], corrupt: float, seed: int
) -> dict[str, Path]:
    """Split `rows` (each with a `task`) into disjoint, task-stratified sets of `sizes` (names
    `pool`, `val`, `test`), swap the responses of a `corrupt` share of the pool, and write
    `<name>.jsonl` files into `out_dir`; returns their paths."""
    rng = random.Random(seed)
    parts = _stratified(rows, sizes, rng)
    parts["pool"] = swap_responses(parts["pool"], corrupt, rng)
    for name in parts:
        if name != "pool":
            parts[name] = [{**r, "quality": "original"} for r in parts[name]]
    out = storage.upath(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in parts.items():
        paths[name] = out / f"{name}.jsonl"
        write_atomic(paths[name], "".join(dumps_json(r, ensure_ascii=False) + "\n" for r in part))
    return paths


def make_splits(
    out_dir: str | Path,
    n_pool: int = 120,
    n_val: int = 30,
    n_test: int = 300,
    corrupt: float = 0.1,
    seed: int = 0,
) -> dict[str, Path]:
    """The demo's splits of the shipped rows: `pool.jsonl`, `val.jsonl` and `test.jsonl` in
    `out_dir`; returns their paths."""
    sizes = {"pool": n_pool, "val": n_val, "test": n_test}
    return write_splits(vendored_rows(), out_dir, sizes, corrupt, seed)


def pipeline_overrides(out: str | Path, splits: dict[str, Path] | None) -> list[str]:
    """Config overrides that run the pipeline in `out` on the demo's `splits` (from
    `make_splits`; None: on the data the config names), the report describing selections by
    the rows' `LABELS`."""
    items = [f"--pipeline.out={out}"]
    if splits is not None:
        items += [
            f"--data.path={splits['pool']}",
            f"--pipeline.val={splits['val']}",
            f"--pipeline.test={splits['test']}",
            f"--pipeline.labels=[{','.join(LABELS)}]",
        ]
    return items
