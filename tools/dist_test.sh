#!/usr/bin/env bash
# bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args...]
USAGE='usage: bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args...]'
if [ $# -lt 3 ]; then echo "dist_test.sh: error: CONFIG, CHECKPOINT and NUM_PROCS are required; $USAGE" >&2; exit 1; fi
case "$3" in
    '' | *[!0-9]* | 0*) echo "dist_test.sh: error: NUM_PROCS must be a positive integer, got '$3'; $USAGE" >&2; exit 1 ;;
esac
CONFIG=$1
CHECKPOINT=$2
NPROCS=$3
[ -f "$CONFIG" ] || { echo "dist_test.sh: error: config not found: $CONFIG" >&2; exit 1; }
[ -f "$CHECKPOINT" ] || { echo "dist_test.sh: error: checkpoint not found: $CHECKPOINT" >&2; exit 1; }
PORT=${PORT:-29500}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "$PYTHON" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
PYTHONPATH="$ROOT:$PYTHONPATH" exec "$PYTHON" -m torch.distributed.run --nnodes=1 --node_rank=0 \
    --master_addr=127.0.0.1 --master_port="$PORT" --nproc_per_node="$NPROCS" \
    "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
