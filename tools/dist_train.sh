#!/usr/bin/env bash
# bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]   (gloo on the CPU, nccl on GPUs)
CONFIG=$1
NPROCS=$2
PORT=${PORT:-29500}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
PYTHONPATH="$ROOT:$PYTHONPATH" exec "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 \
    --master_addr=127.0.0.1 --master_port="$PORT" --nproc_per_node="$NPROCS" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "${@:3}"
