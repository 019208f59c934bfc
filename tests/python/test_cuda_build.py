"""The CUDA kernels are in the installed library, for the architectures we ship (no GPU needed)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest
import torch

import torch_nystrom


def cuda_registered(op: str = "nystrom_attention_forward") -> bool:
    dump = torch._C._dispatch_dump(f"nystrom::{op}")
    return any(line.startswith("CUDA:") for line in dump.splitlines())


def cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    # pip's nvidia-cuda-cuobjdump (requirements-dev.txt) puts it under site-packages/nvidia/*/bin.
    import site

    for root in site.getsitepackages():
        hits = glob.glob(os.path.join(root, "nvidia", "*", "bin", "cuobjdump"))
        if hits:
            return hits[0]
    return None


needs_cuda_build = pytest.mark.skipif(
    not cuda_registered(), reason="library built without the CUDA backend (no nvcc or a CPU-only torch)"
)


@needs_cuda_build
def test_library_holds_sm80_and_sm90_code_and_ptx():
    """The default NYSTROM_CUDA_ARCHITECTURES (a build for 'native' holds only the local GPU's code)."""
    tool = cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
    lib = torch_nystrom.library_path()
    elf = subprocess.run([tool, "--list-elf", lib], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([tool, "--list-ptx", lib], capture_output=True, text=True, check=True).stdout
    assert ".sm_80.cubin" in elf, elf
    assert ".sm_90.cubin" in elf, elf
    assert ".sm_90.ptx" in ptx, ptx


@needs_cuda_build
def test_cuda_ops_registered_for_forward_and_backward():
    for op in ("nystrom_attention_forward", "nystrom_attention_backward"):
        assert cuda_registered(op), op


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message seen without a GPU")
@needs_cuda_build
def test_cuda_tensor_without_gpu_fails_cleanly():
    # No device: creating the tensor already fails in torch, never inside our kernels.
    with pytest.raises((RuntimeError, AssertionError)):
        q = torch.zeros(1, 1, 4, 4, device="cuda")
        torch_nystrom.nystrom_attention(q, q, q)
