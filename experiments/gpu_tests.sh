#!/usr/bin/env bash
# Runs test suites compiled on a GPU and records the log with its provenance:
#   [LOG_TAG=name] [TEST_FILTER=expr] bash experiments/gpu_tests.sh [OUT_DIR] [TEST_PATH ...]
# Defaults: experiments/results, tests/kernels tests/ops. The log is OUT_DIR/gpu_tests_h200_<LOG_TAG>.log,
# else OUT_DIR/gpu_tests_h200_<first path's basename>.log when test paths are given, else
# OUT_DIR/gpu_tests_h200.log. TEST_FILTER is a pytest -k expression.
# On the device machine the image's python3 already has jax, pytest and hypothesis.
set -uo pipefail
out=${1:-experiments/results}
shift || true
paths=("${@:-tests/kernels tests/ops}")
tag=${LOG_TAG:-}
if [ -z "$tag" ] && [ $# -gt 0 ]; then tag=$(basename "$1"); fi
log="$out/gpu_tests_h200${tag:+_$tag}.log"
filter=(-k "${TEST_FILTER:-}")
mkdir -p "$out"
{
  echo "command: ${LOG_TAG:+LOG_TAG=$LOG_TAG }${TEST_FILTER:+TEST_FILTER='$TEST_FILTER' }bash experiments/gpu_tests.sh $out ${*}"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "jax: $(python3 -c 'import jax; print(jax.__version__, jax.default_backend())')"
} > "$log"
# shellcheck disable=SC2068
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m pytest ${paths[@]} "${filter[@]}" -ra -p no:cacheprovider -m "not slow" 2>&1 \
  | tee -a "$log"
