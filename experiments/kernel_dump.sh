#!/usr/bin/env bash
# Compiler evidence for the Mosaic GPU kernels, on the GPU machine (ptxas runs at compile time there):
# compiles the 16K prefill and selection, and the named bench_selection variants, while Mosaic GPU dumps
# each kernel's ptxas report (registers, spills, shared memory) into a log.
#   bash experiments/kernel_dump.sh OUT_DIR [BENCH_SELECTION_ARG ...]
# e.g. "--select-lens 131072" adds the keys-as-rows scoring kernel (from 1024 key blocks on).
# Output: OUT_DIR/kernel_dump.log (command, date, device, where ncu is, the bench output and the ptxas
# summaries). The device image has no nvdisasm, so Mosaic GPU cannot dump SASS there; session 11 asked
# for it too and packed every dump into an archive of 76 MB, too big to fetch, so the script keeps the
# log only.
set -uo pipefail
out=${1:?usage: kernel_dump.sh OUT_DIR [BENCH_SELECTION_ARG ...]}
shift
mkdir -p "$out/dump"
export PYTHONPATH=. PYTHONUNBUFFERED=1
log="$out/kernel_dump.log"
{
  echo "command: bash experiments/kernel_dump.sh $out $*"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "jax: $(python3 -c 'import jax; print(jax.__version__, jax.default_backend())')"
  echo "ncu: $(command -v ncu || find / -name ncu -type f 2>/dev/null | head -n 1 || echo none)"
} > "$log"
MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO="$out/dump" timeout 240 \
  python3 experiments/bench_selection.py --no-sweep --select-lens 16384 --prefill-lens 16384 \
  --inputs smooth --iters 1 --out "$out/bench" "$@" >> "$log" 2>&1
ls -la "$out/dump" >> "$log"
# ptxas -v lines: registers, spill stores/loads, shared memory, per kernel.
grep -h -A4 "Compiling entry function" "$out"/dump/* 2>/dev/null | head -n 200 >> "$log"
# ptxas performance advisories (e.g. C7510: WGMMAs serialized; C7519: an injected warpgroup.arrive).
echo "ptxas advisories (count, message):" >> "$log"
grep -h "(C75" "$out"/dump/* 2>/dev/null | sed 's/ in around line [0-9]*//' | sort | uniq -c | head -n 50 >> "$log"
rm -rf "$out/dump" "$out/bench"
tail -n 60 "$log"
