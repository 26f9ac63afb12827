"""Does counting the EOS token as a response token explain the sign of DavIR's length correlation?

    .venv/bin/python benchmarks/eos_length_ablation.py [--n 400] [--seed 0] [--out DIR]

Pool: alpaca-libre (../shared/data/alpaca-libre/*.jsonl) rows with `status: ok` and a non-empty
output, deduplicated by normalised prompt (instruction + input, lower-cased, whitespace
collapsed), then a seeded sample of `--n` rows. Base: `smollm2-135m` (float32). Reference: the
base after one epoch of SFT on the sample with the EOS counted (the standard recipe: the
optimizer defaults, i.e. the Stanford Alpaca recipe, `plain` template, packed rows of 512
tokens, one row per optimizer step). Then the sample is scored with base and reference twice,
`data.eos_in_loss` true and false, through `davir_jax.jobs.score.score`.

For every registered score: Spearman and Pearson correlation with the response length (tokens
without the EOS, the same length both ways) and bootstrap 95% intervals (1000 resamples of
examples, seeded). Then the decomposition: the EOS token's own loss under base and reference
(the difference of the two scoring runs' NLLs, which see the same ids), by length quintile, and
the part of DavIR that the EOS contributes for short and long responses; the same for the first
response token (the prompt/response boundary), and DavIR without either. Prints Markdown; writes
everything (tables as JSON, a PNG of davir vs length both ways) under `--out`. The numbers are
whatever they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
BASE = "smollm2-135m"


# -- the pool ---------------------------------------------------------------------------------


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def build_pool(src: Path, dst: Path, n: int, seed: int) -> dict[str, int]:
    """Write the seeded sample of deduplicated `ok` rows to `dst` (alpaca format); counts."""
    rows, seen, counts = [], set(), {"lines": 0, "malformed": 0, "ok_nonempty": 0, "dup": 0}
    for f in sorted(src.glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            counts["lines"] += 1
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                counts["malformed"] += 1
                continue
            if r.get("status") != "ok" or not str(r.get("output", "")).strip():
                continue
            counts["ok_nonempty"] += 1
            key = _norm(r.get("instruction", "")) + "\x00" + _norm(r.get("input", ""))
            if key in seen:
                counts["dup"] += 1
                continue
            seen.add(key)
            rows.append({k: r.get(k, "") for k in ("instruction", "input", "output")})
    counts["unique"] = len(rows)
    if n > len(rows):
        raise SystemExit(f"--n {n}: only {len(rows)} unique ok rows in {src}")
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    dst.write_text("".join(json.dumps(rows[i]) + "\n" for i in pick))
    counts["sample"] = n
    return counts


# -- the runs ---------------------------------------------------------------------------------


def data_overrides(pool: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"--data.path={pool}",
        f"--data.cache_dir={out / 'cache'}",
        "--data.template=plain",
        f"--data.max_len={args.row_len}",
        f"--data.row_len={args.row_len}",
        "--data.batch_rows=1",
        f"--model.source={BASE}",
        "--model.dtype=float32",
        f"--seed={args.seed}",
    ]


def run_sft(pool: Path, out: Path, args: argparse.Namespace) -> tuple[Path, float]:
    from davir_jax.config import load_config
    from davir_jax.jobs.sft import sft

    cfg = load_config(
        None,
        data_overrides(pool, out, args)
        + [f"--train.out={out / 'reference'}", "--train.epochs=1", "--data.eos_in_loss=true"],
    )
    t0 = time.time()
    sft(cfg, progress=True)
    return out / "reference" / "model", time.time() - t0


def run_score(pool: Path, out: Path, ref: Path, eos: bool, args: argparse.Namespace):
    import pyarrow.parquet as pq

    from davir_jax.config import load_config
    from davir_jax.jobs.score import score

    name = "scores-eos-" + ("on" if eos else "off")
    cfg = load_config(
        None,
        data_overrides(pool, out, args)
        + [
            f"--data.eos_in_loss={str(eos).lower()}",
            f"--scoring.base={BASE}",
            f"--scoring.reference={ref}",
            f"--scoring.out={out / name}",
        ],
    )
    t0 = time.time()
    d = score(cfg, progress=True)
    t = pq.read_table(d / "scores.parquet").sort_by("row")
    return t, time.time() - t0


def first_token_nll(pool: Path, out: Path, ref: Path, args: argparse.Namespace, ids: list[str]):
    """NLL of the first response token of every example (the prompt/response boundary, which
    the `plain` template marks with no separator) under base and reference: the scoring
    step (`scoring.dataset_nll`) over the same tokens with only that position in the mask."""
    from davir_jax.config import load_config
    from davir_jax.core.sharding import mesh_from_config
    from davir_jax.data.dataset import prepare
    from davir_jax.engine.nll import dataset_nll
    from davir_jax.models.loading import load_model, load_tokenizer_for

    cfg = load_config(None, data_overrides(pool, out, args) + ["--data.eos_in_loss=false"])
    mesh = mesh_from_config(cfg.mesh)
    data = prepare(cfg.data, load_tokenizer_for(BASE), progress=False)

    def get(idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        items = []
        for x, m in data.get(idx):
            first = np.zeros_like(m)
            first[int(np.argmax(m > 0))] = 1
            items.append((x, first))
        return items

    res = {}
    for name, src in (("base", BASE), ("reference", str(ref))):
        model = load_model(src, cfg.model.dtype, mesh, **cfg.model.run_options())
        nll, cnt = dataset_nll(model, data.plans(), data.num_segments, get, len(data))
        assert np.all(cnt == 1)
        pos = {e: i for i, e in enumerate(data.example_ids)}
        res[name] = nll[[pos[e] for e in ids]]
        del model
    return res["base"], res["reference"]


# -- statistics -------------------------------------------------------------------------------


def boot_corr(score: np.ndarray, length: np.ndarray, b: int, seed: int) -> dict[str, float]:
    """Spearman and Pearson with percentile 95% intervals over `b` resamples of examples."""
    rng = np.random.default_rng(seed)
    n = len(score)
    out = {
        "spearman": float(stats.spearmanr(score, length).statistic),
        "pearson": float(stats.pearsonr(score, length).statistic),
    }
    sp, pe = np.empty(b), np.empty(b)
    for i in range(b):
        idx = rng.integers(0, n, n)
        s, t = score[idx], length[idx]
        sp[i] = stats.spearmanr(s, t).statistic
        pe[i] = np.corrcoef(s, t)[0, 1]
    for k, v in (("spearman", sp), ("pearson", pe)):
        lo, hi = np.nanpercentile(v, [2.5, 97.5])
        out[k + "_lo"], out[k + "_hi"] = float(lo), float(hi)
    return out


def quintiles(length: np.ndarray) -> np.ndarray:
    """Quintile index 0..4 of every example by length (ties by rank order, so 5 equal bins)."""
    order = np.argsort(length, kind="stable")
    q = np.empty(len(length), int)
    q[order] = np.arange(len(length)) * 5 // len(length)
    return q


def decomposition(on, off, f_b: np.ndarray, f_r: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example parts. B, R: summed NLL of the response tokens without EOS (base, reference);
    e_b, e_r: the EOS token's own NLL (on - off: the same ids, one more mask position); f_b,
    f_r: the first response token's NLL."""
    B, R = off["nll_base"], off["nll_ref"]
    e_b, e_r = on["nll_base"] - B, on["nll_ref"] - R
    n = off["n_tokens"].astype(float)
    d_on = (B + e_b - R - e_r) / (B + e_b)
    inner = n > 1  # the responses with tokens between the first and the EOS
    with np.errstate(divide="ignore", invalid="ignore"):
        d_inner = np.where(inner, (B - f_b - R + f_r) / (B - f_b), np.nan)
        tok_inner = np.where(inner, (B - f_b) / (n - 1), np.nan)
        ref_inner = np.where(inner, (R - f_r) / (n - 1), np.nan)
    return {
        "first_base": f_b,
        "first_ref": f_r,
        # The first token's share of the loss reduction without EOS, (f_b - f_r)/(B - R).
        "first_share": (f_b - f_r) / (B - R),
        # davir of the response without its first token and without EOS (n > 1 only).
        "davir_inner": d_inner,
        "base_tok_inner": tok_inner,
        "ref_tok_inner": ref_inner,
        "n": n,
        "base_tok": B / n,  # mean per-token loss of the response tokens, without EOS
        "ref_tok": R / n,
        "eos_base": e_b,
        "eos_ref": e_r,
        "davir_on": d_on,
        "davir_off": (B - R) / B,
        # davir_on = (B - R)/(B + e_b) + (e_b - e_r)/(B + e_b): the EOS term is the second part.
        "eos_term": (e_b - e_r) / (B + e_b),
        # The EOS token's share of the absolute loss reduction L_base - L_ref (EOS counted).
        "eos_share": (e_b - e_r) / (B + e_b - R - e_r),
        # The EOS token's share of the base loss L_base (the denominator of davir).
        "eos_base_share": e_b / (B + e_b),
    }


def plot(length: np.ndarray, d_on: np.ndarray, d_off: np.ndarray, rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, y, key, title in (
        (axes[0], d_on, "on", "EOS counted (default)"),
        (axes[1], d_off, "off", "EOS not counted"),
    ):
        r = rows[("davir", key)]
        ax.scatter(length, y, s=8, alpha=0.5)
        ax.set_xscale("log")
        ax.set_xlabel("response tokens (without EOS)")
        ax.set_title(f"{title}: Spearman {r['spearman']:+.3f}, Pearson {r['pearson']:+.3f}")
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].set_ylabel("davir = (L_base - L_ref) / L_base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _f(x: float, d: int = 3) -> str:
    return f"{x:+.{d}f}" if abs(x) < 100 else f"{x:+.1f}"


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="rows in the seeded sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--row-len", type=int, default=512)
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--out", default=None, help="default runs/eos-ablation-n{N}-s{seed}")
    args = ap.parse_args()
    src = SHARED / "alpaca-libre"
    if not any(src.glob("*.jsonl")):
        print(f"skipped: the shared data is absent ({src}/*.jsonl not found)")
        return
    out = Path(args.out or ROOT / "runs" / f"eos-ablation-n{args.n}-s{args.seed}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    pool = out / "pool.jsonl"
    counts = build_pool(src, pool, args.n, args.seed)
    print(f"pool: {counts}", file=sys.stderr)

    t0 = time.time()
    ref, t_sft = run_sft(pool, out, args)
    sft_metrics = [
        json.loads(x) for x in (out / "reference" / "metrics.jsonl").read_text().splitlines() if x
    ]
    tables, t_score = {}, {}
    for eos in (True, False):
        tables[eos], t_score[eos] = run_score(pool, out, ref, eos, args)

    from davir_jax.core.scores import SCORES, compute_scores

    cols = {
        eos: {c: tables[eos].column(c).to_numpy() for c in ("nll_base", "nll_ref", "n_tokens")}
        for eos in tables
    }
    ids = {eos: tables[eos].column("example_id").to_pylist() for eos in tables}
    if ids[True] != ids[False]:
        raise SystemExit("the two scoring runs hold different examples")
    length = cols[False]["n_tokens"].astype(float)
    # Same length both ways: the EOS-counted T is one more.
    assert np.array_equal(cols[True]["n_tokens"] - 1, cols[False]["n_tokens"])

    rows = {}
    for eos, key in ((True, "on"), (False, "off")):
        sc = compute_scores(tables[eos], seed=args.seed)
        for name in SCORES:
            rows[(name, key)] = boot_corr(sc[name], length, args.boot, args.seed)
    f_b, f_r = first_token_nll(pool, out, ref, args, ids[False])
    dec = decomposition(cols[True], cols[False], f_b, f_r)
    q = quintiles(length)

    lines = [
        f"N = {len(length)} examples, {int(length.sum()):,} response tokens without EOS "
        f"(median {np.median(length):.0f}, range {int(length.min())}-{int(length.max())}); "
        f"reference SFT: {len(sft_metrics)} logged steps, loss "
        f"{sft_metrics[0].get('loss', float('nan')):.3f} -> "
        f"{sft_metrics[-1].get('loss', float('nan')):.3f}",
        "",
        "| score | EOS counted: Spearman [95% CI] | Pearson [95% CI] "
        "| EOS not counted: Spearman [95% CI] | Pearson [95% CI] |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in SCORES:
        cells = []
        for key in ("on", "off"):
            r = rows[(name, key)]
            for m in ("spearman", "pearson"):
                cells.append(f"{_f(r[m])} [{_f(r[m + '_lo'])}, {_f(r[m + '_hi'])}]")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "By length quintile (means; per-token losses in nats; `eos term` = (e_b - e_r)/L_base, "
        "the part of davir (EOS counted) that the EOS token contributes; `EOS share of "
        "L_base - L_ref` is the median of (e_b - e_r)/(L_base - L_ref)):",
        "",
        "| quintile | response tokens | base loss/token (no EOS) | ref loss/token (no EOS) "
        "| EOS loss, base (e_b) | EOS loss, ref (e_r) | EOS share of L_base | davir, EOS counted "
        "| davir, not counted | eos term | EOS share of L_base - L_ref (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    quint = []
    for k in range(5):
        m = q == k
        row = {
            "tokens": f"{int(length[m].min())}-{int(length[m].max())}",
            **{
                c: float(np.mean(dec[c][m]))
                for c in dec
                if c not in ("eos_share", "first_share", "davir_inner") and not c.endswith("_inner")
            },
            "eos_share_median": float(np.median(dec["eos_share"][m])),
        }
        row["first_share_median"] = float(np.median(dec["first_share"][m]))
        for c in ("davir_inner", "base_tok_inner", "ref_tok_inner"):
            row[c] = float(np.nanmean(dec[c][m]))
        quint.append(row)
        lines.append(
            f"| Q{k + 1} | {row['tokens']} | {row['base_tok']:.3f} | {row['ref_tok']:.3f} "
            f"| {row['eos_base']:.3f} | {row['eos_ref']:.3f} | {row['eos_base_share']:.3f} "
            f"| {row['davir_on']:.3f} | {row['davir_off']:.3f} | {row['eos_term']:.3f} "
            f"| {row['eos_share_median']:.3f} |"
        )
    lines += [
        "",
        "The first response token (the prompt/response boundary; `plain` has no separator) by "
        "the same quintiles: its loss under base and reference, its median share of "
        "L_base - L_ref (no EOS), and the response without its first token and without EOS "
        "(responses of 2+ tokens): loss/token and davir:",
        "",
        "| quintile | first token, base | first token, ref | first-token share of L_base - L_ref "
        "(median) | base loss/token (inner) | ref loss/token (inner) | davir (inner) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, row in enumerate(quint):
        lines.append(
            f"| Q{k + 1} | {row['first_base']:.3f} | {row['first_ref']:.3f} "
            f"| {row['first_share_median']:.3f} | {row['base_tok_inner']:.3f} "
            f"| {row['ref_tok_inner']:.3f} | {row['davir_inner']:.3f} |"
        )
    # Which part carries the correlation: the EOS term, and the no-EOS parts.
    parts = {
        "eos_term": dec["eos_term"],
        "eos_base": dec["eos_base"],
        "eos_ref": dec["eos_ref"],
        "base_tok": dec["base_tok"],
        "ref_tok": dec["ref_tok"],
        "ref_over_base_no_eos": dec["ref_tok"] / dec["base_tok"],
    }
    parts |= {"first_base": dec["first_base"], "first_ref": dec["first_ref"]}
    part_corr = {k: boot_corr(v, length, args.boot, args.seed) for k, v in parts.items()}
    inner = length > 1
    part_corr["davir_inner (n>1)"] = boot_corr(
        dec["davir_inner"][inner], length[inner], args.boot, args.seed
    )
    lines += [
        "",
        "Spearman with length of the parts: "
        + ", ".join(
            f"`{k}` {_f(r['spearman'])} [{_f(r['spearman_lo'])}, {_f(r['spearman_hi'])}]"
            for k, r in part_corr.items()
        ),
    ]
    plot(length, dec["davir_on"], dec["davir_off"], rows, out / "davir_vs_length.png")
    wall = time.time() - t0
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if ln.startswith("Model name")
        ),
        platform.processor(),
    )
    lines += [
        "",
        f"Timings: reference SFT {t_sft:.0f} s, scoring EOS counted {t_score[True]:.0f} s, "
        f"not counted {t_score[False]:.0f} s, {wall:.0f} s in all; {cpu}, {os.cpu_count()} "
        f"cores; {datetime.date.today().isoformat()}; outputs in {out}",
    ]
    result = {
        "pool": counts,
        "args": vars(args),
        "correlations": {f"{n}/{k}": v for (n, k), v in rows.items()},
        "quintiles": quint,
        "part_correlations": part_corr,
        "sft_first_last_loss": [sft_metrics[0].get("loss"), sft_metrics[-1].get("loss")],
        "timings_s": {"sft": t_sft, "score_on": t_score[True], "score_off": t_score[False]},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    (out / "result.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
