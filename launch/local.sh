#!/usr/bin/env bash
# Run a davir command as N local processes (CPU, gloo collectives, one global mesh): the
# multi-controller runtime of a TPU pod on one machine.
#   launch/local.sh N [--devices-per-process K] davir ARGS...
set -euo pipefail
n="$1"; shift
per=4
if [[ "${1:-}" == "--devices-per-process" ]]; then per="$2"; shift 2; fi
port="${DAVIR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
pids=()
for ((i = 0; i < n; i++)); do
  DAVIR_DISTRIBUTED=local DAVIR_COORDINATOR="127.0.0.1:${port}" DAVIR_NUM_PROCESSES="$n" \
  DAVIR_PROCESS_ID="$i" DAVIR_LOCAL_DEVICES="$per" JAX_PLATFORMS=cpu "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
