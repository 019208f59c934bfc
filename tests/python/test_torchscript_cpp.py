"""TorchScript export: a model scripted and saved in Python runs where only the op
library is loaded.

(i)  A fresh Python process that never imports ``torch_nystrom`` (only
     ``torch.ops.load_library``) loads the saved model and gets the same output
     and input gradient as this process.
(ii) The C++ example (``examples/cpp``, path in the environment variable
     ``NYSTROM_CPP_EXAMPLE``) loads a saved container with the model and its
     inputs and checks the output with no Python at all.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

import torch_nystrom

# TorchScript is what this file tests; torch 2.9+ marks its entry points deprecated.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning"
)

EMBED_DIM, NUM_HEADS, NUM_LANDMARKS = 32, 4, 8
BATCH, LENGTH = 3, 50

# Runs in a fresh interpreter: torch and the shared library only.
FRESH_PROCESS = r"""
import sys
import torch

library, archive, inputs, result = sys.argv[1:5]
torch.ops.load_library(library)
model = torch.jit.load(archive)
data = torch.load(inputs)
x = data["x"].clone().requires_grad_(True)
out = model(x, data["mask"])
out.square().sum().backward()
with torch.no_grad():
    unmasked = model(data["x"])
assert "torch_nystrom" not in sys.modules, "the fresh process imported torch_nystrom"
torch.save({"out": out.detach(), "grad": x.grad, "unmasked": unmasked}, result)
"""

# Loading without the library must fail, naming the missing op.
FRESH_PROCESS_NO_LIBRARY = r"""
import sys
import torch

torch.jit.load(sys.argv[1])
"""


def _scripted_model(conv_kernel_size: Optional[int]):
    torch.manual_seed(0)
    eager = torch_nystrom.NystromAttention(
        EMBED_DIM, NUM_HEADS, num_landmarks=NUM_LANDMARKS, conv_kernel_size=conv_kernel_size
    )
    eager.eval()
    return eager, torch.jit.script(eager)


def _inputs(padded: bool):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, generator=gen)
    mask = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    if padded:
        mask[1, 41:] = True  # trailing padding
        mask[2, 7:] = True  # 7 real tokens: exact attention for this element
    return x, mask


def _fresh_env():
    env = dict(os.environ)
    # Nothing on the path may provide torch_nystrom by accident.
    env.pop("PYTHONPATH", None)
    return env


def _run_fresh(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=_fresh_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize("conv_kernel_size", [None, 3], ids=["plain", "conv3"])
def test_scripted_model_runs_in_fresh_process_with_only_the_library(tmp_path, conv_kernel_size):
    library = torch_nystrom.library_path()
    assert os.path.isfile(library), f"library_path() points at a missing file: {library}"

    eager, scripted = _scripted_model(conv_kernel_size)
    x, mask = _inputs(padded=True)

    # In-process reference: scripted output and input gradient.
    xg = x.clone().requires_grad_(True)
    out = scripted(xg, mask)
    out.square().sum().backward()
    with torch.no_grad():
        unmasked = scripted(x)
        torch.testing.assert_close(out.detach(), eager(x, key_padding_mask=mask), rtol=1e-5, atol=1e-6)

    archive = tmp_path / "model.pt"
    torch.jit.save(scripted, str(archive))
    inputs = tmp_path / "inputs.pt"
    torch.save({"x": x, "mask": mask}, str(inputs))
    result = tmp_path / "result.pt"

    proc = _run_fresh(FRESH_PROCESS, library, str(archive), str(inputs), str(result), cwd=tmp_path)
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stdout}\n{proc.stderr}"
    fresh = torch.load(str(result))
    torch.testing.assert_close(fresh["out"], out.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh["grad"], xg.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fresh["unmasked"], unmasked, rtol=1e-5, atol=1e-6)


def test_loading_without_the_library_names_the_missing_op(tmp_path):
    _, scripted = _scripted_model(None)
    archive = tmp_path / "model.pt"
    torch.jit.save(scripted, str(archive))
    proc = _run_fresh(FRESH_PROCESS_NO_LIBRARY, str(archive), cwd=tmp_path)
    assert proc.returncode != 0, "torch.jit.load succeeded without the op library"
    assert "nystrom" in proc.stderr, proc.stderr


class _Container(torch.nn.Module):
    """What the C++ example loads: the model and the data it checks."""

    def __init__(self, model, input, mask, expected):
        super().__init__()
        self.model = model
        self.input = input
        self.mask = mask
        self.expected = expected

    def forward(self) -> torch.Tensor:
        return self.model(self.input, self.mask)


def _example_binary() -> Path:
    path = os.environ.get("NYSTROM_CPP_EXAMPLE")
    if not path:
        pytest.skip(
            "NYSTROM_CPP_EXAMPLE is not set: build examples/cpp (see examples/cpp/README.md) and "
            "set NYSTROM_CPP_EXAMPLE to the nystrom_example binary to run this test"
        )
    binary = Path(path)
    assert binary.is_file(), f"NYSTROM_CPP_EXAMPLE={path} is set, but the file does not exist"
    assert os.access(binary, os.X_OK), f"NYSTROM_CPP_EXAMPLE={path} is not executable"
    return binary


@pytest.mark.parametrize(
    "conv_kernel_size, padded",
    [(None, True), (3, False)],
    ids=["plain-padded", "conv3-unpadded"],
)
def test_cpp_example_runs_scripted_model(tmp_path, conv_kernel_size, padded):
    binary = _example_binary()
    _, scripted = _scripted_model(conv_kernel_size)
    x, mask = _inputs(padded)
    with torch.no_grad():
        expected = scripted(x, mask)
    container = torch.jit.script(_Container(scripted, x, mask, expected))
    archive = tmp_path / "container.pt"
    torch.jit.save(container, str(archive))

    proc = subprocess.run(
        [str(binary), str(archive)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    output = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, f"{binary} exited with {proc.returncode}\n{output}"
    assert "max abs difference" in proc.stdout, output
