"""`davir plan --compile`: lower and compile the real jitted step of a job for the config's mesh
from abstract shapes (no weights are read or allocated) and report XLA's own memory analysis
beside `davir plan`'s estimate, as MaxText's `train_compile.py` does.

The step is the one the job runs: `engine.trainer.make_train_step` with the SFT or preference
objective (parameters and AdamW state with the rules table's shardings, `[accum, rows, seq]`
micro-batches over the data-parallel axes), or `engine.nll.nll_step` for scoring. Every input
is a `jax.ShapeDtypeStruct` carrying its `NamedSharding`, so what XLA reports is per device of
that mesh: arguments (parameter, optimizer-state and batch shards), outputs, temporaries (the
activations, gradients and workspace the compiled program needs) and their sum less the
donated buffers (`peak`).

The mesh is built from the devices this process sees (`mesh.cpu_devices` fakes a device count on
CPU). The program is compiled by this machine's XLA backend: on CPU its temporaries follow
XLA:CPU's scheduling, which differs from a TPU's or GPU's, so compile on the target platform to
plan a pod; the argument sizes are exact on any backend.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from davir_jax.core.sharding import batch_sharding, mesh_from_config, state_shardings
from davir_jax.engine.nll import nll_step
from davir_jax.engine.trainer import (
    abstract_arrays,
    accum_batch_sharding,
    make_optimizer,
    make_train_step,
    optimizer_shardings,
    sft_objective,
)
from davir_jax.jobs.dpo import config_objective
from davir_jax.jobs.plan import plan, step_shape
from davir_jax.models.loading import run_config
from davir_jax.models.weights import abstract_model

_TOKEN_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


def compile_step(cfg: Any, job: str = "sft", mesh: Mesh | None = None) -> dict[str, Any]:
    """Lower and compile `job`'s step (sft, dpo or score) for `cfg` on `mesh` (default: the
    config's mesh over this process's devices); returns the timings, XLA's per-device memory
    analysis and the `plan` estimate for the same mesh."""
    if job not in ("sft", "dpo", "score"):
        raise ValueError(f"job {job!r} is not sft, dpo or score")
    m = cfg.model
    if m.lora is not None and job != "score":
        # The compiled step would be the full-weight one; `plan` alone models LoRA's memory.
        raise ValueError("model.lora: davir plan --compile does not compile the LoRA step yet")
    mesh = mesh if mesh is not None else mesh_from_config(cfg.mesh)
    arch, seq, rows, segments = step_shape(cfg, job)
    run = run_config(m.dtype, mesh=mesh, **m.run_options())
    graphdef, abs_state = abstract_model(arch, run)
    param_sh = state_shardings(abs_state, mesh)
    params = abstract_arrays(abs_state, param_sh)
    if job == "score":
        step = nll_step(arch, run, segments, cfg.scoring.chunk)
        tok = jax.ShapeDtypeStruct((rows, seq), jnp.int32, sharding=batch_sharding(mesh, 2))
        args: tuple = (params, tok, tok, tok, tok)
        accum = 1
    else:
        shape = (seq, rows, segments)
        step, args, accum = _train_step_args(cfg, job, graphdef, params, param_sh, mesh, shape)
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    xla = {
        "argument_bytes": int(ma.argument_size_in_bytes),
        "output_bytes": int(ma.output_size_in_bytes),
        "alias_bytes": int(ma.alias_size_in_bytes),
        "temp_bytes": int(ma.temp_size_in_bytes),
        "generated_code_bytes": int(ma.generated_code_size_in_bytes),
    }
    # Donated inputs (the training state) are reused for the outputs they alias.
    xla["peak_bytes"] = (
        xla["argument_bytes"] + xla["output_bytes"] - xla["alias_bytes"] + xla["temp_bytes"]
    )
    estimate = plan(cfg, job, devices=mesh.devices.size)
    return {
        "job": job,
        "platform": mesh.devices.flat[0].platform,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": int(mesh.devices.size),
        "batch": {"micro_batches": accum, "rows": rows, "seq": seq, "segments": segments},
        "lower_s": round(t1 - t0, 3),
        "compile_s": round(t2 - t1, 3),
        "xla": xla,
        "estimate_bytes": estimate["memory_bytes"],
        "estimate_total_bytes": estimate["memory_total_bytes"],
    }


def _train_step_args(
    cfg: Any,
    job: str,
    graphdef: Any,
    params: Any,
    param_sh: Any,
    mesh: Mesh,
    shape: tuple[int, int, int],
) -> tuple[Any, tuple, int]:
    """The jitted training step of `job` and its abstract arguments ((params, opt_state), batch
    [, frozen reference parameters]); the micro-batch count is `train.grad_accum` (a batch stated
    in examples or tokens takes its count from the data, which planning does not read)."""
    tc, dc = cfg.train, cfg.dpo
    seq, rows, segments = shape  # of one micro-batch (`step_shape`)
    tx = make_optimizer(cfg.optimizer, 1000)  # the step count shapes the schedule, not the state
    opt_sh = optimizer_shardings(tx, params, param_sh, mesh)
    opt_state = abstract_arrays(jax.eval_shape(tx.init, params), opt_sh)
    in_step_ref = job == "dpo" and dc.reference_in_step
    if job == "sft":
        objective = sft_objective(tc.chunk)
    else:
        objective = config_objective(dc, tc.chunk)
    frozen = (graphdef, param_sh) if in_step_ref else None
    step = make_train_step(graphdef, tx, objective, (param_sh, opt_sh), mesh, frozen)
    accum = 1 if (tc.batch_examples or tc.batch_tokens) else tc.grad_accum
    sh = accum_batch_sharding(mesh)
    batch = {}
    for k in objective.batch_keys:
        tokens = k in _TOKEN_KEYS
        shape = (accum, rows, seq if tokens else segments)
        batch[k] = jax.ShapeDtypeStruct(shape, jnp.int32 if tokens else jnp.float32, sharding=sh)
    args = ((params, opt_state), batch) + ((params,) if in_step_ref else ())
    return step, args, accum


def _size(n: float) -> str:
    return f"{n / 2**30:9.3f} GiB" if n >= 2**30 else f"{n / 2**20:9.3f} MiB"


def render_compiled(c: dict[str, Any]) -> str:
    x, b = c["xla"], c["batch"]
    return "\n".join(
        [
            f"compiled {c['job']} step on {c['devices']} {c['platform']} devices, mesh "
            f"{c['mesh']}: {b['micro_batches']} x {b['rows']} rows x {b['seq']} tokens; lower "
            f"{c['lower_s']:.1f} s, compile {c['compile_s']:.1f} s",
            "XLA memory analysis per device:",
            f"  arguments    {_size(x['argument_bytes'])}",
            f"  outputs      {_size(x['output_bytes'])} (donated and reused: "
            f"{_size(x['alias_bytes']).strip()})",
            f"  temporaries  {_size(x['temp_bytes'])}",
            f"  peak         {_size(x['peak_bytes'])} against the estimate "
            f"{_size(c['estimate_total_bytes']).strip()}",
        ]
    )
