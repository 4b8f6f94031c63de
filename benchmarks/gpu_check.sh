#!/usr/bin/env bash
# `make gpu-check`: everything that needs a GPU, in one command, with no network.
#   1. build the CUDA extension in place (MEDCARE_BUILD_CUDA=1: fails loudly if it cannot)
#   2. the installation report (python -m medcare_kernels.info)
#   3. every test marked `gpu` (CUDA and Triton kernels against the float64 oracle)
#   4. the benchmarks: the MoLoRA layer table and the per-op table, as JSON and markdown
#   5. compute-sanitizer memcheck and racecheck over one small run of each CUDA kernel
# Every step runs even if an earlier one failed (so one run gives all the evidence); the exit status
# is non-zero if any step failed. Results: $OUT_DIR (summary in $OUT_DIR/gpu-check.md).
#
# Environment (set by the Makefile): PYTHON, OUT_DIR, MAX_JOBS, CUDA_HOME (may be empty).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT_DIR"
[ -n "${CUDA_HOME:-}" ] || unset CUDA_HOME
export MAX_JOBS=${MAX_JOBS:-8}
SUMMARY="$OUT_DIR/gpu-check.md"
failed=()

step() {  # step NAME LOGFILE CMD...: run, tee the output to the log, record the status
  local name=$1 log=$2
  shift 2
  echo "=== $name"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$log"
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  echo "| $name | $([ "$rc" = 0 ] && echo ok || echo "FAILED (exit $rc)") | ${took} s | \`$log\` |" >> "$SUMMARY"
  [ "$rc" = 0 ] || failed+=("$name")
  return 0
}

{
  echo "# make gpu-check"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "| step | result | time | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

step "build (setup.py build_ext --inplace)" build.log \
  env MEDCARE_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace
step "installation report" info.txt "$PYTHON" -m medcare_kernels.info --require-cuda
"$PYTHON" -m medcare_kernels.info --json > "$OUT_DIR/info.json" 2>/dev/null
# Correctness does not depend on the Triton tile config: the tests compile each kernel's first config
# only (tuning every test shape costs minutes), in parallel when pytest-xdist is there (on an H200
# the Triton file took 136 s on 14 workers, compile-bound). The benchmarks below tune fully.
XDIST=()
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_TEST_WORKERS:-8}" -p no:benchmark)
step "gpu tests (pytest -m gpu)" gpu-tests.txt \
  env MEDCARE_TRITON_AUTOTUNE=0 "$PYTHON" -m pytest -m gpu tests \
  -q -rfEs "${XDIST[@]}" -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml"
step "layer benchmark (python -m benchmarks)" bench.txt \
  "$PYTHON" -m benchmarks --device cuda --no-progress --json "$OUT_DIR/gpu.json"
step "op benchmark (python -m medcare_kernels.bench.ops)" bench-ops.txt \
  "$PYTHON" -m medcare_kernels.bench.ops --device cuda --json "$OUT_DIR/gpu-ops.json"
if [ -f "$OUT_DIR/gpu.json" ] || [ -f "$OUT_DIR/gpu-ops.json" ]; then
  "$PYTHON" -m medcare_kernels.bench.report "$OUT_DIR"/gpu.json "$OUT_DIR"/gpu-ops.json > "$OUT_DIR/gpu.md" \
    || failed+=("markdown report")
fi

SANITIZER=$(command -v compute-sanitizer || true)
for cand in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -n "$SANITIZER" ] || { [ -x "$cand" ] && SANITIZER=$cand; }
done
if [ -z "$SANITIZER" ]; then
  echo "compute-sanitizer not found (not on PATH nor under CUDA_HOME): skipping memcheck and racecheck"
  echo "| compute-sanitizer | skipped: not installed | - | - |" >> "$SUMMARY"
else
  # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees out-of-bounds
  # accesses that would otherwise land in a neighbouring tensor of the same pool.
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" "sanitizer-$tool.txt" \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      "$PYTHON" -m tests.sanitize_cuda
  done
fi

{
  echo
  if [ ${#failed[@]} -eq 0 ]; then echo "All steps passed."; else echo "Failed: ${failed[*]}"; fi
  [ -f "$OUT_DIR/gpu.md" ] && { echo; cat "$OUT_DIR/gpu.md"; }
} >> "$SUMMARY"
echo "=== summary: $SUMMARY"
cat "$SUMMARY"
[ ${#failed[@]} -eq 0 ]
