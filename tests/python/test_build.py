"""Properties of the built library that no numerical test can see."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import torch_nystrom


def test_parallel_loops_are_compiled_with_openmp():
    """at::parallel_for is a header template that runs its loop on the calling thread unless the
    including code is compiled with OpenMP (torch's CMake package does not pass the flag on). Every
    CPU kernel parallelises through it, so the library must call into the OpenMP runtime."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    symbols = subprocess.run([nm, "-D", "--undefined-only", torch_nystrom.library_path()], check=True,
                             capture_output=True, text=True).stdout
    assert "GOMP_parallel" in symbols, "libnystrom.so was built without OpenMP: its CPU kernels run on one thread"
