"""The pipeline's report: `report.md` with PNGs, every sentence computed from this run's files.

Sections: what was run; the pool's losses and scores by group (`pipeline.labels` and the data
source), with the share of near-memorised examples; the length argument (Spearman and Pearson of
each score with response length, 95% bootstrap intervals, and whether the paper's claim is
confirmed, weakened or reversed here, see `classify_length_claim`); what each method selected;
training curves; held-out results per method and budget over `pipeline.seeds` seeds, with the
paired difference against `random` at the same budget and its 95% bootstrap interval over
held-out items (`davir_jax.core.stats`); stage timings.

The report states what it measured and nothing else: a difference whose interval contains 0 is
written as "no difference shown at this size"; a missing input (no evaluation, no labels, one
seed) leaves its section out or says what is missing.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from davir_jax.core import storage
from davir_jax.core.io import write_atomic
from davir_jax.core.scores import available_scores, compute_scores, read_scores
from davir_jax.core.selection import SelectionMethod
from davir_jax.core.stats import (
    Interval,
    bootstrap_ci,
    correlation_samples,
    interval,
    mean_sd,
    paired_bootstrap,
    token_mean,
)

# L_ref/T below this (nats per response token) = the reference gives the response's tokens a
# geometric-mean probability above exp(-0.05) = 0.95: the example is as good as memorised.
MEMORISED_NATS = 0.05
# The paper's Spearman(score, response length) on Alpaca (arXiv 2310.13008).
PAPER_SPEARMAN = {"rho": "0.75-0.83", "davir": "0.30-0.47"}
HELD_OUT_RESAMPLES = 10000
CORRELATION_RESAMPLES = 1000
BASELINE = "random"


# ---------------------------------------------------------------------------------------------
# Small helpers


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return (
        [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        if path.is_file()
        else []
    )


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return format(x, spec)


def _ci(iv: Interval, spec: str = "+.4f") -> str:
    return f"{_fmt(iv.point, spec)} [{_fmt(iv.lo, spec)}, {_fmt(iv.hi, spec)}]"


def _pm(values: list[float], spec: str = ".4f") -> str:
    m, sd, _ = mean_sd(values)
    return f"{m:{spec}}" + (f" ± {sd:{spec}}" if sd is not None else "")


def _pipeline_opt(cfg: Any, name: str, default: Any) -> Any:
    return getattr(cfg.pipeline, name, default)


def budget_tag(budget: str) -> str:
    """The run-name form of a budget: `fraction=0.1` -> `fraction0.1`."""
    return budget.replace("=", "")


def seed_names(root: Path, prefix: str) -> list[str]:
    """Run folders under `root` of one method and budget: `prefix-s0`, `prefix-s1`, ... in seed
    order, or `[prefix]` for a run without seeds; [] when none exists."""
    pat = re.compile(re.escape(prefix) + r"-s(\d+)")
    found = []
    if root.is_dir():
        found = sorted(
            (int(m.group(1)), p.name)
            for p in root.iterdir()
            if p.is_dir() and (m := pat.fullmatch(p.name))
        )
    if found:
        return [name for _, name in found]
    return [prefix] if (root / prefix).is_dir() else []


def method_runs(cfg: Any) -> list[tuple[str, str, str]]:
    """(budget, method, run prefix) for every budget and method of `cfg.pipeline`."""
    pc = cfg.pipeline
    labels = [SelectionMethod.parse(m).label for m in pc.methods]
    return [(b, m, f"{m}-{budget_tag(b)}") for b in pc.budgets for m in labels]


# ---------------------------------------------------------------------------------------------
# The pool's scores


@dataclass(frozen=True)
class PoolScores:
    """Per-example columns of scores.parquet, with each label's value per example."""

    ids: np.ndarray  # str [N]
    t: np.ndarray  # response tokens T [N]
    nll_base: np.ndarray  # summed L_base [N]
    nll_ref: np.ndarray  # summed L_ref [N]
    scores: dict[str, np.ndarray]  # davir, rho, ... [N]
    labels: dict[str, np.ndarray]  # label name (and "source") -> str [N]


def _label_value(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if v is None:
        return "(none)"
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def load_pool(
    out: Path, labels: tuple[str, ...], extra_scores: tuple[str, ...] = ()
) -> PoolScores | None:
    """The run's scores table as arrays (None when there is none, or it has no base NLLs)."""

    f = out / "scores" / "scores.parquet"
    if not f.is_file():
        return None
    table = read_scores(f)
    if table.column("nll_base").null_count:
        return None
    have = available_scores(table)  # validates the whole table: once, not per score
    names = ["rho", "davir"] + [
        s for s in extra_scores if s in have and s not in ("rho", "davir", "random")
    ]
    scores = compute_scores(table, names)
    records = [json.loads(r) for r in table.column("record").to_pylist()]
    lab = {"source": np.asarray(table.column("source").to_pylist(), dtype=np.str_)}
    for key in labels:
        lab[key] = np.asarray([_label_value(r, key) for r in records], dtype=np.str_)
    col = lambda c: table.column(c).to_numpy(zero_copy_only=False)  # noqa: E731
    return PoolScores(
        ids=col("example_id").astype(np.str_),
        t=col("n_tokens").astype(np.int64),
        nll_base=col("nll_base").astype(np.float64),
        nll_ref=col("nll_ref").astype(np.float64),
        scores=scores,
        labels=lab,
    )


def group_stats(pool: PoolScores, mask: np.ndarray) -> dict[str, float]:
    """Means over the examples of `mask`: L_base/T, L_ref/T (per example), davir, rho, T."""
    t = pool.t[mask]
    base = float(np.mean(pool.nll_base[mask] / t))
    ref = float(np.mean(pool.nll_ref[mask] / t))
    return {
        "n": int(mask.sum()),
        "loss_base": base,
        "loss_ref": ref,
        "ratio": ref / base if base > 0 else float("nan"),
        "davir": float(np.mean(pool.scores["davir"][mask])),
        "rho": float(np.mean(pool.scores["rho"][mask])),
        "tokens": float(np.mean(t)),
    }


def _group_table(pool: PoolScores, label: str) -> list[str]:
    lines = [
        f"| {label} | n | mean L_base/T | mean L_ref/T | ref/base | mean davir | mean rho "
        "| mean T |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    values = pool.labels[label]
    groups = [(v, values == v) for v in sorted(set(values.tolist()))]
    for name, mask in groups + [("all", np.ones(len(values), bool))]:
        s = group_stats(pool, mask)
        lines.append(
            f"| {name} | {s['n']} | {s['loss_base']:.4f} | {s['loss_ref']:.4f} | "
            f"{_fmt(s['ratio'], '.3f')} | {s['davir']:.4f} | {s['rho']:.3f} | {s['tokens']:.1f} |"
        )
    return lines + [""]


def memorisation_sentence(pool: PoolScores) -> str:
    """The share of pool examples the reference has (nearly) memorised, and the ratio of the
    reference's to the base's mean per-token loss on the pool."""
    per_tok = pool.nll_ref / pool.t
    k = int(np.sum(per_tok < MEMORISED_NATS))
    n = len(per_tok)
    s = group_stats(pool, np.ones(n, bool))
    return (
        f"On the {n} pool examples the reference's mean L_ref/T is {s['loss_ref']:.4f} nats per "
        f"token against the base's {s['loss_base']:.4f} (ratio {_fmt(s['ratio'], '.3f')}); "
        f"{k} of {n} examples ({k / n:.1%}) have L_ref/T below {MEMORISED_NATS} nats per token "
        f"(a geometric-mean token probability above {np.exp(-MEMORISED_NATS):.2f})."
    )


def section_groups(pool: PoolScores | None, labels: tuple[str, ...]) -> list[str]:
    """Mean losses and scores per label value and per data source; the memorisation sentence."""
    if pool is None:
        return []
    lines = [
        "## Scores by group",
        "",
        "Means over the examples of each group: L/T is an example's summed response NLL over "
        "its response tokens T (nats per token); davir = (L_base - L_ref) / L_base; "
        "rho = L_base - L_ref (nats); ref/base = mean L_ref/T / mean L_base/T.",
        "",
        memorisation_sentence(pool),
        "",
    ]
    one_source = len(set(pool.labels["source"].tolist())) == 1
    for label in dict.fromkeys(labels + ("source",)):
        if label != "source" or not (labels and one_source):  # a one-row table says nothing
            lines += _group_table(pool, label)
    if not labels:
        lines += ["No `pipeline.labels` were given: the pool is grouped by data source only.", ""]
    return lines


# ---------------------------------------------------------------------------------------------
# The length argument


def classify_length_claim(rho: Interval, davir: Interval, davir_abs: Interval) -> str:
    """The paper's length argument, judged on this run's Spearman correlations with length T.

    rho, davir: Spearman(score, T) with 95% bootstrap intervals over pool examples; davir_abs:
    the same for |Spearman(davir, T)| (same resamples). The strength of davir's dependence on
    length is |Spearman| whatever its sign (favouring short answers is a length bias too):

    - "reversed": |davir| >= rho (point estimates): davir follows length at least as much;
    - "confirmed": rho's interval lies above 0 and the |davir| interval lies entirely below
      rho's interval (hi of |davir| < lo of rho);
    - "weakened": otherwise (|davir| below rho, but the intervals overlap or rho's positive
      correlation with length is not shown);
    - "undetermined": a correlation is undefined (a constant score or length).
    """
    if not (np.isfinite(rho.point) and np.isfinite(davir_abs.point)):
        return "undetermined"
    if davir_abs.point >= rho.point:
        return "reversed"
    if rho.lo > 0 and davir_abs.hi < rho.lo:
        return "confirmed"
    return "weakened"


def _sign_clause(iv: Interval) -> str:
    if iv.lo > 0:
        return "positive (interval above 0: it favours longer responses)"
    if iv.hi < 0:
        return "negative (interval below 0: it favours shorter responses)"
    return "of no shown sign (interval contains 0)"


def length_sentence(rho: Interval, davir: Interval, davir_abs: Interval) -> str:
    """One paragraph: the verdict of `classify_length_claim`, the numbers and the reason."""
    verdict = classify_length_claim(rho, davir, davir_abs)
    nums = (
        f"Spearman with response length T is {_ci(rho, '+.3f')} for rho and "
        f"{_ci(davir, '+.3f')} for davir (|davir| {_ci(davir_abs, '.3f')}; 95% bootstrap "
        f"intervals over the {rho.n} pool examples; paper on Alpaca: {PAPER_SPEARMAN['rho']} "
        f"for rho, {PAPER_SPEARMAN['davir']} for davir)."
    )
    if verdict == "undetermined":
        return (
            f"The paper's length argument cannot be judged here: a correlation is undefined. {nums}"
        )
    if verdict == "reversed":
        why = f"davir's |Spearman| {davir_abs.point:.3f} is at or above rho's {rho.point:+.3f}"
    elif verdict == "confirmed":
        why = "rho's interval lies above 0 and davir's |Spearman| interval lies entirely below it"
    elif rho.lo <= 0:
        why = "davir's |Spearman| is below rho's, but rho's own length correlation is not shown"
    else:
        why = "davir's |Spearman| is below rho's, but their intervals overlap"
    return (
        f"The paper's length argument (rho follows response length, davir much less) is "
        f"**{verdict}** by this run: {why}. {nums} davir's correlation is {_sign_clause(davir)}."
    )


def correlation_resamples(n: int) -> int:
    """Bootstrap resamples for a correlation over n pool examples: CORRELATION_RESAMPLES, fewer
    (down to 200) past 20,000 examples so a 50k pool takes seconds; the interval of a large pool
    is narrow, so the Monte-Carlo error (~0.14 standard errors at 200) stays below the
    report's 3 decimals' worth."""
    return max(200, min(CORRELATION_RESAMPLES, 20_000_000 // max(n, 1)))


def section_length(out: Path, pool: PoolScores | None) -> list[str]:
    """Spearman and Pearson of each score with T, with intervals; the verdict sentence."""
    if pool is None:
        return []
    lines = [
        "## Scores and response length",
        "",
        "| score | Spearman vs T [95% CI] | Pearson vs T [95% CI] |",
        "| --- | ---: | ---: |",
    ]
    n, b = len(pool.t), correlation_resamples(len(pool.t))
    spearman = {}
    for name, s in pool.scores.items():
        spearman[name] = correlation_samples(s, pool.t, "spearman", b)
        sp = interval(*spearman[name], n)
        pe = interval(*correlation_samples(s, pool.t, "pearson", b), n)
        lines.append(f"| `{name}` | {_ci(sp, '+.3f')} | {_ci(pe, '+.3f')} |")
    point, samples = spearman["davir"]
    dav_abs = interval(abs(point), np.abs(samples), n)
    rho, dav = interval(*spearman["rho"], n), interval(*spearman["davir"], n)
    lines += ["", length_sentence(rho, dav, dav_abs), ""]
    diag = _read_json(out / "scores" / "diagnostics.json")
    if diag and "files" in diag:
        lines += [
            f"![score vs length](scores/{diag['files']['vs_length']})",
            "",
            f"![score histograms](scores/{diag['files']['histograms']})",
            "",
        ]
    return lines


# ---------------------------------------------------------------------------------------------
# What each method selected


def selection_masks(out: Path, pool: PoolScores, names: list[str]) -> list[np.ndarray]:
    """For each selection run folder: a bool mask over the pool of the examples it selected
    (whole extra pools, which are not in the scores table, are left out)."""
    pos = {eid: i for i, eid in enumerate(pool.ids.tolist())}
    masks = []
    for name in names:
        manifest = _read_json(out / "select" / name / "manifest.json") or {}
        mask = np.zeros(len(pool.ids), bool)
        idx = [pos[s["example_id"]] for s in manifest.get("selected", []) if s["example_id"] in pos]
        mask[idx] = True
        masks.append(mask)
    return masks


# (budget, method, run prefix, one pool mask per seed)
SelectionRow = tuple[str, str, str, list[np.ndarray]]


def _selection_rows(out: Path, cfg: Any, pool: PoolScores) -> list[SelectionRow]:
    rows = []
    for budget, method, prefix in method_runs(cfg):
        names = seed_names(out / "select", prefix)
        if names:
            rows.append((budget, method, prefix, selection_masks(out, pool, names)))
    return rows


def _share_table(pool: PoolScores, label: str, rows: list[SelectionRow]) -> list[str]:
    lab = pool.labels[label]
    values = sorted(set(lab.tolist()))
    lines = [
        f"Share of each `{label}` value (mean over seeds):",
        "",
        "| selection | " + " | ".join(values) + " |",
        "| --- | " + " | ".join("---:" for _ in values) + " |",
        "| whole pool | " + " | ".join(f"{np.mean(lab == v):.3f}" for v in values) + " |",
    ]
    for _, _, prefix, masks in rows:
        kept = [m for m in masks if m.any()]
        shares = [np.mean([np.mean(lab[m] == v) for m in kept]) if kept else None for v in values]
        lines.append(f"| {prefix} | " + " | ".join(_fmt(s, ".3f") for s in shares) + " |")
    return lines + [""]


def _length_ratio_sentences(pool: PoolScores, rows: list[SelectionRow]) -> list[str]:
    """Per budget: each method's mean response length over the pool's (mean over seeds)."""
    mean_t = float(np.mean(pool.t))
    out = []
    for budget in dict.fromkeys(r[0] for r in rows):
        parts = []
        for b, method, _, masks in rows:
            kept = [m for m in masks if m.any()]
            if b == budget and kept:
                ratio = np.mean([pool.t[m].mean() for m in kept]) / mean_t
                parts.append(f"{method} {ratio:.2f}x")
        out.append(
            f"At {budget}, mean response length of the selection relative to the pool's "
            f"({mean_t:.1f} tokens): {', '.join(parts)}."
        )
    return out


def _selection_line(pool: PoolScores, name: str, masks: list[np.ndarray]) -> str:
    stats = [group_stats(pool, m) for m in masks if m.any()]
    if not stats:
        return f"| {name} | {len(masks)} | 0 | 0 | n/a | n/a | n/a |"
    seeds = "" if name == "whole pool" else f"{len(masks)} | {len({m.tobytes() for m in masks})}"
    mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
    return (
        f"| {name} | {seeds or ' | '} | {mean['n']:.0f} | {mean['tokens']:.1f} | "
        f"{mean['loss_base']:.4f} | {mean['loss_ref']:.4f} |"
    )


def section_selected(
    out: Path, cfg: Any, pool: PoolScores | None, labels: tuple[str, ...]
) -> list[str]:
    """Size, mean length and mean losses of each selection; label shares against the pool's."""
    if pool is None or not (out / "select").is_dir():
        return []
    rows = _selection_rows(out, cfg, pool)
    if not rows:
        return []
    lines = [
        "## What each method selected",
        "",
        "Means over seeds; distinct subsets: how many different subsets the seeds selected.",
        "",
        "| selection | seeds | distinct subsets | n selected | mean T | mean L_base/T "
        "| mean L_ref/T |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        _selection_line(pool, "whole pool", [np.ones(len(pool.ids), bool)]),
    ]
    lines += [_selection_line(pool, prefix, masks) for _, _, prefix, masks in rows]
    lines += [""] + _length_ratio_sentences(pool, rows) + [""]
    for label in dict.fromkeys(labels + ("source",)):
        if label != "source" or len(set(pool.labels["source"].tolist())) > 1:
            lines += _share_table(pool, label, rows)
    return lines


# ---------------------------------------------------------------------------------------------
# Held-out results


@dataclass(frozen=True)
class HeldOut:
    """One model's evaluation: eval.json, and its per-item rows (examples.jsonl) by id."""

    name: str
    summary: dict[str, Any]
    nll: dict[str, float]  # example_id -> summed response NLL
    tokens: dict[str, int]
    correct: dict[str, bool]  # only for examples whose answer was generated


def load_heldout(out: Path, name: str) -> HeldOut | None:
    """`eval/<name>`: None when it has no eval.json."""
    summary = _read_json(out / "eval" / name / "eval.json")
    if summary is None:
        return None
    rows = _jsonl(out / "eval" / name / "examples.jsonl")
    return HeldOut(
        name=name,
        summary=summary,
        nll={r["example_id"]: float(r["nll"]) for r in rows},
        tokens={r["example_id"]: int(r["n_tokens"]) for r in rows},
        correct={r["example_id"]: bool(r["correct"]) for r in rows if "correct" in r},
    )


@dataclass(frozen=True)
class ModelGroup:
    """The seeds of one model (base, full, or a method at a budget) on the common items."""

    name: str
    budget: str | None
    method: str | None
    runs: list[HeldOut]
    item_nll: np.ndarray | None  # [n] per-item NLL, mean over seeds (None: no per-item rows)
    item_correct: np.ndarray | None  # [g] per-item correct share over seeds, on `gen_ids`

    def losses(self) -> list[float]:
        return [float(r.summary["loss"]) for r in self.runs]

    def accuracies(self) -> list[float]:
        return [
            float(r.summary["accuracy"]) for r in self.runs if r.summary.get("accuracy") is not None
        ]


@dataclass(frozen=True)
class HeldOutItems:
    """The held-out items every model with per-item rows was scored on, in one order."""

    ids: list[str]
    tokens: np.ndarray  # [n]
    gen_ids: list[str]  # the items with an exact-match verdict from every model


def _common_items(runs: list[HeldOut]) -> HeldOutItems | None:
    with_rows = [r for r in runs if r.nll]
    if not with_rows:
        return None
    ids = [i for i in with_rows[0].nll if all(i in r.nll for r in with_rows)]
    for r in with_rows[1:]:
        bad = [i for i in ids if r.tokens[i] != with_rows[0].tokens[i]]
        if bad:
            raise ValueError(
                f"eval/{r.name}/examples.jsonl: n_tokens of {bad[0]} differs from "
                f"eval/{with_rows[0].name} ({r.tokens[bad[0]]} vs {with_rows[0].tokens[bad[0]]})"
            )
    gen = [i for i in ids if all(i in r.correct for r in with_rows)]
    return HeldOutItems(ids, np.array([with_rows[0].tokens[i] for i in ids], np.float64), gen)


def _group(
    name: str,
    budget: str | None,
    method: str | None,
    runs: list[HeldOut],
    items: HeldOutItems | None,
) -> ModelGroup:
    per_item = items is not None and all(r.nll for r in runs)
    nll = np.mean([[r.nll[i] for i in items.ids] for r in runs], axis=0) if per_item else None
    cor = (
        np.mean([[float(r.correct[i]) for i in items.gen_ids] for r in runs], axis=0)
        if per_item and items.gen_ids
        else None
    )
    return ModelGroup(name, budget, method, runs, nll, cor)


def load_groups(out: Path, cfg: Any) -> tuple[list[ModelGroup], HeldOutItems | None]:
    """base, full and every method at every budget (its seeds), on the common held-out items."""
    specs: list[tuple[str, str | None, str | None, list[str]]] = [
        ("base", None, None, ["base"]),
        ("full", None, None, ["full"]),
    ]
    specs += [(p, b, m, seed_names(out / "eval", p)) for b, m, p in method_runs(cfg)]
    loaded = [
        (n, b, m, [h for x in names if (h := load_heldout(out, x))]) for n, b, m, names in specs
    ]
    loaded = [x for x in loaded if x[3]]
    items = _common_items([r for x in loaded for r in x[3]])
    return [_group(n, b, m, runs, items) for n, b, m, runs in loaded], items


def difference_sentence(d: Interval, what: str, against: str) -> str:
    """'lower/higher {what} than {against} shown (d = ..., 95% CI [...])' when the interval
    excludes 0, else 'no difference shown at this size (...)'."""
    nums = f"d = {d.point:+.4f}, {d.level:.0%} CI [{d.lo:+.4f}, {d.hi:+.4f}], {d.n} items"
    if d.hi < 0:
        return f"lower {what} than {against} shown ({nums})"
    if d.lo > 0:
        return f"higher {what} than {against} shown ({nums})"
    return f"no difference shown at this size ({nums})"


def _trained_on(out: Path, g: ModelGroup, n_pool: int | None) -> str:
    if g.name == "base":
        return "0"
    if g.name == "full":
        return "n/a" if n_pool is None else str(n_pool)
    sel = _read_json(out / "select" / g.runs[0].name / "manifest.json")
    return str(sum(p["n_selected"] for p in sel["pools"])) if sel else "n/a"


def _loss_interval(g: ModelGroup, items: HeldOutItems | None) -> Interval | None:
    if g.item_nll is None or items is None:
        return None
    return bootstrap_ci(token_mean, g.item_nll, items.tokens, n_resamples=HELD_OUT_RESAMPLES)


def _heldout_table(
    out: Path, groups: list[ModelGroup], items: HeldOutItems | None, n_pool: int | None
) -> list[str]:
    lines = [
        "| model | examples trained on | seeds | held-out loss (mean ± sd) | each seed | "
        "95% CI over items | exact match (mean ± sd) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for g in groups:
        iv = _loss_interval(g, items)
        acc = g.accuracies()
        lines.append(
            f"| {g.name} | {_trained_on(out, g, n_pool)} | {len(g.runs)} | {_pm(g.losses())} | "
            f"{', '.join(f'{x:.4f}' for x in g.losses())} | "
            f"{'n/a' if iv is None else f'[{iv.lo:.4f}, {iv.hi:.4f}]'} | "
            f"{_pm(acc, '.3f') if acc else 'n/a'} |"
        )
    return lines + [""]


def compare_to_random(
    groups: list[ModelGroup], items: HeldOutItems | None
) -> list[tuple[ModelGroup, str, Interval | None, Interval | None]]:
    """For every method other than `random`: (group, note, loss difference vs `random` at the
    same budget, exact-match difference), each a paired bootstrap over held-out items of the
    per-item values averaged over each method's seeds; None where it cannot be computed."""
    out = []
    for g in groups:
        if g.budget is None or g.method == BASELINE:
            continue
        ref = next((r for r in groups if r.budget == g.budget and r.method == BASELINE), None)
        if ref is None:
            out.append((g, f"no `{BASELINE}` run at {g.budget}: no paired comparison", None, None))
            continue
        if g.item_nll is None or ref.item_nll is None or items is None:
            out.append(
                (
                    g,
                    "no per-item held-out losses (examples.jsonl): no paired comparison",
                    None,
                    None,
                )
            )
            continue
        d = paired_bootstrap(g.item_nll, ref.item_nll, items.tokens, n_resamples=HELD_OUT_RESAMPLES)
        a = None
        if g.item_correct is not None and ref.item_correct is not None:
            ones = np.ones(len(g.item_correct))
            a = paired_bootstrap(
                g.item_correct, ref.item_correct, ones, n_resamples=HELD_OUT_RESAMPLES
            )
        out.append((g, "", d, a))
    return out


def _seed_note(cfg: Any, groups: list[ModelGroup]) -> str:
    methods = [g for g in groups if g.budget is not None]
    counts = sorted({len(g.runs) for g in methods})
    configured = _pipeline_opt(cfg, "seeds", 1)
    if not methods:
        return ""
    if counts == [1]:
        note = (
            "Each method was trained and evaluated once (one seed): the intervals cover the "
            "resampling of held-out items only, not the variation between training seeds."
        )
    else:
        note = (
            f"Seeds per method: {', '.join(f'{g.name} {len(g.runs)}' for g in methods)}; ± is the "
            "standard deviation over seeds. A paired difference uses each item's loss averaged "
            "over the seeds of each method; its interval resamples held-out items only, so the "
            "seed-to-seed spread is shown by the ± column, not by the interval."
        )
    if counts != [configured]:
        note += f" (`pipeline.seeds` is {configured}.)"
    return note


def _comparison_lines(
    cmp: list[tuple[ModelGroup, str, Interval | None, Interval | None]],
) -> list[str]:
    lines = []
    for g, note, d, a in cmp:
        head = f"- `{g.method}` at {g.budget}"
        if d is None:
            lines.append(f"{head}: {note}.")
            continue
        lines.append(f"{head}: {difference_sentence(d, 'held-out loss', BASELINE)}.")
        if a is not None:
            lines.append(
                f"  Exact match: {difference_sentence(a, 'exact-match accuracy', BASELINE)}."
            )
    return lines + [""] if lines else []


def _full_vs_base(groups: list[ModelGroup], items: HeldOutItems | None) -> list[str]:
    by = {g.name: g for g in groups}
    if items is None or "full" not in by or "base" not in by:
        return []
    f, b = by["full"], by["base"]
    if f.item_nll is None or b.item_nll is None:
        return []
    d = paired_bootstrap(f.item_nll, b.item_nll, items.tokens, n_resamples=HELD_OUT_RESAMPLES)
    sentence = difference_sentence(d, "held-out loss", "the base")
    return [f"The reference (SFT on the whole pool) against the base: {sentence}.", ""]


def pool_vs_heldout_sentence(pool: PoolScores | None, groups: list[ModelGroup]) -> list[str]:
    """The reference's token-weighted loss on the pool it was trained on against its held-out
    loss (eval/full): the gap is how much of the pool it fits beyond what generalises."""
    full = next((g for g in groups if g.name == "full"), None)
    if pool is None or full is None:
        return []
    on_pool = float(pool.nll_ref.sum() / pool.t.sum())
    held = float(np.mean(full.losses()))
    return [
        f"The reference's loss on its own training pool is {on_pool:.4f} nats per token (sum "
        f"L_ref / sum T) and {held:.4f} on the held-out items: held-out minus pool = "
        f"{held - on_pool:+.4f}.",
        "",
    ]


def _items_sentence(cfg: Any, groups: list[ModelGroup], items: HeldOutItems | None) -> str:
    first = groups[0].runs[0].summary
    n = len(items.ids) if items is not None else first.get("n_examples")
    tok = int(items.tokens.sum()) if items is not None else first.get("n_tokens")
    gen = len(items.gen_ids) if items is not None and items.gen_ids else first.get("n_generated", 0)
    return (
        f"**{n} held-out items** ({_fmt(tok, ',')} response tokens) of `{cfg.pipeline.test}`; "
        f"exact match on {gen} generated answers. Held-out loss: summed response NLL over "
        "response tokens (nats per token, lower is better), the primary metric."
    )


def section_heldout(
    out: Path,
    cfg: Any,
    groups: list[ModelGroup],
    items: HeldOutItems | None,
    pool: PoolScores | None,
) -> list[str]:
    """The results table, the paired differences against `random`, the results figure."""
    if not groups:
        return []
    cmp = compare_to_random(groups, items)
    lines = ["## Held-out results", "", _items_sentence(cfg, groups, items), ""]
    lines += _heldout_table(out, groups, items, None if pool is None else len(pool.ids))
    lines += [_seed_note(cfg, groups), ""]
    if cmp:
        lines += [
            f"Paired difference against `{BASELINE}` at the same budget (d = method minus "
            f"{BASELINE}; for the loss, d < 0 is better):",
            "",
        ]
        lines += _comparison_lines(cmp)
    lines += _full_vs_base(groups, items) + pool_vs_heldout_sentence(pool, groups)
    _results_png(out, groups, items, cmp)
    return lines + ["![results](results.png)", ""]


def _dot(ax: Any, iv: Any, y: float, color: str) -> None:
    """One interval as a dot with error bars at height `y`."""
    ax.errorbar(
        iv.point, y, xerr=[[iv.point - iv.lo], [iv.hi - iv.point]], fmt="o", color=color, capsize=3
    )


def _results_png(
    out: Path, groups: list[ModelGroup], items: HeldOutItems | None, cmp: list[Any]
) -> None:
    fig = _figure(9, 0.8 + 0.35 * len(groups))
    ax = fig.add_subplot(1, 2, 1)
    for y, g in enumerate(groups):
        iv = _loss_interval(g, items)
        if iv is not None:
            _dot(ax, iv, y, "tab:blue")
        ax.scatter(g.losses(), [y] * len(g.runs), marker="x", color="0.4", s=15, zorder=3)
    ax.set_yticks(range(len(groups)), [g.name for g in groups], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("held-out loss (o: seed mean, 95% CI over items; x: each seed)", fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    shown = [(g, d) for g, _, d, _ in cmp if d is not None]
    for y, (_, d) in enumerate(shown):
        _dot(ax, d, y, "tab:red")
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set_yticks(range(len(shown)), [g.name for g, _ in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"held-out loss minus {BASELINE}'s (95% CI)", fontsize=7)
    fig.tight_layout()
    write_atomic(out / "results.png", _png(fig))


# ---------------------------------------------------------------------------------------------
# What was run, training, stages


def _validation_sentence(out: Path, cfg: Any) -> str:
    pc = cfg.pipeline
    if pc.reference is not None:
        return (
            f"the reference was given (`{pc.reference}`), not trained here: its recipe was not "
            "validated by this run."
        )
    val = _read_json(out / "reference" / "val.json")
    if val is None:
        return (
            "the reference recipe was not validated (no validation file): it is the base "
            f"fine-tuned on the whole pool for the configured {cfg.train.epochs} epoch(s)."
        )
    losses = ", ".join(f"{x:.4f} (epoch {i})" for i, x in enumerate(val["val_loss"], 1))
    stop = "stopped early" if val.get("stopped_early") else "ran every configured epoch"
    where = _pipeline_opt(cfg, "val", None) or "the validation file"
    return (
        f"the reference recipe was validated on `{where}` "
        f"({val.get('n_val', 'n/a')} examples): held-out loss per epoch {losses}; chosen epoch "
        f"{val['best_epoch']}; {val.get('epochs_run', len(val['val_loss']))} epoch(s) run ({stop})."
    )


def section_run(
    out: Path, cfg: Any, groups: list[ModelGroup], items: HeldOutItems | None
) -> list[str]:
    """Models, pool size and skips, validation, methods, budgets, seeds, held-out items."""
    pc = cfg.pipeline
    manifest = _read_json(out / "scores" / "manifest.json") or {}
    skipped = manifest.get("skipped") or {}
    reasons = ", ".join(f"{k}: {v}" for k, v in skipped.items())
    skip = f"{sum(skipped.values())} rows skipped ({reasons})" if skipped else "no rows skipped"
    n_items = (
        len(items.ids)
        if items is not None
        else (groups[0].runs[0].summary.get("n_examples") if groups else None)
    )
    return [
        f"# DavIR run: {out.name}",
        "",
        "## What was run",
        "",
        f"- base model: `{cfg.model.source}`; reference: `{pc.reference or out / 'reference'}`"
        " (the base fine-tuned on the whole pool)",
        f"- pool: `{cfg.data.path}`: {manifest.get('n_examples', 'n/a')} examples scored, "
        f"{skip}; template `{cfg.data.template}`",
        f"- validation: {_validation_sentence(out, cfg)}",
        f"- selection methods: {', '.join(pc.methods)}; budgets: {', '.join(pc.budgets)}"
        + (f"; whole extra pools: {', '.join(pc.extra_pools)}" if pc.extra_pools else ""),
        f"- seeds per method and budget: {_pipeline_opt(cfg, 'seeds', 1)} (each subset SFT "
        "and its evaluation run once per seed)",
        f"- held-out data: `{pc.test}`: {_fmt(n_items, 'd')} items evaluated",
        "",
    ]


def section_training(out: Path) -> list[str]:
    """Training loss curves of the reference and every subset SFT."""
    runs = {"reference (full pool)": out / "reference"}
    if (out / "sft").is_dir():
        runs.update({p.name: p for p in sorted((out / "sft").iterdir())})
    curves = {k: v for k, p in runs.items() if (v := _jsonl(p / "metrics.jsonl"))}
    if not curves:
        return []
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for name, rows in curves.items():
        rows = [r for r in rows if "loss" in r and "step" in r]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats / response token)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(out / "training_curves.png", _png(fig))
    return ["## Training", "", "![training curves](training_curves.png)", ""]


def section_stages(out: Path) -> list[str]:
    """Seconds per stage, from stages/*.json."""
    timings = {
        rec.stem: json.loads(rec.read_text()).get("seconds")
        for rec in sorted((out / "stages").glob("*.json"))
    }
    if not timings:
        return []
    lines = ["## Stages", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {_fmt(v, '.0f')} |" for k, v in timings.items()]
    lines.append(f"| total | {sum(v or 0 for v in timings.values()):.0f} |")
    return lines + [""]


def write_report(out: Path, cfg: Any) -> Path:
    """Write `out/report.md` (and its PNGs) from a pipeline run folder (a local path or URL)."""
    out = storage.upath(out)
    labels = tuple(_pipeline_opt(cfg, "labels", ()) or ())
    scores = tuple(SelectionMethod.parse(m).score for m in cfg.pipeline.methods)
    pool = load_pool(out, labels, scores)
    groups, items = load_groups(out, cfg)
    lines = section_run(out, cfg, groups, items)
    lines += section_groups(pool, labels)
    lines += section_length(out, pool)
    lines += section_selected(out, cfg, pool, labels)
    lines += section_training(out)
    lines += section_heldout(out, cfg, groups, items, pool)
    lines += section_stages(out)
    path = out / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
