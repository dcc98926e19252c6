#!/usr/bin/env bash
# The kernel checks and the prefill benchmark of a session in one device call on one H200, each part
# time-boxed (about 10 minutes in all):
#   1. the compiled Mosaic GPU kernel tests, in two pytest processes sharing the GPU (compiling is
#      CPU-bound): tests/kernels/test_sparse_attention_mgpu.py, and the Mosaic and GPU-only tests of
#      tests/kernels/test_selection_pallas.py (experiments/gpu_tests.sh; logs
#      OUT_DIR/gpu_tests_h200_mgpu[_TAG].log and OUT_DIR/gpu_tests_h200_selection[_TAG].log);
#   2. then, alone on the GPU, the selection + prefill benchmark at 8K-128K with a 128K profile
#      (bench_selection.py; OUT_DIR/bench_selection_h200.json and .png).
#   bash experiments/gpu_kernels.sh OUT_DIR [TAG [BENCH_SELECTION_ARG ...]]
# e.g. the extra arguments "--select-variants mosaic_st2" time a tiling next to the default.
set -uo pipefail
out=${1:?usage: gpu_kernels.sh OUT_DIR [TAG [BENCH_SELECTION_ARG ...]]}
tag=${2:-}
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.45
LOG_TAG=mgpu${tag:+_$tag} timeout 290 bash experiments/gpu_tests.sh "$out" \
  tests/kernels/test_sparse_attention_mgpu.py > /dev/null 2>&1 &
mgpu=$!
LOG_TAG=selection${tag:+_$tag} TEST_FILTER="mosaic or gpu" timeout 290 bash experiments/gpu_tests.sh "$out" \
  tests/kernels/test_selection_pallas.py > /dev/null 2>&1
wait $mgpu
tail -n 3 "$out"/gpu_tests_h200_mgpu${tag:+_$tag}.log "$out"/gpu_tests_h200_selection${tag:+_$tag}.log
unset XLA_PYTHON_CLIENT_MEM_FRACTION
timeout 290 python3 experiments/bench_selection.py --no-sweep --profile-lens 131072 --out "$out" "$@" 2>&1 \
  | tail -n 24
