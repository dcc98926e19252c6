#!/usr/bin/env bash
# Nsight Compute profile of one launch of a kernel (Mosaic GPU or Triton) in the 128K smooth prefill, on the GPU
# machine (its image has /usr/local/cuda/bin/ncu). Session 12 ran the 19-launch example below (ncu_prefill.* in
# experiments/results; then at ncu's locked base clock, now --clock-control none); experiments/ncu_summary.py
# condenses the SASS table.
#   [NCU_COUNT=1] [NCU_TIMEOUT=420] bash experiments/ncu_kernels.sh OUT_DIR NAME KERNEL_REGEX SKIP [BENCH_SELECTION_ARG ...]
# e.g. the scoring kernel's last 8K-token chunk of the first timed call (16 chunks per call at 128K):
#   bash experiments/ncu_kernels.sh $OUT scores infllmv2_select_scores_mgpu_keys 15
# or the forward tile kernel's last chunk (3 per call): ... tile sparse_attn_fwd_tile_mgpu 2
# or every launch of both in the first call (warm-up) of the prefill:
#   NCU_COUNT=19 bash experiments/ncu_kernels.sh $OUT prefill 'select_scores_mgpu_keys|fwd_tile_mgpu' 0
# JAX's memory preallocation is off: ncu saves and restores the memory a replayed kernel may write, and a
# preallocated pool of most of the GPU's memory would make every replay pass copy it.
# Output: OUT_DIR/ncu_NAME.log (command, date, device, ncu's own output), OUT_DIR/ncu_NAME_details.txt (every
# section of --set full: pipe utilisation, warp stall reasons, memory traffic) and OUT_DIR/ncu_NAME_sass.csv.gz
# (per-instruction SASS with its sampled stall reasons), OUT_DIR/ncu_NAME_raw.csv.gz (every metric of every
# profiled launch, one row each). The report itself (ncu_NAME.ncu-rep) stays in OUT_DIR only if under 15 MiB.
set -uo pipefail
out=${1:?usage: ncu_kernels.sh OUT_DIR NAME KERNEL_REGEX SKIP [BENCH_SELECTION_ARG ...]}
name=${2:?name}
regex=${3:?kernel regex}
skip=${4:?launches to skip}
shift 4
mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
count=${NCU_COUNT:-1}
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
log="$out/ncu_$name.log"
{
  echo "command: NCU_COUNT=$count bash experiments/ncu_kernels.sh $out $name '$regex' $skip $*"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "ncu: $ncu $("$ncu" --version 2>&1 | tail -n 1)"
  echo "jax: $(python3 -c 'import jax; print(jax.__version__, jax.default_backend())' 2>&1 | tail -n 1)"
} > "$log"
# --clock-control none: leave the GPU's clocks as they are (ncu's default locks them to the base clock).
timeout "${NCU_TIMEOUT:-420}" "$ncu" --set full --clock-control none --import-source no -k "regex:$regex" \
  --launch-skip "$skip" \
  --launch-count "$count" \
  -o "$out/ncu_$name" -f python3 experiments/bench_selection.py --no-sweep --select-lens \
  --prefill-lens 131072 --inputs smooth --iters 1 --out "$out/bench_$name" "$@" >> "$log" 2>&1
echo "ncu exit: $?" >> "$log"
"$ncu" --import "$out/ncu_$name.ncu-rep" --page details > "$out/ncu_${name}_details.txt" 2>> "$log"
"$ncu" --import "$out/ncu_$name.ncu-rep" --page source --csv --print-source sass 2>> "$log" \
  | gzip > "$out/ncu_${name}_sass.csv.gz"
"$ncu" --import "$out/ncu_$name.ncu-rep" --page raw --csv 2>> "$log" | gzip > "$out/ncu_${name}_raw.csv.gz"
rm -rf "$out/bench_$name"
if [ "$(stat -c %s "$out/ncu_$name.ncu-rep" 2>/dev/null || echo 0)" -gt $((15 << 20)) ]; then
  mv "$out/ncu_$name.ncu-rep" /tmp/
  echo "report over 15 MiB, left on the device: /tmp/ncu_$name.ncu-rep" >> "$log"
fi
tail -n 20 "$log"
