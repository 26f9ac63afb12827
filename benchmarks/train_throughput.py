"""SFT training throughput on SmolLM2-135M: our jitted step vs a plain PyTorch training loop
(AdamW, the same weights, the same examples per optimizer step), real response+prompt tokens/s.

    .venv/bin/python benchmarks/train_throughput.py [--examples 48] [--steps 6]

Both sides train float32 on GSM8K test examples (plain template, max 256 tokens), 8 examples per
optimizer step. Ours runs packed rows (and, for comparison, length-bucketed padded rows); PyTorch
runs the same 8 examples per step padded to the batch maximum, with the token-mean loss over the
response tokens. The compile count of our step is read before and after the timed steps.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from davir_jax.config import OptimizerConfig  # noqa: E402
from davir_jax.core.sharding import make_mesh, state_shardings  # noqa: E402
from davir_jax.data.batching import BatchPlan  # noqa: E402
from davir_jax.data.config import DataConfig  # noqa: E402
from davir_jax.data.dataset import prepare  # noqa: E402
from davir_jax.engine.trainer import (  # noqa: E402
    make_optimizer,
    make_train_step,
    optimizer_shardings,
    step_batch,
)
from davir_jax.models import export_hf, load_model, load_tokenizer  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def ours(data, steps: int, per_step: int) -> tuple[float, int, int]:
    """(real tokens/s, compiles before timing, compiles after) for `steps` timed steps."""
    mesh = make_mesh(1, 1, 1)
    # A fresh copy: the step donates (consumes) the parameters it is given.
    graphdef, params = nnx.split(load_model("smollm2-135m", "float32", mesh))
    tx = make_optimizer(OptimizerConfig(lr=1e-5, warmup_steps=0), 1000)
    psh = state_shardings(params, mesh)
    osh = optimizer_shardings(tx, params, psh, mesh)
    state = (params, jax.jit(tx.init, out_shardings=osh)(params))
    fn = make_train_step(graphdef, tx, 128, (psh, osh), mesh)
    plans = data.plans(shuffle=True, seed=0)
    # One optimizer step = the batches holding the next `per_step` examples.
    groups, cur, n = [], [], 0
    for p in plans:
        cur.append(p)
        n += sum(len(r) for r in p.rows)
        if n >= per_step:
            groups.append(cur)
            cur, n = [], 0
    accum = max(len(g) for g in groups)
    filler = BatchPlan(plans[0].width, ((),) * len(plans[0].rows))
    groups = [g + [filler] * (accum - len(g)) for g in groups]
    batches = [step_batch(data, g, mesh, 0, 1) for g in groups]
    for b in batches:  # warm-up: every shape once
        state, m = fn(state, b)
    jax.block_until_ready(m)
    before = fn._cache_size()
    t0 = time.perf_counter()
    tokens = 0
    for i in range(steps):
        b = batches[i % len(batches)]
        state, m = fn(state, b)
        tokens += int(np.asarray(b["segment_ids"] > 0).sum())
    jax.block_until_ready(m)
    return tokens / (time.perf_counter() - t0), before, fn._cache_size()


def torch_loop(hf_dir: Path, data, steps: int, per_step: int) -> float:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    items = data.get(list(range(len(data))))
    batches = []
    for s in range(0, len(items) - per_step + 1, per_step):
        chunk = items[s : s + per_step]
        w = max(len(x) for x, _ in chunk)
        ids = np.zeros((len(chunk), w), np.int64)
        att = np.zeros((len(chunk), w), np.int64)
        lab = np.full((len(chunk), w), -100, np.int64)
        for i, (x, m) in enumerate(chunk):
            ids[i, : len(x)] = x
            att[i, : len(x)] = 1
            lab[i, : len(x)] = np.where(m > 0, x, -100)
        batches.append((torch.tensor(ids), torch.tensor(att), torch.tensor(lab), int(att.sum())))

    def step(b):
        ids, att, lab, _ = b
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    t0 = time.perf_counter()
    tokens = 0
    for i in range(steps):
        b = batches[i % len(batches)]
        step(b)
        tokens += b[3]
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--per-step", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    if not SHARED.is_dir():
        raise SystemExit(f"shared data not found at {SHARED}")
    import torch

    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", "float32", make_mesh(1, 1, 1))
    with tempfile.TemporaryDirectory() as tmp:
        lines = (SHARED / "gsm8k" / "test.jsonl").read_text().splitlines()[: args.examples]
        (Path(tmp) / "gsm.jsonl").write_text("\n".join(lines) + "\n")
        res = {}
        for pack in (True, False):
            cfg = DataConfig(
                path=str(Path(tmp) / "gsm.jsonl"),
                cache_dir=tmp,
                max_len=256,
                batch_rows=2 if pack else 4,
                pack=pack,
                max_segments=8,
            )
            data = prepare(cfg, tok, progress=False)
            res["packed" if pack else "padded"] = ours(data, args.steps, args.per_step)
        export_hf(model, tok, Path(tmp) / "hf")
        res["torch"] = torch_loop(Path(tmp) / "hf", data, args.steps, args.per_step)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}"
    )
    print("| implementation | real tokens/s | vs PyTorch | compiles before / after timing |")
    print("| --- | ---: | ---: | --- |")
    t = res["torch"]
    for k in ("packed", "padded"):
        v, a, b = res[k]
        print(f"| davir-jax step, {k} rows | {v:,.0f} | {v / t:.2f}x | {a} / {b} |")
    print(f"| PyTorch AdamW loop, padded to batch max | {t:,.0f} | 1.00x | - |")


if __name__ == "__main__":
    main()
