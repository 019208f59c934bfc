#!/usr/bin/env bash
# Everything: builds, then the C++ tests (CTest, then once more built with
# ASan+UBSan), the C++ example against the installed CMake package, and the
# Python tests (which also run that example on
# a TorchScript model and an AOTInductor .pt2 package saved from Python). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
"$ROOT/scripts/build.sh"

echo "== C++ tests (ctest)"
ctest --test-dir build --output-on-failure -j "$MAX_JOBS" -LE emu  # the emulated backend: scripts/test_emulated.sh

echo "== C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer"
NYSTROM_SANITIZE_CTEST=0 bash "$ROOT/scripts/sanitize.sh"

echo "== C++ example against the installed package"
torch_prefix="$("$PY" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "share", "cmake"))')"
cmake -S examples/cpp -B build/example -DCMAKE_PREFIX_PATH="$ROOT/build/install;$torch_prefix" >build/example-configure.log 2>&1 \
  || { cat build/example-configure.log; exit 1; }
cmake --build build/example -j "$MAX_JOBS"
export NYSTROM_CPP_EXAMPLE="$ROOT/build/example/nystrom_example"

echo "== Python tests"
cd "$ROOT/tests"   # import the installed package, not the source tree
"$PY" -m pytest "$ROOT/tests/python" -q -m "not slow" -p no:cacheprovider "$@"
