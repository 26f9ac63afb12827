"""report.md from fake run folders (files written directly, no model runs): every sentence
follows the numbers of the run, and every number of the group table is a NumPy computation on
the fixture."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from davir_jax.config import Config, PipelineConfig
from davir_jax.core.stats import Interval
from davir_jax.data.config import DataConfig
from davir_jax.reports.report import classify_length_claim, write_report

TASKS = ("add", "reverse", "count")
QUALITY = ("good", "bad")


def _cfg(out: Path, pool: Path, test: Path | None, **pipeline) -> Config:
    """A Config whose pipeline has `seeds` and `labels` whether or not PipelineConfig has
    them yet (the report reads them with getattr)."""
    base = dict(out=str(out), test=None if test is None else str(test))
    base.update(methods=("davir", "rho", "random"), budgets=("fraction=0.25",))
    base.update(pipeline)
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    if set(base) <= fields:
        pc = PipelineConfig(**base)
    else:
        known = {k: v for k, v in base.items() if k in fields}
        pc = SimpleNamespace(**{**dataclasses.asdict(PipelineConfig(**known)), **base})
    return dataclasses.replace(Config(data=DataConfig(path=str(pool))), pipeline=pc)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_pool(run: Path, n: int, davir_follows_length: bool, seed: int = 0) -> dict:
    """Pool file and scores/scores.parquet. nll_base = T * b (b per-token base loss, noisy);
    nll_ref = nll_base * (1 - f): davir = f. f independent of T, or f increasing with T."""
    rng = np.random.default_rng(seed)
    t = rng.integers(4, 120, n)
    b = rng.uniform(0.5, 3.0, n)
    f = (t / 121.0) if davir_follows_length else rng.uniform(0.1, 0.9, n)
    nll_base = t * b
    nll_ref = nll_base * (1 - f)
    task = np.array([TASKS[i % 3] for i in range(n)])
    quality = np.array([QUALITY[(i // 3) % 2] for i in range(n)])
    rows = [
        {
            "instruction": f"q{i}",
            "input": "",
            "output": "a" * int(t[i]),
            "task": str(task[i]),
            "quality": str(quality[i]),
        }
        for i in range(n)
    ]
    pool = run.parent / "pool.jsonl"
    _write(pool, _jsonl(rows))
    ids = [f"pool:{i}" for i in range(n)]
    table = pa.table(
        {
            "example_id": ids,
            "source": ["pool"] * n,
            "row": pa.array(range(n), pa.int64()),
            "content_hash": ["0" * 16] * n,
            "n_tokens": pa.array(t, pa.int64()),
            "nll_base": nll_base,
            "nll_ref": nll_ref,
            "logp_ref": -nll_ref,
            "record": [json.dumps(r) for r in rows],
        }
    )
    (run / "scores").mkdir(parents=True)
    pq.write_table(table, run / "scores" / "scores.parquet")
    _write(
        run / "scores" / "manifest.json",
        json.dumps({"n_examples": n, "skipped": {"malformed_json": 2}}),
    )
    return dict(
        pool=pool, ids=ids, t=t, nll_base=nll_base, nll_ref=nll_ref, task=task, quality=quality
    )


def make_selections(run: Path, fx: dict, seeds: int) -> None:
    n = len(fx["ids"])
    k = n // 4
    rng = np.random.default_rng(1)
    order = {
        "davir": np.argsort(-(1 - fx["nll_ref"] / fx["nll_base"]), kind="stable"),
        "rho": np.argsort(-(fx["nll_base"] - fx["nll_ref"]), kind="stable"),
    }
    for s in range(seeds):
        for method in ("davir", "rho", "random"):
            idx = order[method][:k] if method in order else rng.permutation(n)[:k]
            d = run / "select" / f"{method}-fraction0.25-s{s}"
            sel = [
                {"example_id": fx["ids"][i], "pool": "pool", "score": 0.0, "rank": r + 1}
                for r, i in enumerate(idx)
            ]
            _write(
                d / "manifest.json",
                json.dumps(
                    {
                        "method": method,
                        "n_selected": k,
                        "selected": sel,
                        "pools": [{"name": "pool", "file": "pool.jsonl", "n_selected": k}],
                    }
                ),
            )
            _write(d / "pool.jsonl", "")


def make_evals(run: Path, seeds: int, n_items: int = 200, n_gen: int = 50) -> dict:
    """base worst; davir clearly below random on every item; rho equal to random on average
    (zero-mean per-token noise) with the same exact-match verdicts."""
    rng = np.random.default_rng(2)
    t = rng.integers(5, 50, n_items)
    ids = [f"test:{i}" for i in range(n_items)]
    rand = [t * (1.5 + rng.normal(0, 0.1, n_items)) for _ in range(seeds)]
    eps = rng.normal(0, 0.05, n_items)
    eps -= np.sum(eps * t) / np.sum(t)  # sum(eps * T) = 0: rho's mean equals random's
    rand_correct = [rng.random(n_gen) < 0.5 for _ in range(seeds)]
    models = {
        "base": ([t * 2.5], [np.zeros(n_gen, bool)]),
        "full": ([t * 1.2], [np.ones(n_gen, bool)]),
    }
    for s in range(seeds):
        models[f"random-fraction0.25-s{s}"] = ([rand[s]], [rand_correct[s]])
        models[f"rho-fraction0.25-s{s}"] = ([rand[s] + eps * t], [rand_correct[s]])
        models[f"davir-fraction0.25-s{s}"] = ([rand[s] - 0.3 * t], [np.ones(n_gen, bool)])
    for name, ([nll], [correct]) in models.items():
        rows = []
        for i in range(n_items):
            r = {
                "example_id": ids[i],
                "nll": float(nll[i]),
                "n_tokens": int(t[i]),
                "loss": float(nll[i] / t[i]),
            }
            if i < n_gen:
                r["correct"] = bool(correct[i])
            rows.append(r)
        _write(run / "eval" / name / "examples.jsonl", _jsonl(rows))
        _write(
            run / "eval" / name / "eval.json",
            json.dumps(
                {
                    "loss": float(nll.sum() / t.sum()),
                    "n_examples": n_items,
                    "n_tokens": int(t.sum()),
                    "accuracy": float(np.mean(correct)),
                    "n_generated": n_gen,
                }
            ),
        )
    return dict(t=t, models=models)


def make_run(
    tmp_path: Path,
    davir_follows_length: bool = False,
    seeds: int = 3,
    labels=("task", "quality"),
    evals=True,
    **pipeline,
):
    run = tmp_path / "run"
    run.mkdir()
    fx = make_pool(run, 240, davir_follows_length)
    make_selections(run, fx, seeds)
    test = tmp_path / "test.jsonl"
    _write(test, "")
    if evals:
        fx["eval"] = make_evals(run, seeds)
    _write(run / "stages" / "scores.json", json.dumps({"seconds": 12.5}))
    _write(
        run / "reference" / "metrics.jsonl",
        _jsonl([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]),
    )
    cfg = _cfg(run, fx["pool"], test, seeds=seeds, labels=labels, **pipeline)
    return run, cfg, fx


def _table(report: str, header_start: str) -> list[list[str]]:
    lines = report.splitlines()
    i = next(j for j, x in enumerate(lines) if x.startswith(header_start))
    rows = []
    for x in lines[i + 2 :]:
        if not x.startswith("|"):
            break
        rows.append([c.strip() for c in x.strip("|").split("|")])
    return rows


def test_length_claim_confirmed_when_davir_does_not_follow_length(tmp_path):
    run, cfg, _ = make_run(tmp_path, davir_follows_length=False)
    report = write_report(run, cfg).read_text()
    assert "is **confirmed** by this run" in report
    assert "**weakened**" not in report and "**reversed**" not in report


def test_length_claim_not_confirmed_when_davir_follows_length(tmp_path):
    run, cfg, _ = make_run(tmp_path, davir_follows_length=True)
    report = write_report(run, cfg).read_text()
    assert "**confirmed**" not in report
    # davir = T/121 is a monotone function of T: Spearman 1, at or above rho's.
    assert "is **reversed** by this run" in report
    assert "davir's correlation is positive" in report


@pytest.mark.parametrize(
    "rho, davir, verdict",
    [
        ((0.8, 0.75, 0.85), (0.3, 0.2, 0.4), "confirmed"),
        ((0.8, 0.75, 0.85), (-0.3, -0.4, -0.2), "confirmed"),  # |davir| is the strength
        ((0.8, 0.6, 0.9), (0.5, 0.3, 0.7), "weakened"),  # intervals overlap
        ((0.2, -0.1, 0.5), (0.05, -0.2, 0.3), "weakened"),  # rho's positive sign not shown
        ((0.5, 0.4, 0.6), (0.5, 0.4, 0.6), "reversed"),  # equal
        ((0.5, 0.4, 0.6), (-0.7, -0.8, -0.6), "reversed"),  # davir follows length, negatively
        ((float("nan"),) * 3, (0.1, 0.0, 0.2), "undetermined"),
    ],
)
def test_classify_length_claim_rule(rho, davir, verdict):
    r = Interval(*rho, 0.95, 100)
    d = Interval(*davir, 0.95, 100)
    # |davir| interval: the interval of |r| when it does not straddle 0 (as in these cases).
    lo, hi = sorted((abs(davir[1]), abs(davir[2])))
    if davir[1] < 0 < davir[2]:
        lo = 0.0
    a = Interval(abs(davir[0]), lo, hi, 0.95, 100)
    assert classify_length_claim(r, d, a) == verdict


def test_held_out_sentences_follow_the_numbers(tmp_path):
    run, cfg, fx = make_run(tmp_path)
    report = write_report(run, cfg).read_text()
    assert "**200 held-out items**" in report
    assert f"({int(fx['eval']['t'].sum()):,} response tokens)" in report
    davir = next(x for x in report.splitlines() if x.startswith("- `davir` at fraction=0.25"))
    rho = next(x for x in report.splitlines() if x.startswith("- `rho` at fraction=0.25"))
    assert "lower held-out loss than random shown (d = -0.3000" in davir
    assert "no difference shown at this size (d = " in rho
    i = report.splitlines().index(davir)
    assert "higher exact-match accuracy than random shown" in report.splitlines()[i + 1]
    assert (
        "no difference shown at this size"
        in report.splitlines()[report.splitlines().index(rho) + 1]
    )
    assert "lower held-out loss than the base shown" in report  # full vs base
    on_pool = fx["nll_ref"].sum() / fx["t"].sum()
    assert f"own training pool is {on_pool:.4f} nats per token" in report
    assert f"held-out minus pool = {1.2 - on_pool:+.4f}" in report
    # The results table: mean ± sd over the 3 seeds and each seed's value, from eval.json.
    rows = {r[0]: r for r in _table(report, "| model |")}
    assert set(rows) == {
        "base",
        "full",
        "davir-fraction0.25",
        "rho-fraction0.25",
        "random-fraction0.25",
    }
    losses = [
        fx["eval"]["models"][f"random-fraction0.25-s{s}"][0][0].sum() / fx["eval"]["t"].sum()
        for s in range(3)
    ]
    assert rows["random-fraction0.25"][2] == "3"
    assert rows["random-fraction0.25"][3] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"
    assert rows["random-fraction0.25"][4] == ", ".join(f"{x:.4f}" for x in losses)
    assert rows["random-fraction0.25"][1] == "60"
    assert "interval resamples held-out items only" in report
    assert "within run-to-run noise" not in report and "Lowest held-out loss" not in report
    for png in ("results.png", "training_curves.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"


def test_one_seed_says_the_interval_is_over_items_only(tmp_path):
    run, cfg, _ = make_run(tmp_path, seeds=1)
    report = write_report(run, cfg).read_text()
    assert "one seed" in report and "not the variation between training seeds" in report
    rows = {r[0]: r for r in _table(report, "| model |")}
    assert "±" not in rows["davir-fraction0.25"][3]


def test_group_table_equals_numpy(tmp_path):
    run, cfg, fx = make_run(tmp_path)
    report = write_report(run, cfg).read_text()
    t, lb, lr = fx["t"], fx["nll_base"], fx["nll_ref"]
    for label, values in (("task", fx["task"]), ("quality", fx["quality"])):
        rows = _table(report, f"| {label} | n |")
        groups = sorted(set(values.tolist()))
        assert [r[0] for r in rows] == groups + ["all"]
        for r in rows:
            m = np.ones(len(t), bool) if r[0] == "all" else values == r[0]
            b, f = np.mean(lb[m] / t[m]), np.mean(lr[m] / t[m])
            want = [
                str(m.sum()),
                f"{b:.4f}",
                f"{f:.4f}",
                f"{f / b:.3f}",
                f"{np.mean((lb[m] - lr[m]) / lb[m]):.4f}",
                f"{np.mean(lb[m] - lr[m]):.3f}",
                f"{np.mean(t[m]):.1f}",
            ]
            assert r[1:] == want, (label, r[0])
    per_tok = lr / t
    k = int(np.sum(per_tok < 0.05))
    assert f"{k} of {len(t)} examples ({k / len(t):.1%}) have L_ref/T below 0.05" in report
    # What each method selected: the shares of the davir selection (identical over seeds).
    shares = {r[0]: r[1:] for r in _table(report, "| selection | add |")}
    idx = np.argsort(-(1 - lr / lb), kind="stable")[:60]
    assert shares["davir-fraction0.25"] == [
        f"{np.mean(fx['task'][idx] == v):.3f}" for v in ("add", "count", "reverse")
    ]
    # One data source and labels given: no one-row source table.
    assert "| source | n |" not in report
    sel = {r[0]: r for r in _table(report, "| selection | seeds |")}
    assert sel["davir-fraction0.25"][1:4] == ["3", "1", "60"]
    assert sel["random-fraction0.25"][2] == "3"  # three different random subsets
    assert sel["davir-fraction0.25"][4] == f"{np.mean(t[idx]):.1f}"


def test_report_without_evaluations_or_labels(tmp_path):
    run, cfg, _ = make_run(tmp_path, labels=(), evals=False, seeds=1)
    report = write_report(run, cfg).read_text()
    assert "## Held-out results" not in report
    assert "grouped by data source only" in report
    assert "| source | n |" in report
    assert "not validated" in report
    assert "2 rows skipped (malformed_json: 2)" in report


def test_validation_is_reported_from_val_json(tmp_path):
    run, cfg, _ = make_run(tmp_path, evals=False, seeds=1, val=str(tmp_path / "val.jsonl"))
    _write(
        run / "reference" / "val.json",
        json.dumps(
            {
                "val_loss": [1.5, 1.25, 1.375],
                "best_epoch": 2,
                "epochs_run": 3,
                "stopped_early": True,
                "n_val": 40,
            }
        ),
    )
    report = write_report(run, cfg).read_text()
    assert "held-out loss per epoch 1.5000 (epoch 1), 1.2500 (epoch 2), 1.3750 (epoch 3)" in report
    assert "chosen epoch 2" in report and "(40 examples)" in report and "stopped early" in report
