#!/usr/bin/env bash
# Runs test suites compiled on a GPU and records the log with its provenance:
#   bash experiments/gpu_tests.sh [OUT_DIR] [TEST_PATH ...]
# Defaults: experiments/results, tests/kernels tests/ops. The log is OUT_DIR/gpu_tests_h200.log, or
# OUT_DIR/gpu_tests_h200_<first path's basename>.log when test paths are given.
# On the device machine the image's python3 already has jax, pytest and hypothesis.
set -uo pipefail
out=${1:-experiments/results}
shift || true
paths=("${@:-tests/kernels tests/ops}")
if [ $# -gt 0 ]; then log="$out/gpu_tests_h200_$(basename "$1").log"; else log="$out/gpu_tests_h200.log"; fi
mkdir -p "$out"
{
  echo "command: bash experiments/gpu_tests.sh $out ${*}"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "jax: $(python3 -c 'import jax; print(jax.__version__, jax.default_backend())')"
} > "$log"
# shellcheck disable=SC2068
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m pytest ${paths[@]} -ra -p no:cacheprovider -m "not slow" 2>&1 \
  | tee -a "$log"
