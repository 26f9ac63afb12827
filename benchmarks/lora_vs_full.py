"""LoRA vs full fine-tuning of the reference (issue 18, item 5): the same base, data, recipe and
held-out set; held-out loss with a paired bootstrap interval, wall time, steady step time and
peak memory of each arm.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_vs_full.py \
        --pool runs/ifd-study/data/pool.jsonl --test runs/ifd-study/data/test.jsonl \
        --epochs 1 --out runs/lora-vs-full --append-results

Both arms are `davir sft --config configs/demo.yaml` (SmolLM2-135M-Instruct, the Alpaca recipe at
about 480 tokens per step) in their own process under `/usr/bin/time -v` (peak RSS), then
`davir eval` on `--test`. The LoRA arm adds `configs/recipes/alpaca-lora.yaml`'s adapters (rank
16, alpha 32, every attention and MLP projection) and its learning rate (10x the full arm's, as
that recipe says; not tuned here). Nothing is tuned on the outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from davir_jax.core.stats import bootstrap_ci  # noqa: E402

DAVIR = str(Path(sys.executable).with_name("davir"))
LORA = [
    "--model.lora.rank=16",
    "--model.lora.alpha=32.0",
    "--model.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
]


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Run `cmd` under /usr/bin/time -v; its wall seconds and peak RSS (GB)."""
    t0 = time.time()
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"wall_s": time.time() - t0, "peak_rss_gb": int(rss.group(1)) / 1e6 if rss else np.nan}


def steady_step_s(run: Path) -> float:
    """Median seconds per optimizer step after the first (which compiles)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens"] / r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]
    return float(np.median(rates)) if rates else float("nan")


def item_losses(eval_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    rows = [json.loads(x) for x in (eval_dir / "examples.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["example_id"])
    return (
        [r["example_id"] for r in rows],
        np.array([r["loss"] for r in rows]),
        np.array([r["n_tokens"] for r in rows], dtype=float),
    )


def arm(name: str, a: argparse.Namespace, extra: list[str]) -> dict:
    out = Path(a.out)
    common = ["--config", str(ROOT / "configs" / "demo.yaml"), "-q"]
    common += [f"--data.cache_dir={out / 'cache'}", f"--seed={a.seed}"]
    sft = [DAVIR, "sft", *common, "--data", a.pool, "--out", str(out / name)]
    sft += [f"--train.epochs={a.epochs}", "--train.overwrite=true", *extra]
    res = timed(sft, out / f"{name}.sft.log")
    ev = [DAVIR, "eval", *common, "--model", str(out / name), "--data", a.test]
    ev += [f"--eval.out={out / 'eval' / name}", "--eval.generate=0"]
    res["eval"] = timed(ev, out / f"{name}.eval.log")
    res["step_s"] = steady_step_s(out / name)
    res["steps"] = len((out / name / "metrics.jsonl").read_text().splitlines())
    return res


def report(a: argparse.Namespace, res: dict) -> str:
    out = Path(a.out)
    ids, full, t = item_losses(out / "eval" / "full")
    ids_l, lora, _ = item_losses(out / "eval" / "lora")
    if ids != ids_l:
        raise SystemExit("the two evaluations hold other items")
    tok = lambda x: float((x * t).sum() / t.sum())  # noqa: E731  token-weighted mean
    d = lora - full
    iv = bootstrap_ci(lambda x: x.mean(axis=-1), d)
    lines = [
        f"Pool `{a.pool}`, held-out `{a.test}` ({len(ids)} items), {a.epochs} epoch(s), seed "
        f"{a.seed}; one run per arm.",
        "",
        "| arm | held-out loss (token-weighted) | mean per-item loss | SFT wall | steady step | "
        "steps | SFT peak RSS |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, x in (("full", full), ("lora", lora)):
        r = res[name]
        lines.append(
            f"| {name} | {tok(x):.4f} | {x.mean():.4f} | {r['wall_s'] / 60:.1f} min | "
            f"{r['step_s']:.1f} s | {r['steps']} | {r['peak_rss_gb']:.2f} GB |"
        )
    verdict = (
        "no difference shown at this size"
        if iv.lo <= 0 <= iv.hi
        else ("LoRA higher (worse)" if iv.lo > 0 else "LoRA lower (better)")
    )
    lines += [
        "",
        f"Per-item loss, LoRA minus full: {iv.point:+.4f} [{iv.lo:+.4f}, {iv.hi:+.4f}] (95% "
        f"bootstrap over the {len(ids)} items): {verdict}. Steady step time LoRA/full "
        f"{res['lora']['step_s'] / res['full']['step_s']:.2f}; peak RSS LoRA/full "
        f"{res['lora']['peak_rss_gb'] / res['full']['peak_rss_gb']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-5, help="the full arm's (demo.yaml's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/lora-vs-full")
    ap.add_argument("--append-results", action="store_true")
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    res = {
        "full": arm("full", a, [f"--optimizer.lr={a.lr}"]),
        "lora": arm("lora", a, [*LORA, f"--optimizer.lr={10 * a.lr}"]),
    }
    (Path(a.out) / "results.json").write_text(json.dumps(res, indent=1))
    text = report(a, res)
    print(text)
    if a.append_results:
        from results_md import add_section

        cmd = "HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_vs_full.py " + " ".join(
            sys.argv[1:]
        )
        add_section(
            f"\n## LoRA vs full fine-tuning ({time.strftime('%Y-%m-%d')})\n\n"
            f"Command: `{cmd}`. Machine: {os.cpu_count()} cores.\n\n" + text
        )


if __name__ == "__main__":
    main()
