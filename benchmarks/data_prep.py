"""Host-side data preparation: packing efficiency and tokenize + pack rate on real data.

    .venv/bin/python benchmarks/data_prep.py [--max-len 512] [--batch-rows 16]

Reads alpaca-libre (all three files) and GSM8K train from ../shared/data, tokenizes them with the
SmolLM2 tokenizer (`plain` template) into a fresh cache, and reports
* efficiency = real tokens / row tokens for: packed rows (best-fit decreasing) of max_len,
  length-bucketed padding, padding each batch (file order) to its own maximum, padding to a
  fixed max_len;
* the host preparation rate (read + tokenize + store, then plan + assemble), in tokens/s.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from davir_jax.config import DataConfig  # noqa: E402
from davir_jax.data import batching  # noqa: E402
from davir_jax.data.dataset import prepare  # noqa: E402
from davir_jax.models import load_tokenizer  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "alpaca-libre": [SHARED / "alpaca-libre" / f"tasks_v{i}.jsonl" for i in (1, 2, 3)],
    "gsm8k": [SHARED / "gsm8k" / "train.jsonl"],
}


def batch_max_efficiency(lengths: np.ndarray, rows: int) -> float:
    """Padding every batch of `rows` consecutive examples (file order) to its longest one."""
    total = sum(int(lengths[i : i + rows].max()) * rows for i in range(0, len(lengths), rows))
    return float(lengths.sum()) / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch-rows", type=int, default=16)
    ap.add_argument("--max-segments", type=int, default=64)
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED}")
    tok = load_tokenizer("smollm2-135m")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(
        "| data | examples | tokens | packed | bucketed | pad to batch max | pad to "
        f"{args.max_len} | tokenize+store tok/s | plan+assemble tok/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, files in SETS.items():
        with tempfile.TemporaryDirectory() as cache:
            lengths, t_prep, t_batch = [], 0.0, 0.0
            for path in files:
                cfg = DataConfig(
                    path=str(path),
                    cache_dir=cache,
                    max_len=args.max_len,
                    batch_rows=args.batch_rows,
                    max_segments=args.max_segments,
                )
                t0 = time.perf_counter()
                data = prepare(cfg, tok, progress=False)
                t_prep += time.perf_counter() - t0
                t0 = time.perf_counter()
                plans = data.plans()
                for _ in data.batches(plans):
                    pass
                t_batch += time.perf_counter() - t0
                lengths.append(data.lengths)
            lens = np.concatenate(lengths)
            packed = batching.packed_plan(lens, args.batch_rows, args.max_len, args.max_segments)
            bucketed = batching.padded_plan(
                lens, args.batch_rows, batching.bucket_widths(args.max_len)
            )
            n_tok = int(lens.sum())
            print(
                f"| {name} | {len(lens):,} | {n_tok:,} | "
                f"{batching.plan_efficiency(packed, lens):.3f} | "
                f"{batching.plan_efficiency(bucketed, lens):.3f} | "
                f"{batch_max_efficiency(lens, args.batch_rows):.3f} | "
                f"{n_tok / (len(lens) * args.max_len):.3f} | "
                f"{n_tok / t_prep:,.0f} | {n_tok / t_batch:,.0f} |"
            )


if __name__ == "__main__":
    main()
