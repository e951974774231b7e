#!/usr/bin/env bash
# GPU check of the odconv CUDA kernels, in one call, for a machine with one GPU (written for an H200:
# torch 2.11 + CUDA 13.0, nvcc, ninja, 16 cores, no internet). Expected total: 5-7 minutes.
#
#   bash benchmarks/gpu_check.sh                  # results in benchmarks/results/gpu_<date>/
#   OUT=/some/dir bash benchmarks/gpu_check.sh    # results in /some/dir
#
# Steps, in order. Each runs under `timeout` and all of them within GPU_CHECK_BUDGET_S (default 480 s);
# a failing step does not stop the others. Exit status 0 only if every step passed (a step that is
# cut by its timeout or by the budget counts as failed; a missing compute-sanitizer is reported, not
# failed).
#   info       nvidia-smi, python / torch / CUDA / nvcc / compute-sanitizer versions
#   build      the extension in place, CUDA required: python setup.py build_ext --inplace (sm_90)
#   probe      python benchmarks/cpu_error_probe.py: does a C++ argument error of the CPU kernel reach
#              Python (before and after torch.compile)? Names the step if it crashes (the 2026-11-29
#              and 2026-11-30 runs segfaulted there: the extension was built by the /opt/gcc compiler
#              that the image's CC/CXX name; this script now builds with /usr/bin/g++, see below)
#   test_cuda  pytest tests/test_cuda.py (CUBLAS_WORKSPACE_CONFIG set for the determinism test)
#   test_ops   pytest -v tests/test_ops.py (the CPU op tests), in the background during the GPU steps;
#              -v so that a crash (the 2026-11-29 run segfaulted) names the test in test_ops.log
#   memcheck   compute-sanitizer --tool memcheck   python benchmarks/cuda_memcheck_case.py
#   racecheck  compute-sanitizer --tool racecheck  python benchmarks/cuda_memcheck_case.py --quick
#   bench      python benchmarks/bench_op.py --device cuda --shapes default,layer4 --no-compile
#              --min-run-time 0.25 --rounds 2 --json $OUT/bench_cuda.json   (layer4: ResNet-18 layer4,
#              B = 32 and 256, 512 -> 512, 7x7 maps, 3x3, K = 4; compiled_reference is skipped to fit
#              the budget; GPU timings are steady, so shorter and fewer rounds than on the CPU)
#   profile    python benchmarks/cuda_profile.py: the CUDA kernels of one forward + backward of three
#              shapes, per backend (where the extension's time goes, and what cuDNN runs); then the
#              extension on layer4 B256 with 1 GiB batch chunks instead of 256 MiB, and the GTSRB
#              network's layers in float32 and bfloat16
#   train      python benchmarks/bench_train.py --device cuda --rounds 1: images/s of a GTSRB training
#              step, extension vs reference vs static twin, float32 and bfloat16 autocast
#   bench_bf16 bench_op.py --dtype bfloat16 on the default suite (fwd and fwdbwd, no memory)
#   bench_chunk bench_op.py as in bench, extension and static only, with 1 GiB batch chunks
#              (ODCONV_CUDA_CHUNK_BYTES): time and memory of the larger budget on every shape (on
#              layer4 B256 it took the step from 32.5 to 23.6 ms, run b's profile)
# Every step logs to $OUT/<step>.log; the summary table is printed last and kept in $OUT/summary.txt.
#
# Environment: PYTHON (default: .venv/bin/python if it has CUDA torch, else python3), CUDA_HOME (found
# if unset), CXX / CC (set to /usr/bin/g++ / gcc unless GPU_CHECK_KEEP_CXX=1), MAX_JOBS (16),
# TORCH_CUDA_ARCH_LIST (9.0), GPU_CHECK_BUDGET_S (480), GPU_CHECK_STEPS (the
# steps to run, default all: e.g. "info build memcheck" to rerun only those). If pytest is not
# installed, a folder of pure-Python packages (pytest and its dependencies) at $GPU_CHECK_PYDEPS
# (default .gpu_pydeps) is added to PYTHONPATH.
set -u -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$(pwd)
OUT="${OUT:-benchmarks/results/gpu_$(date +%F)}"
mkdir -p "$OUT/.status" || exit 2
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/.status/*
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
STEPS=(info build probe test_cuda test_ops memcheck racecheck bench profile train bench_bf16 bench_chunk)
SELECTED=" ${GPU_CHECK_STEPS:-${STEPS[*]}} "

# ---------------------------------------------------------------------------------------- environment
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    PYTHON=.venv/bin/python
  elif command -v python3 >/dev/null; then
    PYTHON=python3
  else
    PYTHON=python
  fi
fi
if ! "$PYTHON" -c "import pytest" 2>/dev/null; then
  PYDEPS=${GPU_CHECK_PYDEPS:-.gpu_pydeps}
  [ -d "$PYDEPS" ] && export PYTHONPATH="$ROOT/$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"
fi

cuda_home_ok() { [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
if [ -z "${CUDA_HOME:-}" ] || ! cuda_home_ok "$CUDA_HOME"; then
  unset CUDA_HOME
  candidates=()
  if command -v nvcc >/dev/null; then
    candidates+=("$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")")
  fi
  candidates+=(/usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13* /usr/local/cuda-1* /opt/cuda /usr)
  for c in "${candidates[@]}"; do
    if cuda_home_ok "$c"; then export CUDA_HOME=$c; break; fi
  done
fi
SANITIZER=""
for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" "${CUDA_HOME:-/nonexistent}/compute-sanitizer/compute-sanitizer" \
         "$(command -v compute-sanitizer 2>/dev/null)" /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-1*/bin/compute-sanitizer; do
  if [ -n "$c" ] && [ -x "$c" ]; then SANITIZER=$c; break; fi
done
# The C++ compiler: the system's g++, not the one the environment names. On the H200 image CC and CXX
# point at a GCC in /opt/gcc, and the extension it builds crashes the process at the first C++
# exception of the CPU kernel (an argument error); built with /usr/bin/g++ the error reaches Python
# (results/gpu_2026-11-30_b/probe_flags.log). GPU_CHECK_KEEP_CXX=1 keeps CC and CXX as they are.
ENV_COMPILERS="CXX=${CXX:-<unset>} CC=${CC:-<unset>}"
if [ "${GPU_CHECK_KEEP_CXX:-0}" != 1 ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
  export CXX=/usr/bin/g++ CC=/usr/bin/gcc
fi
export MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1
export PYTHON SANITIZER OUT ENV_COMPILERS

# ---------------------------------------------------------------------------------------- step runner
skip_step() {  # NAME REASON: reported, not failed
  echo "SKIP 0 $2" > "$OUT/.status/$1"
  echo "=== $1: skipped: $2"
}

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND (a program or an exported step_* function) under
# timeout (the lesser of CAP and the time left in the budget), logs to $OUT/NAME.log, records
# "STATUS SECONDS" in $OUT/.status/NAME.
run_step() {
  local name=$1 cap=$2
  shift 2
  if [[ $SELECTED != *" $name "* ]]; then
    skip_step "$name" "not in GPU_CHECK_STEPS"
    return 0
  fi
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 20 ]; then
    echo "CUT 0 budget of ${BUDGET_S}s used up before the step" > "$OUT/.status/$name"
    echo "=== $name: not run, the budget is used up"
    return 1
  fi
  local limit=$((cap < left ? cap : left))
  local t0
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s): $*"
  { echo "\$ $*"; echo; } > "$OUT/$name.log"
  timeout --kill-after=15 "$limit" bash -c '"$@"' bash "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0)) status=PASS
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; elif [ $rc -ne 0 ]; then status=FAIL; fi
  echo "$status $dt exit $rc" > "$OUT/.status/$name"
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
  echo "=== $name: $status in ${dt}s"
  return $rc
}


# ---------------------------------------------------------------------------------------------- steps
step_info() {
  echo "date: $(date -Is)   host: $(hostname)   out: $OUT"
  echo "python: $PYTHON   CUDA_HOME: ${CUDA_HOME:-<none>}   sanitizer: ${SANITIZER:-<none>}"
  echo "compilers: CXX=${CXX:-<unset>} CC=${CC:-<unset>} (the environment had $ENV_COMPILERS)"
  "${CXX:-c++}" --version | head -n 1
  nvidia-smi || true
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version || true
  [ -n "$SANITIZER" ] && "$SANITIZER" --version
  ninja --version || true
  nproc
  "$PYTHON" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| torch CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available(), "| devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
    print("tf32 matmul:", torch.backends.cuda.matmul.allow_tf32, "| tf32 cudnn:", torch.backends.cudnn.allow_tf32)
try:
    import pytest
    print("pytest", pytest.__version__)
except ImportError:
    print("pytest: NOT INSTALLED (tests will fail; see GPU_CHECK_PYDEPS in the header)")
EOF
}

step_build() {
  rm -rf build/temp.* build/lib.*  # no stale objects from another torch
  ODCONV_REQUIRE_EXTENSION=1 "$PYTHON" setup.py build_ext --inplace || return 1
  "$PYTHON" - <<'EOF'
import json, torch, odconv
info = odconv.backend_info()
print(json.dumps(info, indent=1))
for key in ("CPU", "CUDA"):
    for op in ("odconv::odconv2d", "odconv::odconv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
assert torch._C._dispatch_has_kernel_for_dispatch_key("odconv::odconv2d", "AutocastCUDA")
assert info["cuda"]["backend"] == "extension" and info["cpu"]["backend"] == "extension", info
print("CPU, CUDA and AutocastCUDA kernels registered")
EOF
}

step_sanitize() {  # TOOL ARGS...: the case script under compute-sanitizer, our kernels only
  local tool=$1
  shift
  local filter=()
  if "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-name "; then
    filter=(--kernel-name kns=odconv)
  elif "$SANITIZER" --help 2>/dev/null | grep -q -- "--kernel-regex"; then
    filter=(--kernel-regex kns=odconv)
  fi
  echo "kernel filter: ${filter[*]:-<none: every kernel is checked>}"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 3 "${filter[@]}" \
    "$PYTHON" benchmarks/cuda_memcheck_case.py "$@"
}

step_profile() {  # the kernels of three shapes; layer4 B256 with 1 GiB chunks; the GTSRB layers in
  # float32 and bfloat16 (the network's training step was slower under bf16 autocast in run b)
  "$PYTHON" benchmarks/cuda_profile.py --json "$OUT/profile_cuda.json" || return 1
  echo; echo "### ODCONV_CUDA_CHUNK_BYTES=1073741824"
  ODCONV_CUDA_CHUNK_BYTES=1073741824 "$PYTHON" benchmarks/cuda_profile.py --shapes 256,512,512,7,3,4,1,1 \
    --backends extension --top 8 || return 1
  for dtype in float32 bfloat16; do
    echo; echo "### GTSRB layers, $dtype"
    "$PYTHON" benchmarks/cuda_profile.py --shapes gtsrb --dtype "$dtype" --backends extension,static --top 6 \
      || return 1
  done
}

export -f step_info step_build step_sanitize step_profile

bench_summary() {
  "$PYTHON" - "$OUT/bench_cuda.json" <<'EOF' 2>/dev/null || true
import json, sys
report = json.load(open(sys.argv[1]))
for shape in report.get("shapes", []):
    m = shape.get("metrics", {})
    cells = []
    for mode in ("fwd", "fwdbwd"):
        t = m.get(mode, {}).get("target") if isinstance(m.get(mode), dict) else None
        cells.append(f"{mode} ext/(static*floor) = {t:.2f}" if isinstance(t, (int, float)) else f"{mode} -")
    print(f"  {shape.get('name', '?'):<40} " + "   ".join(cells))
EOF
}

# ----------------------------------------------------------------------------------------------- main
echo "odconv GPU check -> $OUT (budget ${BUDGET_S}s)"
run_step info 120 step_info
run_step build 300 step_build
BUILD_OK=$?

if [ $BUILD_OK -eq 0 ]; then
  run_step probe 120 "$PYTHON" -X faulthandler benchmarks/cpu_error_probe.py
  # CPU tests in the background (they do not touch the GPU), while the GPU steps run
  ( run_step test_ops 240 env OMP_NUM_THREADS=6 "$PYTHON" -m pytest -v -p no:cacheprovider tests/test_ops.py \
      > "$OUT/.test_ops.console" 2>&1 ) &
  TEST_OPS_PID=$!
  run_step test_cuda 240 env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_cuda.py
  if [ -n "$SANITIZER" ]; then
    run_step memcheck 150 step_sanitize memcheck
    run_step racecheck 120 step_sanitize racecheck --quick
  else
    skip_step memcheck "compute-sanitizer not found"
    skip_step racecheck "compute-sanitizer not found"
  fi
  wait "$TEST_OPS_PID"
  cat "$OUT/.test_ops.console"
  run_step bench 200 "$PYTHON" benchmarks/bench_op.py --device cuda --shapes default,layer4 --no-compile \
    --min-run-time 0.25 --rounds 2 --json "$OUT/bench_cuda.json"
  run_step profile 120 step_profile
  run_step train 120 "$PYTHON" benchmarks/bench_train.py --device cuda --rounds 1 --json "$OUT/bench_train_cuda.json"
  run_step bench_bf16 90 "$PYTHON" benchmarks/bench_op.py --device cuda --shapes default --dtype bfloat16 \
    --no-compile --modes fwd,fwdbwd --min-run-time 0.2 --rounds 1 --json "$OUT/bench_cuda_bfloat16.json"
  run_step bench_chunk 90 env ODCONV_CUDA_CHUNK_BYTES=1073741824 "$PYTHON" benchmarks/bench_op.py --device cuda \
    --shapes default,layer4 --backends extension,static --no-compile --min-run-time 0.25 --rounds 2 \
    --json "$OUT/bench_cuda_chunk1g.json"
else
  for s in probe test_cuda test_ops memcheck racecheck bench profile train bench_bf16 bench_chunk; do
    echo "CUT 0 not run: the build failed" > "$OUT/.status/$s"
  done
fi

# -------------------------------------------------------------------------------------------- summary
note() {  # a one-line digest of a step's log
  local log="$OUT/$1.log"
  [ -f "$log" ] || return 0
  case $1 in
    test_*) grep -E "[0-9]+ (passed|failed)|error" "$log" | tail -n 1 ;;
    probe) grep -E "^[0-9]\.|all steps passed|Fatal" "$log" | tail -n 1 ;;
    memcheck | racecheck) grep -E "ERROR SUMMARY|RACECHECK SUMMARY|cases ok" "$log" | tr '\n' ' ' ;;
    build) grep -q "kernels registered" "$log" && echo "CPU, CUDA, AutocastCUDA kernels registered" ;;
    bench | bench_bf16 | bench_chunk) grep -iE "worst|target" "$log" | tail -n 2 | tr '\n' ' ' ;;
    profile) grep -E "^[a-z]+: .* ms per step" "$log" | head -n 3 | tr '\n' ' ' ;;
    train) grep -E "^\|" "$log" | tail -n 5 | tr '\n' ' ' ;;
    info) grep -E "^device 0" "$log" ;;
  esac
}
FAILED=0
for s in "${STEPS[@]}"; do
  status=MISSING
  [ -f "$OUT/.status/$s" ] && read -r status _ < "$OUT/.status/$s"
  case $status in PASS | SKIP) ;; *) FAILED=1 ;; esac
done
{
  echo
  echo "odconv GPU check summary ($(date -Is), $(($(date +%s) - START))s of ${BUDGET_S}s budget) -> $OUT"
  printf "%-10s %-8s %5s  %s\n" step status secs note
  for s in "${STEPS[@]}"; do
    if [ -f "$OUT/.status/$s" ]; then
      read -r status secs _ < "$OUT/.status/$s"
    else
      status=MISSING secs=0
    fi
    printf "%-10s %-8s %5s  %s\n" "$s" "$status" "$secs" "$(note "$s" | cut -c1-150)"
  done
  if [ -f "$OUT/bench_cuda.json" ]; then
    echo "bench (targets: fwd <= 1.15, fwdbwd <= 1.2):"
    bench_summary
  fi
  [ $FAILED -eq 0 ] && echo "RESULT: PASS" || echo "RESULT: FAIL"
} | tee "$OUT/summary.txt"
exit $FAILED
