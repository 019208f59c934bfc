#!/usr/bin/env bash
# Builds the library (and the C++ tests) in build/, installs the Python package
# into the environment and the CMake package into build/install.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
mkdir -p build
cmake -S . -B build -DPython3_EXECUTABLE="$PY" -DNYSTROM_BUILD_TESTS=ON ${NYSTROM_CMAKE_ARGS:-} >build/configure.log 2>&1 \
  || { cat build/configure.log; exit 1; }
cmake --build build -j "$MAX_JOBS"
cmake --install build --prefix build/install >/dev/null
"$PY" -m pip install -q --no-build-isolation "$ROOT"
