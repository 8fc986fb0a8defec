#!/usr/bin/env bash
# bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]   (gloo on the CPU, nccl on GPUs)
USAGE='usage: bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]'
if [ $# -lt 2 ]; then echo "dist_train.sh: error: CONFIG and NUM_PROCS are required; $USAGE" >&2; exit 1; fi
case "$2" in
    '' | *[!0-9]* | 0*) echo "dist_train.sh: error: NUM_PROCS must be a positive integer, got '$2'; $USAGE" >&2; exit 1 ;;
esac
CONFIG=$1
NPROCS=$2
[ -f "$CONFIG" ] || { echo "dist_train.sh: error: config not found: $CONFIG" >&2; exit 1; }
PORT=${PORT:-29500}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
PYTHONPATH="$ROOT:$PYTHONPATH" exec "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 \
    --master_addr=127.0.0.1 --master_port="$PORT" --nproc_per_node="$NPROCS" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "${@:3}"
