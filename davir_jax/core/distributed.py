"""Multi-process start-up from the environment, so the same `davir` command runs on one machine,
on every worker of a TPU pod, on multi-node GPUs, or as N local CPU processes.

`DAVIR_DISTRIBUTED` selects how (read by the CLI before JAX starts):
* `tpu`: `jax.distributed.initialize()` with TPU-pod auto-discovery (run on every worker);
* `env`: coordinator, process count and id from `DAVIR_COORDINATOR` (host:port),
  `DAVIR_NUM_PROCESSES`, `DAVIR_PROCESS_ID` (e.g. set by a SLURM or Kubernetes launcher);
* `local`: as `env` on 127.0.0.1 with CPU devices and gloo collectives, `DAVIR_LOCAL_DEVICES`
  devices per process: the multi-controller runtime of a pod, testable on one machine.
Unset: one process.
"""

from __future__ import annotations

import os


def init_from_env() -> None:
    """Initialise `jax.distributed` as `DAVIR_DISTRIBUTED` says (a no-op when unset)."""
    mode = os.environ.get("DAVIR_DISTRIBUTED", "").strip().lower()
    if not mode:
        return
    import jax  # only a multi-process launch needs JAX here: `davir --help` stays fast

    if mode == "tpu":
        jax.distributed.initialize()
        return
    if mode not in ("env", "local"):
        raise ValueError(f"DAVIR_DISTRIBUTED={mode!r}: expected tpu, env or local")
    missing = [
        k
        for k in ("DAVIR_COORDINATOR", "DAVIR_NUM_PROCESSES", "DAVIR_PROCESS_ID")
        if k not in os.environ
    ]
    if missing:
        raise ValueError(f"DAVIR_DISTRIBUTED={mode} needs {', '.join(missing)}")
    if mode == "local":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_num_cpu_devices", int(os.environ.get("DAVIR_LOCAL_DEVICES", "4")))
    jax.distributed.initialize(
        coordinator_address=os.environ["DAVIR_COORDINATOR"],
        num_processes=int(os.environ["DAVIR_NUM_PROCESSES"]),
        process_id=int(os.environ["DAVIR_PROCESS_ID"]),
    )
