"""Throughput and MFU of the scoring step (`davir_jax.engine.nll.nll_step`: hidden states + chunked
token log-probs + per-example NLL, exactly what `davir score` runs) on randomly initialised models
of real shapes. Parameters are filled on the host and placed tensor by tensor (the weight-import
path), which avoids compiling a jitted initialiser of the whole unrolled layer stack.

    python benchmarks/forward_mfu.py --preset llama2-7b --batch 8 --seq 2048 --dtype bfloat16 \
        --attention auto,blocked,dense --segments 4

`--attention` measures each implementation (`model.attention`) on the same shapes, one result
line each; `--segments` packs that many equal examples into each row (segment ids 1..N), the
layout the fused kernels are for. The FLOP count still takes attention over the whole row (as
one causal example), so on packed rows MFU is overstated by part of the attention term; the
implementations compared at the same shapes are compared fairly.

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
from davir_jax.core.sharding import Sharder, batch_sharding, make_mesh  # noqa: E402
from davir_jax.engine.nll import nll_step  # noqa: E402
from davir_jax.jobs.plan import CHIPS, forward_flops  # noqa: E402
from davir_jax.models.decoder import RunConfig  # noqa: E402
from davir_jax.models.weights import abstract_model, build_model, iter_params, param_table  # noqa: E402

# device_kind spellings -> davir_jax.jobs.plan.CHIPS names (the one table of chip peaks)
_KIND_ALIASES = {
    "v5 lite": "v5e",
    "v5e": "v5e",
    "v5p": "v5p",
    "v4": "v4",
    "v6": "v6e",
    "a100": "a100",
    "h100": "h100",
    "h200": "h200",
}


def peak_flops(kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device kind, or None for CPUs and unknown chips."""
    for alias, chip in _KIND_ALIASES.items():
        if alias in kind.lower():
            return CHIPS[chip][1]
    return None


def host_random_model(
    arch, dtype: str, mesh, compute_dtype: str | None = None, remat=False, attention="auto"
):
    """A model of `arch` with small pseudo-random weights made on the host (a repeated random
    tile: values do not matter for throughput, and filling 7B normals would take minutes)."""
    run = RunConfig(dtype, compute_dtype or dtype, remat, Sharder(mesh), attention=attention)
    _, abs_state = abstract_model(arch, run)
    shapes = {p: tuple(v.get_value().shape) for p, v in iter_params(abs_state)}
    tile = (np.random.default_rng(0).standard_normal(1 << 16) * 0.02).astype(np.float32)
    hf_shape = {}
    for t in param_table(arch):
        hf_shape[t.hf_name] = jax.eval_shape(
            t.to_hf, jax.ShapeDtypeStruct(shapes[t.path], np.float32)
        ).shape

    def get(name: str) -> np.ndarray:
        if name.endswith("norm.weight"):
            return np.ones(hf_shape[name], np.float32)
        return np.resize(tile, hf_shape[name])

    return build_model(arch, run, mesh, get, "random")


def preset_arch(preset: str):
    """The architecture of a preset name (`configs/models/NAME.yaml`) or of a config file with
    an explicit `model.arch` (e.g. configs/tiny.yaml, for a quick check)."""
    path = pathlib.Path(preset) if preset.endswith(".yaml") else None
    path = path or ROOT / "configs" / "models" / f"{preset}.yaml"
    arch = load_config(path).model.arch
    if arch is None:
        raise SystemExit(f"{path}: no model.arch (a preset or a config with an explicit arch)")
    return arch


def packed_rows(shape: tuple[int, ...], segments: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions) of rows of `shape[-1]` tokens holding `segments` equal examples."""
    seq = shape[-1]
    at = np.arange(seq)
    seg = np.minimum(at * segments // seq, segments - 1).astype(np.int32) + 1
    starts = np.searchsorted(seg, np.arange(1, segments + 1))
    pos = (at - starts[seg - 1]).astype(np.int32)
    return np.broadcast_to(seg, shape).copy(), np.broadcast_to(pos, shape).copy()


def measure(a: argparse.Namespace, arch, mesh, attention: str) -> dict:
    """One scoring-step measurement of implementation `attention`."""
    t0 = time.time()
    model = host_random_model(arch, a.dtype, mesh, attention=attention)
    jax.block_until_ready(nnx.state(model))
    init_s = time.time() - t0
    _, state = nnx.split(model)
    step_fn = nll_step(model.arch, model.run, a.segments, a.chunk)

    rng = np.random.default_rng(0)
    put = lambda x: jax.device_put(x, batch_sharding(mesh))  # noqa: E731
    shape = (a.batch, a.seq)
    ids = put(rng.integers(0, arch.vocab_size, shape).astype(np.int32))
    seg, pos = (put(x) for x in packed_rows(shape, a.segments))
    mask = put((np.arange(a.seq) >= a.seq // 4).astype(np.int32)[None].repeat(a.batch, 0))
    args = (state, ids, seg, pos, mask)
    t0 = time.time()
    jax.block_until_ready(step_fn(*args))
    compile_s = time.time() - t0
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step_fn(*args))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    tokens = a.batch * a.seq
    flops_tok = forward_flops(arch, a.seq)
    kind = jax.devices()[0].device_kind
    peak = peak_flops(kind)
    achieved = flops_tok * tokens / step
    return {
        "preset": a.preset,
        "params": arch.num_params(),
        "dtype": a.dtype,
        "attention": attention,
        "batch": a.batch,
        "seq": a.seq,
        "segments": a.segments,
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


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The options both MFU benchmarks take (this one and train_mfu.py)."""
    p.add_argument("--attention", default="auto", help="comma-separated model.attention values")
    p.add_argument("--segments", type=int, default=1, help="examples packed per row")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--out", default=None)


def run_each_attention(a: argparse.Namespace, measure) -> None:
    """`measure(a, arch, mesh, attention)` for each of `a.attention`'s implementations, on one
    mesh over every device; one JSON line each, printed and appended to `a.out`."""
    arch = preset_arch(a.preset)
    mesh = make_mesh(1, -1, 1)
    for attention in a.attention.split(","):
        res = measure(a, arch, mesh, attention)
        print(json.dumps(res), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16")
    add_common_args(p)
    run_each_attention(p.parse_args(), measure)


if __name__ == "__main__":
    main()
