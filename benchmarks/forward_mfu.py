"""Throughput and MFU of the scoring forward pass (hidden states + chunked token log-probs +
masked NLL, the computation `davir score` runs) on randomly initialised models of real shapes.

    python benchmarks/forward_mfu.py --preset llama2-7b --batch 8 --seq 2048 --dtype bfloat16

FLOPs per token: 2 x (non-embedding parameters + LM head) + causal attention
2 x 2 x layers x heads x head_dim x seq / 2. MFU = achieved FLOP/s / the chip's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from davir_jax.config import load_config  # noqa: E402
from davir_jax.losses import masked_nll, shift_targets, token_logprobs  # noqa: E402
from davir_jax.models import random_model  # noqa: E402
from davir_jax.sharding import batch_sharding, make_mesh  # noqa: E402

PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v4": 275e12,
}


def peak_flops(kind: str) -> float | None:
    for k, v in PEAK_BF16.items():
        if k.lower() in kind.lower():
            return v
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    arch = load_config(ROOT / "configs" / "models" / f"{a.preset}.yaml").model.arch
    mesh = make_mesh(1, -1, 1)
    t0 = time.time()
    model = random_model(arch, a.dtype, mesh)
    jax.block_until_ready(nnx.state(model))
    init_s = time.time() - t0
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, ids, seg):
        m = nnx.merge(graphdef, state)
        targets, mask = shift_targets(ids, seg > 0)
        lp = token_logprobs(m.logits, m.hidden_states(ids, seg), targets, a.chunk)
        return masked_nll(lp, mask)

    rng = np.random.default_rng(0)
    ids = jax.device_put(
        rng.integers(0, arch.vocab_size, (a.batch, a.seq)).astype(np.int32), batch_sharding(mesh)
    )
    seg = jax.device_put(np.ones((a.batch, a.seq), np.int32), batch_sharding(mesh))
    t0 = time.time()
    jax.block_until_ready(score(state, ids, seg))
    compile_s = time.time() - t0
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(score(state, ids, seg))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    tokens = a.batch * a.seq
    n = arch.num_params()
    embed = arch.vocab_size * arch.hidden_size
    dense = n - embed * (1 if arch.tie_embeddings else 2)  # non-embedding parameters
    flops_tok = (
        2 * (dense + embed) + 2 * arch.num_layers * arch.num_heads * arch.resolved_head_dim * a.seq
    )  # 2*2*L*H*hd*T/2 (causal)
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    achieved = flops_tok * tokens / step
    res = {
        "preset": a.preset,
        "params": n,
        "dtype": a.dtype,
        "batch": a.batch,
        "seq": a.seq,
        "devices": len(jax.devices()),
        "device_kind": kind,
        "jax": jax.__version__,
        "init_s": round(init_s, 2),
        "compile_s": round(compile_s, 2),
        "step_s_median": round(step, 4),
        "tokens_per_s": round(tokens / step, 1),
        "tflops_per_s": round(achieved / 1e12, 2),
        "mfu": round(achieved / (peak * len(jax.devices())), 4) if peak else None,
    }
    print(json.dumps(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
