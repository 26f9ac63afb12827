#!/usr/bin/env bash
# Run the same davir command on every worker of a TPU VM pod slice. jax.distributed discovers
# the pod by itself (DAVIR_DISTRIBUTED=tpu). The repository and its .venv must be on every worker
# at the same path (e.g. `gcloud ... ssh --worker=all --command "git clone ... && make .venv/.runtime"`),
# and outputs (runs/, the data cache) should be on storage every worker sees (a GCS FUSE mount or
# NFS), since process 0 merges the shards the others write.
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- davir score --config configs/paper/... ARGS...
set -euo pipefail
tpu="$1"; zone="$2"; shift 2
project_flag=()
if [[ "${1:-}" != "--" ]]; then project_flag=(--project "$1"); shift; fi
[[ "${1:-}" == "--" ]] && shift
repo="${DAVIR_REPO:-\$HOME/davir-jax}"
cmd=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" "${project_flag[@]}" --worker=all \
  --command "cd $repo && DAVIR_DISTRIBUTED=tpu HF_HUB_OFFLINE=1 .venv/bin/$cmd"
