#!/usr/bin/env bash
# Runs the kernel and op test suites compiled on a GPU and records the log with its provenance:
#   bash experiments/gpu_tests.sh [OUT_DIR]   (default: experiments/results)
# On the device machine the image's python3 already has jax, pytest and hypothesis.
set -uo pipefail
out=${1:-experiments/results}
mkdir -p "$out"
log="$out/gpu_tests_h200.log"
{
  echo "command: bash experiments/gpu_tests.sh $*"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "jax: $(python3 -c 'import jax; print(jax.__version__, jax.default_backend())')"
} > "$log"
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m pytest tests/kernels tests/ops -q -ra -p no:cacheprovider \
  -m "not slow" 2>&1 | tee -a "$log"
