"""The embedded demo's data: short instruction tasks with exact answers and planted quality tiers.

Deterministic for a seed; written as Alpaca-format JSONL (`instruction`, `input`, `output`) plus a
`tier` field that the pipeline report uses to show what each selection method picked (the
readers ignore unknown fields, so the files are ordinary Alpaca data).

Tiers of the training pool:
* `correct`: a task and its right answer (arithmetic, word manipulation, counting, ordering);
  learnable, and what a good selection should keep.
* `wrong`: the same kinds of tasks with a wrong or corrupted answer (an off-by-some number, a
  scrambled word); noise that fine-tuning should not spend its budget on.
* `trivial`: tasks the base model already does (repeat a word, say yes): little to learn.

The held-out test split holds only `correct` items, none of which appears in the pool. The
generator is not tuned to any selection method: the tiers are fixed by their definitions above.
"""

from __future__ import annotations

import random
from pathlib import Path

from davir_jax.io_utils import dumps_json

WORDS = (
    "apple river stone cloud tiger garden window silver music forest candle rocket pepper "
    "orange button planet violet dragon summer winter meadow castle harbor lemon marble "
    "pencil rabbit saddle tunnel velvet wagon yellow zebra anchor bottle copper dolphin"
).split()

TIERS = ("correct", "wrong", "trivial")


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, right answer) of one random task."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    if kind == 1:
        a, b = rng.randint(20, 99), rng.randint(1, 19)
        return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)
    if kind == 2:
        w = rng.choice(WORDS)
        return "Write the word backwards.", w, w[::-1]
    if kind == 3:
        w = rng.choice(WORDS)
        return "Write the word in capital letters.", w, w.upper()
    if kind == 4:
        w = rng.choice(WORDS)
        return "How many letters does the word have?", w, str(len(w))
    ws = rng.sample(WORDS, 3)
    return "Sort the words alphabetically.", ", ".join(ws), ", ".join(sorted(ws))


def _corrupt(answer: str, rng: random.Random) -> str:
    if answer.lstrip("-").isdigit():
        return str(int(answer) + rng.choice([-7, -3, -2, 2, 3, 5, 11]))
    chars = list(answer)
    while "".join(chars) == answer and len(set(answer)) > 1:
        rng.shuffle(chars)
    return "".join(chars)


def _trivial(rng: random.Random) -> tuple[str, str, str]:
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        return "Repeat the word exactly.", w, w
    return "Answer with yes.", "Is this a question?", "yes"


def generate_demo(
    out_dir: str | Path,
    n_pool: int = 240,
    n_test: int = 60,
    shares: tuple[float, float, float] = (0.5, 0.3, 0.2),
    seed: int = 0,
) -> dict[str, Path]:
    """Write `pool.jsonl` (tiers mixed by `shares`: correct, wrong, trivial) and `test.jsonl`
    (correct only, disjoint from the pool) into `out_dir`; returns their paths."""
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[tuple[str, str]] = set()
    counts = [round(s * n_pool) for s in shares]
    counts[0] += n_pool - sum(counts)
    pool = []
    for tier, n in zip(TIERS, counts):
        made = 0
        while made < n:
            if tier == "trivial":
                ins, inp, ans = _trivial(rng)
            else:
                ins, inp, ans = _task(rng)
                if (ins, inp) in seen:
                    continue
                seen.add((ins, inp))
                if tier == "wrong":
                    ans = _corrupt(ans, rng)
            pool.append({"instruction": ins, "input": inp, "output": ans, "tier": tier})
            made += 1
    rng.shuffle(pool)
    test = []
    while len(test) < n_test:
        ins, inp, ans = _task(rng)
        if (ins, inp) in seen:
            continue
        seen.add((ins, inp))
        test.append({"instruction": ins, "input": inp, "output": ans, "tier": "correct"})
    paths = {"pool": out / "pool.jsonl", "test": out / "test.jsonl"}
    for name, rows in (("pool", pool), ("test", test)):
        paths[name].write_text("".join(dumps_json(r) + "\n" for r in rows))
    return paths
