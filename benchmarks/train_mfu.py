"""Throughput and MFU of the SFT step (`davir_jax.engine.trainer.make_train_step`: forward,
backward, AdamW update, gradient accumulation in one jitted, sharded, donated step) on models of
real shapes with host-filled random weights (see forward_mfu.py).

    python benchmarks/train_mfu.py --preset qwen2-0.5b --rows 8 --seq 2048 --accum 1 \
        --compute-dtype bfloat16 --attention auto,blocked --remat full --segments 4

`--attention` measures each implementation (`model.attention`) on the same shapes, one result
line each; `--remat` names a policy (none, full, dots, attention); `--segments` packs that many
equal examples into each row.

FLOPs per token: 3 x the forward's (forward + backward = 2 x forward for the weights and the
activations), i.e. 6 x (non-embedding + LM-head parameters) + 3 x causal attention. With `--remat`
the recomputed forward is not counted (MFU counts useful work only).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from forward_mfu import (  # noqa: E402
    add_common_args,
    host_random_model,
    packed_rows,
    peak_flops,
    run_each_attention,
)

from davir_jax.core.sharding import state_shardings  # noqa: E402
from davir_jax.engine.config import OptimizerConfig  # noqa: E402
from davir_jax.engine.trainer import (  # noqa: E402
    accum_batch_sharding,
    make_optimizer,
    make_train_step,
    optimizer_shardings,
)
from davir_jax.jobs.plan import forward_flops  # noqa: E402


def measure(a: argparse.Namespace, arch, mesh, attention: str) -> dict:
    """One SFT-step measurement of implementation `attention`."""
    t0 = time.time()
    model = host_random_model(arch, a.dtype, mesh, a.compute_dtype, a.remat, attention)
    graphdef, params = nnx.split(model)
    tx = make_optimizer(OptimizerConfig(lr=1e-5, warmup_steps=0), 1000)
    psh = state_shardings(params, mesh)
    osh = optimizer_shardings(tx, params, psh, mesh)
    state = (params, jax.jit(tx.init, out_shardings=osh)(params))
    jax.block_until_ready(state)
    init_s = time.time() - t0
    step = make_train_step(graphdef, tx, a.chunk, (psh, osh), mesh)
    rng = np.random.default_rng(0)
    shape = (a.accum, a.rows, a.seq)
    sh = accum_batch_sharding(mesh)
    seg, pos = packed_rows(shape, a.segments)
    half = (np.arange(a.seq) >= a.seq // 4).astype(np.int32)
    batch = {
        "input_ids": rng.integers(0, arch.vocab_size, shape).astype(np.int32),
        "segment_ids": seg,
        "positions": pos,
        "loss_mask": np.broadcast_to(half, shape).copy(),
        "weights": np.ones((a.accum, a.rows, a.segments), np.float32),
    }
    batch = {k: jax.device_put(v, sh) for k, v in batch.items()}
    t0 = time.time()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    tokens = a.accum * a.rows * a.seq
    achieved = 3 * forward_flops(arch, a.seq) * tokens / dt
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    return {
        "bench": "train_step",
        "preset": a.preset,
        "params": arch.num_params(),
        "param_dtype": a.dtype,
        "compute_dtype": a.compute_dtype,
        "attention": attention,
        "remat": a.remat,
        "rows": a.rows,
        "seq": a.seq,
        "segments": a.segments,
        "accum": a.accum,
        "devices": len(jax.devices()),
        "device_kind": kind,
        "jax": jax.__version__,
        "init_s": round(init_s, 2),
        "compile_s": round(compile_s, 2),
        "compiles_after_warmup": step._cache_size(),
        "step_s_median": round(dt, 4),
        "tokens_per_s": round(tokens / dt, 1),
        "tflops_per_s": round(achieved / 1e12, 2),
        "mfu": round(achieved / (peak * len(jax.devices())), 4) if peak else None,
        "loss": float(m["loss"]),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--dtype", default="float32", help="parameter (master weight) dtype")
    p.add_argument("--compute-dtype", default="bfloat16")
    p.add_argument("--remat", default="none", help="none, full, dots or attention")
    add_common_args(p)
    run_each_attention(p.parse_args(), measure)


if __name__ == "__main__":
    main()
