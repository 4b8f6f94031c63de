#!/usr/bin/env bash
# `make gpu-check [QUICK=1] [DRY_RUN=1]`: everything that needs a GPU, in one command, with no network.
#
# QUICK=1 (the prepared run: under 8 minutes on an H200, every step time-boxed; budgets in seconds):
#   build          110  the CUDA extension in place, for this GPU's architecture only
#   info            15  the installation report (python -m medcare_kernels.info --require-cuda)
#   cuda-graph      45  pytest -m gpu -k cuda_graph tests/model (capture + replay of a stage-1 fwd+bwd)
#   layer          110  layer table, Qwen2-7B up/down at T = 4096 and 16384, with the roofline column
#   roofline        10  the roofline predictions (python -m benchmarks --roofline)
#   host            70  host-overhead table on CUDA (every op and backend at tiny shapes; Triton compiles)
#   gpu tests      150  pytest -m gpu tests (fixed Triton configs, xdist workers when installed)
#   e2e             60  end-to-end stage-1 training step, small Qwen2 (Qwen2-0.5B widths, 2 layers)
#   (570 s of boxes: no step starts after the deadline, 450 s, and each is cut at min(box, time left) plus
#   15 s to stop, so the whole run ends within 8 minutes; the expected total is about 6 minutes)
# Default (no QUICK): the same steps without time boxes, the layer table at every GPU token count,
# the per-op table, compute-sanitizer memcheck and racecheck over each CUDA kernel.
# DRY_RUN=1 (or --dry-run): every step in a CPU smoke form (tiny shapes, collect-only tests), so
# tests/test_gpu_check.py checks on a CPU-only machine that the steps parse and start; GPU_CHECK_PLAN=1
# writes the commands of the real run to $OUT_DIR/plan.txt without running them (the test parses them).
#
# Tests (and, with QUICK=1, the benchmarks) compile each Triton kernel's first config only
# (MEDCARE_TRITON_AUTOTUNE=0: fixed configs, no tuning minutes). Every step runs even if an earlier
# one failed (one run gives all the evidence); a step that runs out of its box is stopped with SIGINT
# (pytest still writes its summary) and recorded as such. Results in $OUT_DIR (summary:
# $OUT_DIR/gpu-check.md); the exit status is non-zero if any step failed.
#
# Environment (set by the Makefile): PYTHON, OUT_DIR, MAX_JOBS, CUDA_HOME (may be empty), QUICK, DRY_RUN.
# Supported on the GPU machine: torch >= 2.11, triton >= 3.6, transformers >= 5.17 (peft optional).
set -uo pipefail
cd "$(dirname "$0")/.."

[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
QUICK=${QUICK:-}
DRY_RUN=${DRY_RUN:-}
PYTHON=${PYTHON:-python3}
# A .venv symlink copied from another machine may not run here: fall back to the system python.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "gpu-check: $PYTHON cannot import torch; using python3"
  PYTHON=python3
fi
OUT_DIR=${OUT_DIR:-${OUT:-benchmarks/results}}
mkdir -p "$OUT_DIR"
[ -n "${CUDA_HOME:-}" ] || unset CUDA_HOME
export MAX_JOBS=${MAX_JOBS:-8}
# QUICK: every Triton kernel compiles its first config only (minutes of tuning saved); the full run tunes
# the benchmarks. Tests always run first configs (correctness does not depend on the tile shape).
[ -n "$QUICK" ] && export MEDCARE_TRITON_AUTOTUNE=${MEDCARE_TRITON_AUTOTUNE:-0}
export PYTHONUNBUFFERED=1 DRY_RUN
SUMMARY="$OUT_DIR/gpu-check.md"
DEADLINE=$((SECONDS + ${GPU_CHECK_DEADLINE:-450}))
failed=()

plan() {  # GPU_CHECK_PLAN=1: write the command a step would run to $OUT_DIR/plan.txt instead of running it
  printf '%q ' "$@" >> "$OUT_DIR/plan.txt"
  echo >> "$OUT_DIR/plan.txt"
}

step() {  # step NAME LOGFILE BUDGET_S CMD...: run (time-boxed with QUICK), tee to the log, record the status
  local name=$1 log=$2 budget=$3
  shift 3
  if [ -n "${GPU_CHECK_PLAN:-}" ]; then
    plan "$@"
    echo "| $name | planned (box ${budget} s) | - | \`$log\` |" >> "$SUMMARY"
    return 0
  fi
  local left=$((DEADLINE - SECONDS))
  if [ -n "$QUICK" ]; then
    [ "$budget" -gt "$left" ] && budget=$left
    if [ "$budget" -lt 10 ]; then
      echo "=== $name: skipped (the run's deadline is reached)"
      echo "| $name | skipped: out of time | - | - |" >> "$SUMMARY"
      failed+=("$name (not run)")
      return 0
    fi
  fi
  echo "=== $name${QUICK:+ (box ${budget} s)}"
  local start=$SECONDS
  if [ -n "$QUICK" ]; then
    timeout --signal=INT --kill-after=15 "$budget" "$@" 2>&1 | tee "$OUT_DIR/$log"
  else
    "$@" 2>&1 | tee "$OUT_DIR/$log"
  fi
  local rc=${PIPESTATUS[0]}
  local took=$((SECONDS - start))
  local result=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then result="TIMED OUT after ${took} s (box ${budget} s)"
  elif [ "$rc" != 0 ]; then result="FAILED (exit $rc)"; fi
  echo "| $name | $result | ${took} s | \`$log\` |" >> "$SUMMARY"
  [ "$rc" = 0 ] || failed+=("$name")
  return 0
}

pytest_step() {  # pytest_step NAME LOG BUDGET ARGS...: pytest; "no tests collected" (exit 5) is said in the log,
  # and is a failure of a real run (the test should be there) but not of a dry run (a checkout may predate it)
  local name=$1 log=$2 budget=$3
  shift 3
  if [ -n "${GPU_CHECK_PLAN:-}" ]; then
    plan "$PYTHON" -m pytest "$@"
    echo "| $name | planned (box ${budget} s) | - | \`$log\` |" >> "$SUMMARY"
    return 0
  fi
  step "$name" "$log" "$budget" bash -c 'MEDCARE_TRITON_AUTOTUNE=0 "$0" -m pytest "$@"; rc=$?
    if [ $rc = 5 ]; then echo "gpu-check: no test collected for: pytest $*"; [ -n "$DRY_RUN" ] && exit 0; fi
    exit $rc' "$PYTHON" "$@"
}

{
  echo "# make gpu-check${QUICK:+ QUICK=1}${DRY_RUN:+ DRY_RUN=1}"
  echo
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $("$PYTHON" -c \
    'import torch; print("torch", torch.__version__, "GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")' 2>&1)"
  echo
  echo "| step | result | time | log |"
  echo "|---|---|---|---|"
} > "$SUMMARY"

XDIST=()
WORKERS=${GPU_TEST_WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n "$WORKERS" -p no:benchmark)
BENCH=("$PYTHON" -m benchmarks --no-progress)

if [ -n "$DRY_RUN" ]; then
  # CPU smoke forms: each entry point with tiny arguments, the tests collected but not run.
  export TRITON_INTERPRET=1
  step "build (dry run: setup.py compiles)" build.log 30 "$PYTHON" -m py_compile setup.py
  step "installation report" info.txt 30 "$PYTHON" -m medcare_kernels.info
  pytest_step "cuda-graph test (collect only)" cuda-graph.txt 60 --collect-only -q -m gpu -k cuda_graph tests/model \
    -p no:cacheprovider
  step "layer table (CPU smoke)" bench-layer.txt 60 "${BENCH[@]}" --quick --device cpu --methods floor,torch \
    --tokens 1 --rounds 1 --warmup 1 --roofline-device h200 --json "$OUT_DIR/gpu-layer.json"
  step "roofline predictions" roofline.txt 30 "${BENCH[@]}" --roofline
  step "host-overhead table (CPU smoke)" bench-host.txt 60 "${BENCH[@]}" --host --quick --device cpu --rounds 1 \
    --warmup 1 --json "$OUT_DIR/gpu-host.json"
  step "end-to-end table (CPU smoke)" bench-e2e.txt 90 "${BENCH[@]}" --e2e --quick --device cpu --rounds 1 \
    --warmup 1 --json "$OUT_DIR/gpu-e2e.json"
  pytest_step "gpu tests (collect only)" gpu-tests.txt 120 --collect-only -q -m gpu tests -p no:cacheprovider
else
  if [ -n "$QUICK" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # this GPU's architecture only: half the compile time of the default "8.0;9.0+PTX"
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
    [ -n "$TORCH_CUDA_ARCH_LIST" ] && export TORCH_CUDA_ARCH_LIST
  fi
  step "build (setup.py build_ext --inplace)" build.log 110 \
    env MEDCARE_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace
  step "installation report" info.txt 15 "$PYTHON" -m medcare_kernels.info --require-cuda
  [ -n "${GPU_CHECK_PLAN:-}" ] || "$PYTHON" -m medcare_kernels.info --json > "$OUT_DIR/info.json" 2>/dev/null
  pytest_step "cuda-graph test (pytest -m gpu -k cuda_graph)" cuda-graph.txt 45 -m gpu -k cuda_graph tests/model -q -rfEs \
    -p no:cacheprovider --junitxml="$OUT_DIR/cuda-graph.xml"
  if [ -n "$QUICK" ]; then
    step "layer table, Qwen2-7B T=4096,16384 (+ roofline)" bench-layer.txt 110 "${BENCH[@]}" --device cuda \
      --shapes qwen2-7b-up,qwen2-7b-down --tokens 4096,16384 \
      --methods "reference,torch,triton,triton[cublas-base],triton[triton-base]" --rounds 7 \
      --json "$OUT_DIR/gpu-layer.json"
  else
    step "layer table (python -m benchmarks)" bench-layer.txt 0 "${BENCH[@]}" --device cuda \
      --json "$OUT_DIR/gpu-layer.json"
  fi
  step "roofline predictions" roofline.txt 10 "${BENCH[@]}" --roofline
  step "host-overhead table on CUDA" bench-host.txt 70 "${BENCH[@]}" --host --device cuda \
    --json "$OUT_DIR/gpu-host.json"
  if [ -z "$QUICK" ]; then
    step "op benchmark (python -m medcare_kernels.bench.ops)" bench-ops.txt 0 \
      "$PYTHON" -m medcare_kernels.bench.ops --device cuda --json "$OUT_DIR/gpu-ops.json"
  fi
  # Correctness does not depend on the Triton tile config: first configs only (MEDCARE_TRITON_AUTOTUNE=0),
  # in parallel when pytest-xdist is there (nproc - 2 workers; on an H200 the Triton file took 136 s on
  # 14 workers, compile-bound): in QUICK mode the box may stop it, the summary then says how far it got.
  pytest_step "gpu tests (pytest -m gpu)" gpu-tests.txt 150 -m gpu tests -q -rfEs ${XDIST[@]+"${XDIST[@]}"} \
    -p no:cacheprovider --junitxml="$OUT_DIR/gpu-tests.xml"
  step "end-to-end table on CUDA" bench-e2e.txt 60 "${BENCH[@]}" --e2e --device cuda --json "$OUT_DIR/gpu-e2e.json"
fi

REPORTS=()
for f in gpu-layer gpu-host gpu-e2e gpu-ops; do [ -f "$OUT_DIR/$f.json" ] && REPORTS+=("$OUT_DIR/$f.json"); done
if [ ${#REPORTS[@]} -gt 0 ]; then
  "$PYTHON" -m medcare_kernels.bench.report "${REPORTS[@]}" > "$OUT_DIR/gpu.md" || failed+=("markdown report")
fi

if [ -z "$QUICK" ] && [ -z "$DRY_RUN" ]; then
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
      step "compute-sanitizer $tool" "sanitizer-$tool.txt" 0 \
        env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 1 \
        "$PYTHON" -m tests.sanitize_cuda
    done
  fi
fi

{
  echo
  if [ ${#failed[@]} -eq 0 ]; then echo "All steps passed."; else echo "Failed: ${failed[*]}"; fi
  [ -f "$OUT_DIR/gpu.md" ] && { echo; cat "$OUT_DIR/gpu.md"; }
} >> "$SUMMARY"
echo "=== summary: $SUMMARY"
cat "$SUMMARY"
[ ${#failed[@]} -eq 0 ]
