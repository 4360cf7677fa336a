#!/usr/bin/env bash
# The GPU check in one go (bench/gpu_check.py says what it measures):
#   bash bench/gpu_check.sh          # a CUDA device: ~3-5 min
#   bash bench/gpu_check.sh --cpu    # the same path on the CPU (CI runs it)
# On CUDA it also runs the unit tests marked gpu (DP-SGD in bf16, LoRA moving
# after one DP step). Its last line is the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ "${1:-}" != "--cpu" ]; then
  "$PY" -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/client/test_trainer.py
fi
exec "$PY" bench/gpu_check.py "$@"
