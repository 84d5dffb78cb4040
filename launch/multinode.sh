#!/usr/bin/env bash
# Multi-node: run this on every node with the same MASTER_ADDR/MASTER_PORT/RUN_ID; the c10d
# rendezvous assigns ranks. The stores on the MASTER_ADDR node listen on that address only:
# give the cluster's private interface. Extra arguments are Hydra overrides.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 \
#     RUN_ID=llama1b-$(date +%F) launch/multinode.sh model=llama_1b data.seq_len=131072
set -euo pipefail
# The project's .venv when present (make setup), else the active environment's python.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$( [ -x "$HERE/../.venv/bin/python" ] && echo "$HERE/../.venv/bin/python" || echo python3 )}
: "${NNODES:?set NNODES (number of nodes)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of the rendezvous node, reachable from every node)}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-$($PYTHON -c 'import torch; print(torch.cuda.device_count() or 1)')}
RUN_ID=${RUN_ID:?set RUN_ID (same on every node: names the shared run directory)}
export LCTRAIN_RUN_ID=$RUN_ID
exec "$PYTHON" -m lctrain.launch --nnodes="$NNODES" ${NODE_RANK:+--node-rank="$NODE_RANK"} --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RUN_ID" \
  -m lctrain.train "$@"
