#!/usr/bin/env bash
# The whole GPU verification in one command, for a GPU host that has its own torch (2.6 or newer, CUDA 13),
# python3 with pytest, nvcc, and no network:
#
#   env        GPU name and driver (nvidia-smi), torch and its CUDA, nvcc, cmake, compute-sanitizer
#   configure  cmake into a fresh build-gpu/ (CUDA on, GoogleTest suite on, kernels for this GPU)
#   build      cmake --build build-gpu, all cores
#   install    the Python package from build-gpu (pip, no build isolation, no dependencies, no index)
#   variants   benchmarks/bench.py --variants: per code path of the CUDA backend (tensor cores on/off, fused
#              m x m kernels on/off, float32) and n, the forward and forward+backward times, their multiples
#              of issue 13's bandwidth floors, and the SDPA and SDPA-composition peers (one table)
#   ncu        when Nsight Compute (ncu) is on PATH: a per-kernel profile (speed of light, occupancy, launch
#              statistics) of one forward+backward at n = 16384, bfloat16
#   ctest      the C++ suite (its CUDA tests run here)
#   pytest-cuda      the per-device Python suite and tests/python/test_cuda.py on the GPU
#                    (NYSTROM_TEST_DEVICE=cuda: every per-device test on the GPU, a missing GPU fails)
#   pytest-subset    the same per-device tests on the CPU backend of the CUDA build (NYSTROM_TEST_DEVICE=cpu;
#                    no fuzzing, no compile)
#   memcheck, racecheck   compute-sanitizer on scripts/gpu_sanitizer_case.py
#   bench      benchmarks/bench.py --device cuda within what is left of the time budget
#
# Every step's output goes to a log (tee: a killed run keeps what it wrote); a failing step is recorded and
# the next one runs, except that a failing configure/build stops everything and a failing install skips
# what needs the package. The last thing printed is the summary (step, status, seconds) and the benchmark's
# short table. Exit status 0 only if every step passed.
#
# Logs: $OUT when set, else benchmarks/results/gpu_check_<date>/. At most 8 files, no subfolder:
#   env.log build.log tests.log sanitizer.log bench.log (the variants table, the ncu profile and the sweep)
#   summary.txt gpu_<card>_float16.csv gpu_<card>_bfloat16.csv
# (the benchmark's .txt/.png stay in build-gpu/bench-results/; `bench.py --replot CSV` redraws them.)
#
# Environment:
#   GPU_CHECK_DRY=1       only print the steps (nothing is built, run or written)
#   GPU_CHECK_BUDGET_S    total time budget in seconds (default 470: the script ends within 8 minutes)
#   GPU_CHECK_VARIANTS_N  lengths of the variants step (default "2048 16384 131072")
#   GPU_CHECK_BUILD_DIR   build directory (default build-gpu; it is deleted first)
#   PYTHON                the interpreter (default: python3 on PATH)
#   CUDA_HOME             where nvcc and compute-sanitizer live if not on PATH (default /usr/local/cuda)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY="${GPU_CHECK_DRY:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
BUILD="${GPU_CHECK_BUILD_DIR:-build-gpu}"
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
JOBS="$(nproc)"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

# nvcc and compute-sanitizer from CUDA_HOME when they are not on PATH.
for d in "$CUDA_HOME/bin" "$CUDA_HOME/compute-sanitizer"; do
  [ -d "$d" ] && case ":$PATH:" in *":$d:"*) ;; *) PATH="$PATH:$d" ;; esac
done
export PATH
PY="${PYTHON:-$(command -v python3 || echo python3)}"
# The interpreter's own path (not a shim or a symlink's name): setup.py configures CMake with sys.executable,
# and the same value here keeps its configure from changing anything.
PY="$("$PY" -c 'import sys; print(sys.executable)' 2>/dev/null || echo "$PY")"
SANITIZER="$(command -v compute-sanitizer || true)"
NCU="$(command -v ncu || true)"
VARIANTS_N="${GPU_CHECK_VARIANTS_N:-2048 16384 131072}"
export MAX_JOBS="$JOBS" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1

if [ -n "${OUT:-}" ]; then
  LOGS="$OUT"
else
  LOGS="$ROOT/benchmarks/results/gpu_check_$(date +%Y%m%d-%H%M%S)"
fi
if [ "$DRY" = 1 ]; then
  LOGS=/dev/null/gpu-check-dry  # never written: every log line goes to /dev/null
else
  mkdir -p "$LOGS"
fi
log() {  # log file path for a name, /dev/null in dry mode
  if [ "$DRY" = 1 ]; then echo /dev/null; else echo "$LOGS/$1"; fi
}

# Kernels for this machine's GPU: 'native' needs CMake 3.24; older CMake gets nvidia-smi's compute capability.
ARCH=native
cmake_version="$(cmake --version 2>/dev/null | sed -n 's/^cmake version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
if [ -n "$cmake_version" ]; then
  read -r major minor <<<"$cmake_version"
  if [ "$major" -lt 3 ] || { [ "$major" -eq 3 ] && [ "$minor" -lt 24 ]; }; then
    cc="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
    [ -n "$cc" ] && ARCH="$cc"
  fi
fi
# CMAKE_CUDA_ARCHITECTURES is the CMake default; NYSTROM_CUDA_ARCHITECTURES the project's own setting.
CUDA_ARGS="-DWITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$ARCH -DNYSTROM_CUDA_ARCHITECTURES=$ARCH"

# ------------------------------------------------------------------------------------------------ steps

NAMES=()
STATUS=()
SECONDS_TAKEN=()
CURRENT=""
CURRENT_T0=0
TMPD="$(mktemp -d)"
trap 'rm -rf "$TMPD"' EXIT

record() {
  NAMES+=("$1")
  STATUS+=("$2")
  SECONDS_TAKEN+=("$3")
}

# step NAME LOG CAP_SECONDS COMMAND: runs COMMAND (a bash command line) under a time limit of
# min(CAP_SECONDS, what is left of the budget), output to the terminal and appended to LOG.
step() {
  local name="$1" logfile="$2" cap="$3" cmd="$4"
  local now left limit t0 rc status
  now=$(date +%s)
  left=$((DEADLINE - now))
  limit=$((cap < left ? cap : left))
  echo
  echo "== [$name] (limit ${limit}s) $cmd" | tee -a "$logfile"
  if [ "$DRY" = 1 ]; then
    record "$name" DRY 0
    return 0
  fi
  if [ "$limit" -lt 5 ]; then
    echo "== [$name] SKIPPED: the time budget (${BUDGET}s) is spent" | tee -a "$logfile"
    record "$name" "SKIP(time)" 0
    return 1
  fi
  CURRENT="$name"
  t0=$(date +%s)
  CURRENT_T0=$t0
  rm -f "$TMPD/rc" "$TMPD/pid"
  # timeout runs the step in a process group of its own (so that it can end all of it); its pid is kept so
  # that an interrupt of this script can end the step too, and the step runs in the background so that
  # `wait` lets the trap run at once.
  {
    timeout --kill-after=15 "$limit" bash -e -o pipefail -c "$cmd" </dev/null &
    echo $! >"$TMPD/pid"
    wait $!
    echo $? >"$TMPD/rc"
  } 2>&1 | tee -a "$logfile" &
  wait $!
  rc="$(cat "$TMPD/rc" 2>/dev/null || echo 1)"
  CURRENT=""
  case "$rc" in
    0) status=PASS ;;
    124 | 137) status="TIMEOUT" ;;
    *) status="FAIL($rc)" ;;
  esac
  echo "== [$name] $status in $(($(date +%s) - t0))s" | tee -a "$logfile"
  record "$name" "$status" $(($(date +%s) - t0))
  [ "$status" = PASS ]
}

skip() {  # skip NAME REASON
  echo "== [$1] SKIPPED: $2"
  record "$1" "SKIP($2)" 0
}

BENCH_OUT="$BUILD/bench-results"

summary() {
  local i failed=0
  for i in "${!STATUS[@]}"; do
    case "${STATUS[$i]}" in PASS | DRY) ;; *) failed=$((failed + 1)) ;; esac
  done
  {
    echo
    echo "== gpu_check summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START))s of ${BUDGET}s, logs: $LOGS)"
    printf '%-15s %-20s %8s\n' step status seconds
    for i in "${!NAMES[@]}"; do
      printf '%-15s %-20s %8s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECONDS_TAKEN[$i]}"
    done
    if [ "$failed" -eq 0 ]; then echo "all steps passed"; else echo "$failed step(s) did not pass"; fi
    echo
    if compgen -G "$BENCH_OUT/gpu_*_short.txt" >/dev/null; then
      cat "$BENCH_OUT"/gpu_*_short.txt
    else
      echo "(no benchmark table)"
    fi
  } | tee "$(log summary.txt)"
  [ "$failed" -eq 0 ]
}

# shellcheck disable=SC2317  # invoked by the trap
on_signal() {
  if [ -n "$CURRENT" ]; then
    # timeout passes the signal on to the whole step
    [ -f "$TMPD/pid" ] && kill -TERM "$(cat "$TMPD/pid")" 2>/dev/null
    sleep 1
    echo "== [$CURRENT] INTERRUPTED"
    record "$CURRENT" INTERRUPTED $(($(date +%s) - CURRENT_T0))
  fi
  summary
  exit 130
}
trap on_signal INT TERM

# --------------------------------------------------------------------------------------------- the run

step env "$(log env.log)" 60 "
  echo '-- nvidia-smi'; nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
  nvidia-smi || true
  echo '-- python, torch'; '$PY' --version
  '$PY' -c 'import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"-\")'
  '$PY' -m pytest --version
  echo '-- nvcc'; nvcc --version
  echo '-- cmake'; cmake --version | head -1
  echo '-- compute-sanitizer'; ${SANITIZER:-false} --version || echo 'compute-sanitizer not found (PATH, \$CUDA_HOME/bin)'
  echo '-- host'; echo \"nproc $JOBS\"; uname -a
  echo \"CUDA architectures: $ARCH\"
" || true

build_ok=0
install_ok=0
if step configure "$(log build.log)" 120 "
  rm -rf '$BUILD' && cmake -S . -B '$BUILD' -DPython3_EXECUTABLE='$PY' -DCMAKE_BUILD_TYPE=Release \
    -DNYSTROM_BUILD_TESTS=ON $CUDA_ARGS
"; then
  # CMAKE_BUILD_TYPE=Release as setup.py configures it: its configure in the same directory changes nothing.
  step build "$(log build.log)" 300 "cmake --build '$BUILD' -j$JOBS" && build_ok=1
fi

if [ "$build_ok" = 1 ] || [ "$DRY" = 1 ]; then
  step install "$(log build.log)" 150 "
    NYSTROM_BUILD_DIR='$BUILD' NYSTROM_CMAKE_ARGS='$CUDA_ARGS' '$PY' -m pip install --no-build-isolation --no-deps --no-index .
    cd tests && '$PY' -c 'import torch_nystrom, torch; print(\"installed:\", torch_nystrom.__file__)'
  " && install_ok=1
  if [ "$install_ok" = 1 ] || [ "$DRY" = 1 ]; then
    # First what the GPU run is for: the speed of every variant against the floors and the peers.
    # bfloat16 (float16 takes the same kernels); the SDPA peer up to n = 16384 (quadratic).
    step variants "$(log bench.log)" 150 "
      '$PY' benchmarks/bench.py --device cuda --variants fast one_stage no_tc_bwd no_tc aten_mm generic fp32 --n $VARIANTS_N \
        --dtype bfloat16 --repeats 5 --input-sets 2 --sdpa-max-n 16384 --max-seconds 140
    " || true
    if [ -n "$NCU" ] || [ "$DRY" = 1 ]; then
      # The op's kernels only (namespace nystrom::cuda::kern), one forward+backward after a warm-up;
      # with the shared-memory wavefronts and bank conflicts that the emulator's model predicts to be
      # conflict-free for the WMMA tiles (docs/DESIGN.md §7, padded tiles).
      step ncu "$(log bench.log)" 60 "
        '${NCU:-ncu}' --profile-from-start off --kernel-name-base demangled --kernel-name regex:nystrom \
          --section SpeedOfLight --section Occupancy --section LaunchStats \
          --metrics l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum \
          '$PY' benchmarks/bench.py --device cuda --profile-point 16384 --dtype bfloat16
      " || true
    else
      skip ncu "no ncu on PATH"
    fi
  fi
  step ctest "$(log tests.log)" 60 "cd '$BUILD' && ctest --output-on-failure -j$JOBS" || true
  if [ "$install_ok" = 1 ] || [ "$DRY" = 1 ]; then
    # From tests/: the installed package is imported, not the source tree.
    # pytest-xdist (when installed) spreads the suite over 4 processes sharing the GPU.
    XDIST=""
    "$PY" -c "import xdist" >/dev/null 2>&1 && XDIST="-n 4"
    # The tests written once for every device (tests/python/helpers.py: devices()).
    PER_DEVICE="python/test_ops.py python/test_gradients.py python/test_bad_inputs.py python/test_edge_cases.py \
      python/test_hardening.py python/test_module.py python/test_autocast.py"
    step pytest-cuda "$(log tests.log)" 180 "
      cd tests && NYSTROM_TEST_DEVICE=cuda '$PY' -m pytest $PER_DEVICE python/test_cuda.py -q -rs -p no:cacheprovider \
        -m 'not slow' --durations=15 $XDIST
    " || true
    step pytest-subset "$(log tests.log)" 60 "
      cd tests && NYSTROM_TEST_DEVICE=cpu '$PY' -m pytest $PER_DEVICE -q -rs -p no:cacheprovider -m 'not slow' \
        -k 'not random_shapes and not fuzz and not compile' $XDIST
    " || true
    # One device allocation per tensor, so that memcheck sees every tensor's bounds.
    if [ -n "$SANITIZER" ] || [ "$DRY" = 1 ]; then
      step memcheck "$(log sanitizer.log)" 60 "
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 '${SANITIZER:-compute-sanitizer}' --tool memcheck --error-exitcode 86 \
          --print-limit 20 '$PY' scripts/gpu_sanitizer_case.py --more
      " || true
      step racecheck "$(log sanitizer.log)" 60 "
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 '${SANITIZER:-compute-sanitizer}' --tool racecheck --error-exitcode 86 \
          --print-limit 20 '$PY' scripts/gpu_sanitizer_case.py
      " || true
    else
      skip memcheck "no compute-sanitizer"
      skip racecheck "no compute-sanitizer"
    fi
    # What is left of the budget, less a margin for the benchmark's start and its final tables.
    bench_s=$((DEADLINE - $(date +%s) - 30))
    [ "$bench_s" -gt 150 ] && bench_s=150
    [ "$DRY" = 1 ] && bench_s=150
    if [ "$bench_s" -ge 20 ]; then
      step bench "$(log bench.log)" $((bench_s + 25)) "
        rm -rf '$BENCH_OUT' && '$PY' benchmarks/bench.py --device cuda --max-seconds $bench_s --out '$BENCH_OUT'
      " || true
      if [ "$DRY" != 1 ]; then
        # the CSVs (two dtypes) next to the logs; 8 files in all
        copied=0
        for f in "$BENCH_OUT"/gpu_*.csv; do
          [ -f "$f" ] && [ "$copied" -lt 2 ] && cp "$f" "$LOGS/" && copied=$((copied + 1))
        done
      fi
    else
      skip bench "time"
    fi
  else
    for s in variants ncu pytest-cuda pytest-subset memcheck racecheck bench; do skip "$s" "install failed"; done
  fi
else
  for s in install variants ncu ctest pytest-cuda pytest-subset memcheck racecheck bench; do skip "$s" "build failed"; done
fi

trap - INT TERM
summary
exit $?
