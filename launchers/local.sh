#!/usr/bin/env bash
# N ranks on this machine: launchers/local.sh N [aurora-train arguments...]
# CPU: gloo (DeepSpeed picks it); GPU: nccl, one rank per GPU.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
[ $# -ge 1 ] || { echo "usage: $0 NUM_RANKS [aurora-train args...]" >&2; exit 2; }
N=$1; shift
exec "$DEEPSPEED" --num_gpus "$N" --master_port "${MASTER_PORT:-29500}" --module aurora_ds.train "$@"
