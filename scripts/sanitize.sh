#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the C++ test suite.
#
# Builds the library and the GoogleTest suite, instrumented, in a separate
# build directory (build-asan/, so the ordinary build/ is untouched), then runs
# the suite. Any sanitizer finding aborts the test process, and the script
# exits non-zero. Only this project's code is instrumented: torch is the
# ordinary, uninstrumented wheel, so ASan sees every malloc/free and every
# access made by our code, but not accesses made inside torch's own kernels.
#
#   bash scripts/sanitize.sh                    # build + run the whole suite through ctest
#   bash scripts/sanitize.sh -R NystromPadding  # extra arguments go to ctest (here: a filter)
#
# Environment:
#   NYSTROM_SANITIZE_BUILD_TYPE  Debug (default: -O0 -g1) or RelWithDebInfo (-O1 -g1)
#   NYSTROM_SANITIZE_EMULATION=1 the emulated CUDA backend's C++ tests instead (the NystromCuda.* tests
#                                on libnystrom_emulated, and the emulator's own suites; ctest label "emu";
#                                scripts/test_emulated.sh runs this)
#   NYSTROM_SANITIZE_CTEST=0     run the test binary once (every test in one process, about 10 s)
#                                instead of ctest (one process per test, as scripts/test.sh does,
#                                about 65 s); extra arguments then go to the binary (--gtest_filter=...)
#
# Timings on 2 shared cores, torch 2.14.1: configure + build from scratch about 100 s, ctest about 65 s.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

BUILD_DIR="$ROOT/build-asan"
BUILD_TYPE="${NYSTROM_SANITIZE_BUILD_TYPE:-Debug}"
# -fsanitize=address,undefined   ASan (out-of-bounds, use-after-free, double free, ...) and UBSan
#                                (signed overflow, bad shifts, misaligned or null access, invalid
#                                enum/bool loads, out-of-bounds array indexing, dynamic type (vptr)
#                                checks, ...)
# -fno-sanitize-recover=undefined  UBSan aborts at the first finding instead of printing and going on
# -fno-omit-frame-pointer        usable stack traces
# -g1                            line tables only: symbolised traces at a fraction of the compile time
#                                of full debug info (torch's headers are huge)
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
case "$BUILD_TYPE" in
  Debug) OPT_FLAGS="-O0 -g1" ;;
  RelWithDebInfo) OPT_FLAGS="-O1 -g1" ;;
  *) echo "NYSTROM_SANITIZE_BUILD_TYPE must be Debug or RelWithDebInfo, got $BUILD_TYPE" >&2; exit 2 ;;
esac
GEN=()
if command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD_DIR/Makefile" ]; then
  GEN=(-G Ninja)
fi

EMULATION=OFF
TARGETS=(nystrom_cpp_tests)
LABEL=(-LE emu)
BINARY="$BUILD_DIR/tests/cpp/nystrom_cpp_tests"
BINARIES=("$BINARY")
if [ "${NYSTROM_SANITIZE_EMULATION:-0}" = "1" ]; then
  # Its own build directory, optimised by default (-O1: at -O0 the fiber
  # switches and the kernels' loops under ASan take minutes for three tests).
  BUILD_DIR="$ROOT/build-asan-emu"
  BUILD_TYPE="${NYSTROM_SANITIZE_BUILD_TYPE:-RelWithDebInfo}"
  if [ "$BUILD_TYPE" = Debug ]; then OPT_FLAGS="-O0 -g1"; else OPT_FLAGS="-O1 -g1"; fi
  EMULATION=ON
  TARGETS=(nystrom_cpp_tests_emulated emu_tests emu_real_kernels)
  LABEL=(-L emu)
  BINARY="$BUILD_DIR/tests/cpp/nystrom_cpp_tests_emulated"
  BINARIES=("$BINARY" "$BUILD_DIR/tests/emu/emu_tests" "$BUILD_DIR/tests/emu/emu_real_kernels")
fi

t0=$(date +%s)
echo "== configure $BUILD_DIR ($BUILD_TYPE, $SAN_FLAGS)"
mkdir -p "$BUILD_DIR"
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" \
  -DPython3_EXECUTABLE="$PY" \
  -DNYSTROM_BUILD_TESTS=ON \
  -DNYSTROM_BUILD_EMULATION="$EMULATION" \
  -DWITH_CUDA=OFF \
  -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
  -DCMAKE_CXX_FLAGS="$SAN_FLAGS" \
  -DCMAKE_CXX_FLAGS_DEBUG="$OPT_FLAGS" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="$OPT_FLAGS" \
  -DCMAKE_SHARED_LINKER_FLAGS="$SAN_FLAGS" \
  -DCMAKE_EXE_LINKER_FLAGS="$SAN_FLAGS" \
  >"$BUILD_DIR/configure.log" 2>&1 || { cat "$BUILD_DIR/configure.log"; exit 1; }

echo "== build (library + GoogleTest suite)"
cmake --build "$BUILD_DIR" --target "${TARGETS[@]}" -j "$MAX_JOBS"
t1=$(date +%s)

# Runtime options (every one of them on purpose):
# ASAN_OPTIONS
#   halt_on_error=1          stop at the first finding (the default for ASan; explicit so that a
#                            recover build cannot change it)
#   abort_on_error=0         exit with exitcode (below) rather than SIGABRT, so ctest/gtest report it
#   exitcode=86              a distinctive status for "sanitizer finding"
#   detect_leaks=1           LeakSanitizer at exit (the default on x86_64 Linux; explicit because it
#                            is the option most often turned off for torch: the suite runs clean
#                            with it, torch's process-wide singletons stay reachable and are not
#                            reported, so no suppression file is needed)
#   strict_string_checks=1   check the whole string passed to str*/mem* interceptors
#   detect_stack_use_after_return=1, check_initialization_order=1, strict_init_order=1
#                            the extra checks that are off by default and apply to our code
#                            (static registration of the ops runs from initialisers)
#   symbolize=1              file:line in the reports (llvm-symbolizer/addr2line from PATH)
# Not set, because this run does not need them: protect_shadow_gap=0 (only for CUDA drivers that map
# memory into the shadow gap; no CUDA context is created here), verify_asan_link_order=0 (only when
# libasan is not first in the link order, e.g. preloaded into python; the test executable links it
# first), alloc_dealloc_mismatch=0 (the suite triggers no new/delete/free mismatch inside torch).
# A canary (heap overflow, signed overflow, leak) built with the same flags and options ends with
# status 86 for each of the three.
export ASAN_OPTIONS="halt_on_error=1:abort_on_error=0:exitcode=86:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1:symbolize=1"
# The emulated backend runs every CUDA thread on a fiber stack of its own: ASan's fake stacks for
# use-after-return detection cost there 30x the run time (244 s instead of 8 s for the three
# NystromCuda tests), so that one check is off in its run (every other check stays).
if [ "$EMULATION" = ON ]; then
  ASAN_OPTIONS="${ASAN_OPTIONS/detect_stack_use_after_return=1/detect_stack_use_after_return=0}"
fi
# UBSAN_OPTIONS: halt at the first finding, with a stack trace, same exit status.
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=86"

status=0
if [ "${NYSTROM_SANITIZE_CTEST:-1}" = "1" ]; then
  echo "== run: ctest (one process per test) $*"
  ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$MAX_JOBS" "${LABEL[@]}" "$@" || status=$?
else
  for binary in "${BINARIES[@]}"; do
    echo "== run: $binary (every test, one process) $*"
    "$binary" --gtest_brief=1 "$@" || status=$?
  done
fi
t2=$(date +%s)
echo "== sanitize.sh: build $((t1 - t0)) s, run $((t2 - t1)) s, total $((t2 - t0)) s"
if [ "$status" -ne 0 ]; then
  # A sanitizer finding ends the test process with status 86 (ctest shows it as a failed test whose
  # output holds the ASan/UBSan report); any other failure is an ordinary test failure.
  echo "== sanitize.sh: FAILED (status $status): a sanitizer report (\"ERROR: AddressSanitizer\" or" \
       "\"runtime error:\") or a test failure is in the output above" >&2
  exit "$status"
fi
echo "== sanitize.sh: clean (ASan + UBSan, no finding)"
