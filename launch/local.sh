#!/usr/bin/env bash
# Single node: torchrun standalone rendezvous, one process per GPU (or per core
# group on CPU). Extra arguments are Hydra overrides.
#   NPROC=8 launch/local.sh experiment=cpu_demo trainer.steps=1000
set -euo pipefail
# The project's .venv when present (make setup), else the active environment's python.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-$( [ -x "$HERE/../.venv/bin/python" ] && echo "$HERE/../.venv/bin/python" || echo python3 )}
NPROC=${NPROC:-$($PYTHON -c 'import torch; print(torch.cuda.device_count() or 2)')}
export LCTRAIN_RUN_ID=${LCTRAIN_RUN_ID:-$(date +%Y-%m-%d_%H-%M-%S)}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" -m lctrain.train "$@"
