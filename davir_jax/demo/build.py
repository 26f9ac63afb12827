"""Rebuild the demo's vendored data (`davir_jax/demo/data/`) from the upstream files.

    python -m davir_jax.demo.build --shared ../shared/data

The demo ships real instruction data inside the package, because a user's fresh machine has no
`../shared/data`. Both upstream sets are MIT-licensed; their LICENSE files are copied beside the
rows. What is kept, deterministically for `--seed`:

* alpaca-libre (mobarski/alpaca-libre, an Alpaca-style set generated the way Stanford Alpaca
  was): the rows its own generator accepted (`status == "ok"`), with a non-empty response, the
  malformed lines skipped; `--alpaca` of them drawn at random.
* GSM8K (openai/grade-school-math) train: `--gsm8k` problems drawn at random, as Alpaca rows
  (the question as the instruction, the worked answer ending in `#### N` as the response).

Rows are taken in the shuffled order, each skipped when its prompt is an exact or near-exact
duplicate of one already kept (`NEAR_DUP_JACCARD`), so no two kept prompts are. Every row
carries `task` (alpaca or gsm8k) and `origin` (upstream file and line) so a reader can trace it;
nothing else is changed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from davir_jax.core.io import dumps_json, write_atomic

DATA = Path(__file__).resolve().parent / "data"
ROWS_FILE = "instructions.jsonl"
# Jaccard similarity of two prompts' word sets at or above which they count as near-exact
# duplicates (a reworded punctuation or one changed word in a ten-word prompt stays above it).
NEAR_DUP_JACCARD = 0.8


def prompt_words(row: dict) -> frozenset[str]:
    """The lower-cased words of a row's instruction and input."""
    text = f"{row['instruction']} {row.get('input', '')}".lower()
    return frozenset(re.findall(r"[a-z0-9]+", text))


def near_duplicates(
    rows: Sequence[dict], threshold: float = NEAR_DUP_JACCARD
) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose prompts' word sets have Jaccard similarity >= `threshold`
    (identical word sets included). Pairs are only compared when their sizes allow the
    threshold, which keeps this fast on a few thousand rows."""
    words = [prompt_words(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(words[i]))
    pairs = []
    for a, i in enumerate(order):
        wi = words[i]
        for j in order[a + 1 :]:
            wj = words[j]
            if len(wi) < threshold * len(wj):  # |A & B| / |A | B| <= |A| / |B| < threshold
                break
            union = len(wi | wj)
            if union == 0 or len(wi & wj) / union >= threshold:
                pairs.append((min(i, j), max(i, j)))
    return sorted(pairs)


def _jsonl(path: Path) -> Iterable[tuple[int, dict]]:
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            continue  # alpaca-libre has 14 malformed lines; they are not data


def alpaca_rows(shared: Path) -> list[dict]:
    out = []
    for f in sorted((shared / "alpaca-libre").glob("tasks_v*.jsonl")):
        for n, r in _jsonl(f):
            if r.get("status") == "ok" and str(r.get("output", "")).strip():
                out.append(
                    {
                        "instruction": r["instruction"],
                        "input": r.get("input", ""),
                        "output": r["output"],
                        "task": "alpaca",
                        "origin": f"alpaca-libre/{f.name}:{n}",
                    }
                )
    return out


def gsm8k_rows(shared: Path) -> list[dict]:
    f = shared / "gsm8k" / "train.jsonl"
    return [
        {
            "instruction": r["question"],
            "input": "",
            "output": r["answer"],
            "task": "gsm8k",
            "origin": f"gsm8k/train.jsonl:{n}",
        }
        for n, r in _jsonl(f)
    ]


def _similar(a: frozenset[str], b: frozenset[str], threshold: float) -> bool:
    union = len(a | b)
    return union == 0 or len(a & b) / union >= threshold


def take_distinct(rows: Iterable[dict], n: int, kept: list[dict]) -> list[dict]:
    """Up to `n` of `rows`, in order, each skipped when its prompt is a near-exact duplicate of
    one already kept (in `kept` or taken here)."""
    seen = [prompt_words(r) for r in kept]
    out = []
    for r in rows:
        if len(out) == n:
            break
        w = prompt_words(r)
        if any(_similar(w, v, NEAR_DUP_JACCARD) for v in seen):
            continue
        seen.append(w)
        out.append(r)
    return out


def build(shared: Path, n_alpaca: int, n_gsm8k: int, seed: int, out: Path = DATA) -> Path:
    rng = random.Random(seed)
    alpaca, gsm = alpaca_rows(shared), gsm8k_rows(shared)
    rng.shuffle(alpaca)
    rng.shuffle(gsm)
    rows = take_distinct(alpaca, n_alpaca, [])
    rows += take_distinct(gsm, n_gsm8k, rows)
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / ROWS_FILE, "".join(dumps_json(r, ensure_ascii=False) + "\n" for r in rows))
    shutil.copyfile(shared / "alpaca-libre" / "LICENSE", out / "LICENSE.alpaca-libre")
    shutil.copyfile(shared / "gsm8k" / "LICENSE", out / "LICENSE.gsm8k")
    return out / ROWS_FILE


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--alpaca", type=int, default=1000)
    ap.add_argument("--gsm8k", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    path = build(a.shared, a.alpaca, a.gsm8k, a.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
