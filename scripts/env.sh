# Sourced by the other scripts: a virtual environment outside the clone with
# the pinned torch and the test dependencies, created on first use.
#   NYSTROM_VENV   where it lives (default ~/.venvs/torch-nystrom)
#   NYSTROM_TORCH  the torch requirement (default torch==2.14.1)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NYSTROM_VENV="${NYSTROM_VENV:-$HOME/.venvs/torch-nystrom}"
NYSTROM_TORCH="${NYSTROM_TORCH:-torch==2.14.1}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

if [ ! -x "$NYSTROM_VENV/bin/python" ]; then
  echo "== creating $NYSTROM_VENV"
  python3 -m venv "$NYSTROM_VENV"
  "$NYSTROM_VENV/bin/pip" install -q --upgrade pip
fi
PY="$NYSTROM_VENV/bin/python"
export PATH="$NYSTROM_VENV/bin:$PATH"

want_torch="${NYSTROM_TORCH#torch==}"
have_torch="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have_torch" != "$want_torch" ]; then
  echo "== installing $NYSTROM_TORCH (first time: a few GB)"
  "$PY" -m pip install -q "$NYSTROM_TORCH"
fi
"$PY" -m pip install -q -r "$ROOT/requirements-dev.txt"

# nvcc and torch must agree on the CUDA major version for the CUDA build.
if command -v nvcc >/dev/null 2>&1; then
  nvcc_major="$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')"
  torch_cuda="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
  if [ -n "$torch_cuda" ] && [ "${torch_cuda%%.*}" != "$nvcc_major" ]; then
    echo "warning: nvcc is CUDA $nvcc_major but torch was built with CUDA $torch_cuda" >&2
  fi
fi
