#!/usr/bin/env bash
# The mutation record of the emulated CUDA suite: scripts/emulation_mutants.py
# (seeded kernel defects, one at a time, in a scratch copy; each must fail the
# emulated suite). Writes benchmarks/results/emulation_mutants.txt. Arguments
# go to the script.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
"$ROOT/scripts/build.sh" >/dev/null
exec "$PY" "$ROOT/scripts/emulation_mutants.py" --python "$PY" "$@"
