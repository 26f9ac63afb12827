"""The pipeline's report: `report.md` with PNGs, readable without the code.

Sections: what was run; the length correlation of every score (the paper's argument: `rho`
follows response length, `davir` much less); what each method selected (with planted tiers, the
share of each tier); training curves; one table of held-out loss and exact-match accuracy per
selection method and budget.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from davir_jax.io_utils import write_atomic


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


def _metrics(run: Path) -> list[dict[str, Any]]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def tier_shares(selection: Path) -> dict[str, dict[str, float]] | None:
    """Share of each planted tier (the rows' `tier` field) in each pool of a selection."""
    manifest = _read_json(selection / "manifest.json")
    if manifest is None:
        return None
    out = {}
    for pool in manifest["pools"]:
        rows = [json.loads(x) for x in (selection / pool["file"]).read_text().splitlines() if x]
        tiers = [r.get("tier") for r in rows]
        if not rows or any(t is None for t in tiers):
            return None
        names = sorted(set(tiers))
        out[pool["name"]] = {t: tiers.count(t) / len(tiers) for t in names}
    return out


def write_report(out: Path, cfg: Any) -> Path:
    """Write `out/report.md` (and its PNGs) from a pipeline run folder."""
    pc = cfg.pipeline
    lines = [f"# DavIR run: {out.name}", ""]
    manifest = _read_json(out / "scores" / "manifest.json") or {}
    lines += [
        f"- base model: `{cfg.model.source}`; reference: "
        f"`{pc.reference or out / 'reference'}` (the base fine-tuned on the whole pool)",
        f"- pool: `{cfg.data.path}` ({manifest.get('n_examples', 'n/a')} examples scored; "
        f"skipped: {manifest.get('skipped', {})}), template `{cfg.data.template}`",
        f"- selection methods: {', '.join(pc.methods)}; budgets: {', '.join(pc.budgets)}"
        + (f"; whole extra pools: {', '.join(pc.extra_pools)}" if pc.extra_pools else ""),
        f"- held-out data: `{pc.test}`",
        "",
        "## Scores and response length",
        "",
        "DavIR = (L_base - L_ref) / L_base (arXiv 2310.13008). The paper's argument: the plain "
        "loss reduction `rho` = L_base - L_ref grows with response length, so it selects long "
        "answers; dividing by L_base removes most of that.",
        "",
    ]
    diag = _read_json(out / "scores" / "diagnostics.json")
    if diag:
        lines += ["| score | Spearman vs length | Pearson vs length |", "| --- | ---: | ---: |"]
        for name, c in diag["scores"].items():
            lines.append(f"| `{name}` | {_fmt(c['spearman'])} | {_fmt(c['pearson'])} |")
        lines += [
            "",
            f"![score vs length](scores/{diag['files']['vs_length']})",
            "",
            f"![score histograms](scores/{diag['files']['histograms']})",
            "",
        ]

    # Selections, with planted tiers when the pool has them (the demo).
    sel_root = out / "select"
    shares = (
        {p.name: tier_shares(p) for p in sorted(sel_root.iterdir())} if sel_root.is_dir() else {}
    )
    if shares and all(v is not None for v in shares.values()):
        pool_rows = [json.loads(x) for x in Path(cfg.data.path).read_text().splitlines() if x]
        pool_tiers = [r.get("tier") for r in pool_rows]
        names = sorted({t for t in pool_tiers if t})
        lines += [
            "## What each method selected",
            "",
            "Share of each planted tier in the selected subset (the pool's share first).",
            "",
            "| selection | " + " | ".join(names) + " |",
            "| --- | " + " | ".join("---:" for _ in names) + " |",
            "| whole pool | "
            + " | ".join(f"{pool_tiers.count(t) / len(pool_tiers):.2f}" for t in names)
            + " |",
        ]
        for sel, s in shares.items():
            pool = s.get("pool", next(iter(s.values())))
            lines.append(f"| {sel} | " + " | ".join(f"{pool.get(t, 0):.2f}" for t in names) + " |")
        lines.append("")

    # Training curves.
    runs = {"reference (full pool)": out / "reference"}
    runs.update(
        {p.name: p for p in sorted((out / "sft").iterdir())} if (out / "sft").is_dir() else {}
    )
    curves = {k: _metrics(v) for k, v in runs.items()}
    curves = {k: v for k, v in curves.items() if v}
    if curves:
        fig = _figure(7, 4)
        ax = fig.add_subplot()
        for name, rows in curves.items():
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats / response token)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        write_atomic(out / "training_curves.png", _png(fig))
        lines += ["## Training", "", "![training curves](training_curves.png)", ""]

    # Held-out results.
    evals = (
        {p.name: _read_json(p / "eval.json") for p in sorted((out / "eval").iterdir())}
        if (out / "eval").is_dir()
        else {}
    )
    evals = {k: v for k, v in evals.items() if v}
    if evals:
        order = sorted(evals, key=lambda k: (k not in ("base", "full"), k != "base", k))
        lines += [
            "## Held-out results",
            "",
            f"On `{pc.test}`: the loss is nats per response token (lower is better); the "
            "accuracy is exact match of greedy answers.",
            "",
            "| model | examples trained on | held-out loss | accuracy | generated |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name in order:
            e = evals[name]
            sel = _read_json(out / "select" / name / "manifest.json")
            n_train = (
                sum(p["n_selected"] for p in sel["pools"])
                if sel
                else manifest.get("n_examples")
                if name == "full"
                else 0
            )
            lines.append(
                f"| {name} | {n_train if n_train is not None else 'n/a'} | "
                f"{e['loss']:.4f} | {_fmt(e.get('accuracy'))} | "
                f"{e.get('n_generated', 0)} |"
            )
        lines.append("")
        fig = _figure(7, 3.5)
        ax = fig.add_subplot(1, 2, 1)
        ax.barh(order, [evals[k]["loss"] for k in order], color="tab:blue")
        ax.set_xlabel("held-out loss")
        ax.invert_yaxis()
        ax = fig.add_subplot(1, 2, 2)
        ax.barh(order, [evals[k].get("accuracy") or 0.0 for k in order], color="tab:green")
        ax.set_xlabel("exact-match accuracy")
        ax.set_yticklabels([])
        ax.invert_yaxis()
        fig.tight_layout()
        write_atomic(out / "results.png", _png(fig))
        lines += ["![results](results.png)", ""]
        best = min(
            (k for k in order if k not in ("base",)), key=lambda k: evals[k]["loss"], default=None
        )
        if best:
            lines += [
                f"Lowest held-out loss: **{best}**. With small pools and budgets, "
                "differences of a few hundredths are within run-to-run noise.",
                "",
            ]
    timings = {}
    for rec in sorted((out / "stages").glob("*.json")):
        timings[rec.stem] = json.loads(rec.read_text()).get("seconds")
    if timings:
        lines += ["## Stages", "", "| stage | seconds |", "| --- | ---: |"]
        lines += [f"| {k} | {_fmt(v, '.0f')} |" for k, v in timings.items()]
        lines.append(f"| total | {np.nansum([v or 0 for v in timings.values()]):.0f} |")
        lines.append("")
    path = out / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
