#!/usr/bin/env bash
# The CUDA backend on the CPU, under the emulation of the CUDA execution model
# (cuda/emu/; docs/DESIGN.md §11): the real glue (csrc/cuda/) and kernels
# (cuda/) built with the host compiler into build/libnystrom_emulated.so,
# serving CPU tensors. Extra arguments go to pytest.
#
#   1. build: the CPU library and package (scripts/build.sh), then the
#      emulated library and its C++ tests in build/ (-DNYSTROM_BUILD_EMULATION=ON)
#   2. C++: the emulator's own suites and the NystromCuda.* tests on the
#      emulated backend (ctest -L emu), then the same under ASan + UBSan
#      (scripts/sanitize.sh with NYSTROM_SANITIZE_EMULATION=1)
#   3. Python: the per-device suite on the device "emu", once per schedule of
#      the threads of a block between barriers: inorder, reversed, random:SEED
#      (shared memory and kernel outputs start poisoned with NaN: a race or a
#      read of unwritten memory shows as a failure under some schedule)
#   4. coverage: every kernel template of cuda/ was launched
#
# Environment: NYSTROM_EMU_SCHEDULES (default "inorder reversed random:1"),
# NYSTROM_EMU_ARCH (target profile, default sm90), NYSTROM_EMU_SANITIZE=0
# (skip step 2's ASan build), and those of scripts/env.sh.
# What it proves and what not: README.md, "The CUDA backend on the CPU".
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
t0=$(date +%s)
"$ROOT/scripts/build.sh"
echo "== build the emulated CUDA backend"
cmake -S . -B build -DNYSTROM_BUILD_EMULATION=ON -DNYSTROM_BUILD_TESTS=ON >build/configure-emu.log 2>&1 \
  || { cat build/configure-emu.log; exit 1; }
cmake --build build -j "$MAX_JOBS" --target nystrom_emulated nystrom_cpp_tests_emulated emu_tests emu_real_kernels
t1=$(date +%s)

echo "== C++ tests on the emulated backend (ctest -L emu)"
ctest --test-dir build --output-on-failure -j "$MAX_JOBS" -L emu
if [ "${NYSTROM_EMU_SANITIZE:-1}" = "1" ]; then
  echo "== the same under AddressSanitizer + UndefinedBehaviorSanitizer"
  NYSTROM_SANITIZE_EMULATION=1 NYSTROM_SANITIZE_CTEST=0 bash "$ROOT/scripts/sanitize.sh"
fi
t2=$(date +%s)

LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
export NYSTROM_LIBRARY="$ROOT/build/libnystrom_emulated.so" NYSTROM_TEST_DEVICE=emu NYSTROM_EMU_KERNEL_LOG="$LOG"
cd "$ROOT/tests"   # import the installed package, not the source tree
for schedule in ${NYSTROM_EMU_SCHEDULES:-inorder reversed random:1}; do
  echo "== Python tests on the emulated backend, schedule $schedule"
  NYSTROM_EMU_SCHEDULE="$schedule" "$PY" -m pytest "$ROOT/tests/python" -q -m "not slow" -p no:cacheprovider "$@"
done
t3=$(date +%s)

echo "== kernels reached"
"$PY" - "$ROOT/build/libnystrom_emulated.so" "$LOG" <<'PYEOF'
import re, subprocess, sys
lib, log = sys.argv[1], sys.argv[2]
symbols = subprocess.run(["nm", "-DC", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
def template(name):
    m = re.search(r"nystrom::cuda::kern::(\w+_kernel)<", name)
    return m.group(1) if m else None
built = {}
for line in symbols.splitlines():
    m = re.search(r"(nystrom::cuda::kern::\w+_kernel<.*>)\(", line)
    if m:
        built.setdefault(template(m.group(1)), set()).add(m.group(1))
reached = {}
for line in open(log):
    name, _, count = line.strip().rpartition("=")
    if name and template(name) and int(count) > 0:
        reached.setdefault(template(name), set()).add(name)
missing = []
for t in sorted(built):
    n = len(reached.get(t, set()) & built[t]) or len(reached.get(t, set()))
    print(f"  {t:26s} {n:3d} of {len(built[t]):3d} instantiations launched")
    if t not in reached:
        missing.append(t)
if missing:
    sys.exit("test_emulated.sh: no emulated test launched " + ", ".join(missing))
PYEOF
echo "== test_emulated.sh: build $((t1 - t0)) s, C++ $((t2 - t1)) s, Python $((t3 - t2)) s"
