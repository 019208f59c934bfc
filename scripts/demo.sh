#!/usr/bin/env bash
# The main job: build, install, then Nyström attention on the default workload
# (accuracy against exact attention, speed and memory). Arguments go to demo.py.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
"$ROOT/scripts/build.sh" >/dev/null
"$PY" "$ROOT/benchmarks/demo.py" "$@"
