#!/usr/bin/env bash
# Run a davir command on one node of a multi-node GPU job. Start it on every node with the same
# coordinator; each node is one JAX process that owns all its local GPUs.
#   COORDINATOR=host0:1234 NUM_NODES=2 NODE_RANK=0 launch/gpu_nodes.sh davir sft --config ...
# Under SLURM the three values default to the job's own variables.
set -euo pipefail
export DAVIR_DISTRIBUTED=env
export DAVIR_COORDINATOR="${COORDINATOR:-$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n1):${PORT:-12355}}"
export DAVIR_NUM_PROCESSES="${NUM_NODES:-${SLURM_NNODES:?set NUM_NODES}}"
export DAVIR_PROCESS_ID="${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK}}"
export HF_HUB_OFFLINE=1
exec "$@"
