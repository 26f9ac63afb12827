"""The real-data study (issue 15, item 5): DavIR, RHO and random selection at the paper's budget
(about 6%) and a larger one, on a real pool, with several seeds, through the same pipeline and
report as `davir demo`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/selection_study.py \
        --source alpaca --pool 1000 --val 100 --test 400 --seeds 3 \
        --budgets fraction=0.06,fraction=0.25 --out runs/study --append-results

Data (from ../shared/data; skipped with a message when absent): alpaca-libre rows its generator
accepted (`status == ok`, non-empty output), GSM8K train problems, or both (`--source mix`,
`--gsm8k-share` of them GSM8K, as the paper's Alpaca + GSM8K mixture), drawn at random, with no
exact or near-exact duplicate prompts (`davir_jax.demo.build.take_distinct`), split i.i.d. by
task into pool / validation / test (`davir_jax.demo.write_splits`); `--corrupt` swaps the
responses of that share of the pool (default 0: real data as it comes). The model, optimizer and
batch are `configs/demo.yaml`'s unless overridden (`--override key=value`, repeatable). With
GSM8K in the test set, `--generate N` also measures exact match (the number after ####).

The report (`OUT/report.md`) states the held-out loss per method with seeds and paired bootstrap
intervals against random, and the length correlations; `per_example` adds the same comparison with
every held-out item weighted equally (the report's loss weights items by their response length),
overall and split at the median length; `--append-results` copies those
sections, the command and the machine into benchmarks/RESULTS.md. Nothing here is tuned on the
outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from davir_jax.config import load_config  # noqa: E402
from davir_jax.core.selection import SelectionMethod  # noqa: E402
from davir_jax.core.stats import bootstrap_ci  # noqa: E402
from davir_jax.demo import LABELS, write_splits  # noqa: E402
from davir_jax.demo.build import alpaca_rows, gsm8k_rows, take_distinct  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
KEEP = ("## Scores", "## Response length", "## Length", "## What each", "## Held-out", "## Ref")


def study_rows(source: str, n: int, gsm8k_share: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    alpaca, gsm = alpaca_rows(SHARED), gsm8k_rows(SHARED)
    rng.shuffle(alpaca)
    rng.shuffle(gsm)
    n_gsm = {"alpaca": 0, "gsm8k": n, "mix": round(gsm8k_share * n)}[source]
    rows = take_distinct(alpaca, n - n_gsm, [])
    rows += take_distinct(gsm, n_gsm, rows)
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} distinct rows for --source {source}; ask for fewer")
    return rows


def sections(report: str) -> str:
    """The report's sections on scores, selections and held-out results (verbatim)."""
    out, keep = [], False
    for line in report.splitlines():
        if line.startswith("## "):
            keep = line.startswith(KEEP)
        if keep and not line.startswith("!["):
            out.append(line.replace("## ", "#### ", 1) if line.startswith("## ") else line)
    return "\n".join(out)


def _item_losses(run: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(example ids, per-example loss L/T, T) of one evaluated model, sorted by id."""
    rows = [json.loads(x) for x in (run / "examples.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["example_id"])
    ids = [r["example_id"] for r in rows]
    return ids, np.array([r["loss"] for r in rows]), np.array([r["n_tokens"] for r in rows])


def per_example(out: Path, methods: list[str], budgets: list[str], seeds: int) -> str:
    """The held-out comparison with every item weighted equally (the mean of per-example L/T,
    beside the report's token-weighted loss), overall and split at the median response length
    of the held-out items; paired differences against `random` with 95% bootstrap intervals
    over items (each item's loss averaged over seeds, as in the report)."""
    ids, _, t = _item_losses(out / "eval" / "base")
    short = t <= np.median(t)
    groups = {"all": np.ones_like(short), f"T <= {np.median(t):.0f}": short, "longer": ~short}
    lines = [
        f"Held-out items weighted equally: mean per-example loss (L/T), {len(ids)} items; "
        f"median response length {np.median(t):.0f} tokens. d = method minus random at the same "
        "budget, 95% bootstrap interval over items.",
        "",
        "| selection | per-example loss, mean ± sd over seeds | "
        + " | ".join(f"d vs random, {g} (n={int(m.sum())})" for g, m in groups.items())
        + " |",
        "| --- | ---: |" + " ---: |" * len(groups),
    ]
    for budget in budgets:
        tag = budget.replace("=", "")
        mean = {}
        for method in methods:
            runs = [_item_losses(out / "eval" / f"{method}-{tag}-s{k}") for k in range(seeds)]
            if any(r[0] != ids for r in runs):
                raise SystemExit(f"{out}: the evaluations of {method}-{tag} hold other items")
            per_seed = [r[1].mean() for r in runs]
            mean[method] = np.mean([r[1] for r in runs], axis=0)
            sd = np.std(per_seed, ddof=1) if seeds > 1 else 0.0
            cells = []
            for m in groups.values():
                if method == "random" or "random" not in mean:
                    cells.append("")
                    continue
                d = (mean[method] - mean["random"])[m]
                iv = bootstrap_ci(lambda x: x.mean(axis=-1), d)
                cells.append(f"{iv.point:+.4f} [{iv.lo:+.4f}, {iv.hi:+.4f}]")
            lines.append(
                f"| {method}-{tag} | {np.mean(per_seed):.4f} ± {sd:.4f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def overlap(out: Path, methods: list[str], budgets: list[str]) -> str:
    """Jaccard similarity |A & B| / |A | B| of the first seed's selections of every two methods
    at each budget (`random` left out: its draw is not a ranking)."""
    lines = []
    for budget in budgets:
        tag = budget.replace("=", "")
        chosen = {}
        for m in methods:
            if m == "random":
                continue
            sel = json.loads((out / "select" / f"{m}-{tag}-s0" / "manifest.json").read_text())
            chosen[m] = {x["example_id"] for x in sel["selected"]}
        names = list(chosen)
        sizes = ", ".join(f"{m} {len(chosen[m])}" for m in names)
        lines += [f"Selections at {budget} (first seed; sizes: {sizes}), Jaccard:", ""]
        lines += ["| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names)]
        for a in names:
            cells = [len(chosen[a] & chosen[b]) / max(len(chosen[a] | chosen[b]), 1) for b in names]
            lines.append(f"| {a} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=("alpaca", "gsm8k", "mix"), default="alpaca")
    ap.add_argument("--gsm8k-share", type=float, default=0.2)
    ap.add_argument("--pool", type=int, default=1000)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=400)
    ap.add_argument("--corrupt", type=float, default=0.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--budgets", default="fraction=0.06,fraction=0.25")
    ap.add_argument("--methods", default="davir,rho,random")
    ap.add_argument("--generate", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--override", action="append", default=[])
    ap.add_argument("--append-results", action="store_true")
    a = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED}: the study reads ../shared/data")
    from davir_jax.jobs.pipeline import run_pipeline

    out = Path(a.out)
    rows = study_rows(a.source, a.pool + a.val + a.test, a.gsm8k_share, a.seed)
    sizes = {"pool": a.pool, "val": a.val, "test": a.test}
    paths = write_splits(rows, out / "data", sizes, a.corrupt, a.seed)
    overrides = [
        f"--pipeline.out={out}",
        f"--data.path={paths['pool']}",
        f"--pipeline.val={paths['val']}",
        f"--pipeline.test={paths['test']}",
        f"--pipeline.labels=[{','.join(LABELS)}]",
        f"--pipeline.seeds={a.seeds}",
        f"--pipeline.budgets=[{a.budgets}]",
        f"--pipeline.methods=[{a.methods}]",
        f"--pipeline.generate={a.generate}",
        f"--seed={a.seed}",
        *(["--eval.answer=gsm8k"] if a.source == "gsm8k" else []),
        *(f"--{o.lstrip('-')}" for o in a.override),
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    t0 = time.time()
    run_pipeline(cfg)
    minutes = (time.time() - t0) / 60
    report = (out / "report.md").read_text()
    print(report)
    # random first: every other method is compared with it
    labels = [SelectionMethod.parse(m).label for m in a.methods.split(",")]
    methods = sorted(labels, key=lambda m: m != "random")
    budgets = a.budgets.split(",")
    print(per_example(out, methods, budgets, a.seeds))
    print(overlap(out, methods, budgets))
    if a.append_results:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (x.split(":", 1)[1].strip() for x in cpu.splitlines() if "Model name" in x), ""
        )
        cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/selection_study.py " + " ".join(
            sys.argv[1:]
        )
        text = (
            f"\n## Selection study on real data ({a.source}; {time.strftime('%Y-%m-%d')})\n\n"
            f"Command: `{cmd}` ({minutes:.0f} min). Machine: {model or platform.processor()}, "
            f"{os.cpu_count()} cores. Pool {a.pool}, validation {a.val}, held-out {a.test}; "
            f"seeds {a.seeds}; budgets {a.budgets}. The sections below are the run's "
            "`report.md`, verbatim: every sentence in them is computed from its numbers.\n\n"
            + sections(report)
            + "\n\n#### Held-out items weighted equally\n\n"
            + per_example(out, methods, budgets, a.seeds)
            + "\n#### Overlap of the selections\n\n"
            + overlap(out, methods, budgets)
        )
        from results_md import add_section

        add_section(text)


if __name__ == "__main__":
    main()
