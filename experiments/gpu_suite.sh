#!/usr/bin/env bash
# The GPU runs of a session in one call on one H200 (each part time-boxed):
#   1. the short->long experiment, --preset h200 (needs data/corpus/*.txt and the BPE json), and
#      concurrently the compiled kernel/op test suites (experiments/gpu_tests.sh), sharing the GPU;
#   2. training throughput of the small preset on the devices present (experiments/scaling.py).
#   bash experiments/gpu_suite.sh OUT_DIR [MESH ...]      (meshes default to 1x1)
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [MESH ...]}
shift
meshes=${*:-1x1}
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader

XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout 420 python3 experiments/short_to_long.py --preset h200 \
  --no-progress --out-dir "$out" > "$out/short_to_long_h200.log" 2>&1 &
train_pid=$!
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout 400 bash experiments/gpu_tests.sh "$out" > /dev/null 2>&1
wait $train_pid
echo "short_to_long exit: $?"
tail -n 30 "$out/short_to_long_h200.log"
tail -n 8 "$out/gpu_tests_h200.log"

timeout 150 python3 experiments/scaling.py --preset small --seq-len 16384 --steps 5 --meshes $meshes \
  --out "$out" 2>&1 | tail -n 6
