#!/usr/bin/env bash
# Single node: one process per GPU (or 2 CPU ranks), rendezvous on 127.0.0.1 only (nothing
# listens beyond this machine). Extra arguments are Hydra overrides.
#   NPROC=8 launch/local.sh experiment=cpu_demo trainer.steps=1000
set -euo pipefail
# The project's .venv when present (make setup), else the active environment's python.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$( [ -x "$HERE/../.venv/bin/python" ] && echo "$HERE/../.venv/bin/python" || echo python3 )}
NPROC=${NPROC:-$($PYTHON -c 'import torch; print(torch.cuda.device_count() or 2)')}
export LCTRAIN_RUN_ID=${LCTRAIN_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
exec "$PYTHON" -m lctrain.launch --nproc-per-node="$NPROC" -m lctrain.train "$@"
