#!/usr/bin/env bash
# Multi-node launch with the deepspeed launcher, two ways:
#
#   launchers/multinode.sh ssh HOSTFILE [aurora-train args...]
#       run once, on the first node: deepspeed reaches every host of HOSTFILE over ssh/pdsh.
#
#   launchers/multinode.sh node NODE_RANK NUM_NODES RANKS_PER_NODE [aurora-train args...]
#       run on every node (clusters that forbid ssh): each node starts its own local ranks.
#       Needs MASTER_ADDR (node 0's address) and MASTER_PORT in the environment.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
mode=${1:-}; shift || true
case "$mode" in
  ssh)
    hostfile=$1; shift
    [ -f "$hostfile" ] || { echo "hostfile $hostfile does not exist (see launchers/hostfile.example)" >&2; exit 2; }
    exec "$DEEPSPEED" --hostfile "$hostfile" ${MASTER_ADDR:+--master_addr "$MASTER_ADDR"} \
      --master_port "${MASTER_PORT:-29500}" --module aurora_ds.train "$@" ;;
  node)
    node_rank=$1 num_nodes=$2 per_node=$3; shift 3
    : "${MASTER_ADDR:?set MASTER_ADDR to node 0 address}" "${MASTER_PORT:=29500}"
    # The launcher wants a hostfile with distinct names even without ssh; names are labels here.
    hostfile=$(mktemp)
    trap 'rm -f "$hostfile"' EXIT
    for i in $(seq 0 $((num_nodes - 1))); do echo "node$i slots=$per_node" >> "$hostfile"; done
    "$DEEPSPEED" --hostfile "$hostfile" --no_ssh --num_nodes "$num_nodes" --num_gpus "$per_node" \
      --node_rank "$node_rank" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
      --module aurora_ds.train "$@" ;;
  *)
    echo "usage: $0 ssh HOSTFILE [args...] | $0 node NODE_RANK NUM_NODES RANKS_PER_NODE [args...]" >&2; exit 2 ;;
esac
