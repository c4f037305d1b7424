#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it checks): run on a machine with a CUDA GPU, in
# the repository's root, with ragtrain installed (`pip install -e .[gpu]` for faiss-gpu):
#   bash bench/gpu_check.sh            # exit 0: every check passed or was skipped with a reason
# It stops after 5 minutes at most.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 300 "$PY" bench/gpu_check.py "$@"
