"""Properties of the built library that no numerical test can see."""

from __future__ import annotations

import pathlib
import re
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


ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_cmake_package_has_the_python_version():
    """One version: CMakeLists.txt reads python/torch_nystrom/_version.py (so does setup.py), so the installed
    CMake package (scripts/build.sh installs it into build/install) and the installed Python package agree."""
    files = sorted(ROOT.glob("build/install/lib*/cmake/TorchNystrom/TorchNystromConfigVersion.cmake"))
    if not files:
        pytest.skip(f"no installed CMake package under {ROOT / 'build' / 'install'} (scripts/build.sh installs it)")
    found = re.search(r'set\(PACKAGE_VERSION "([^"]+)"\)', files[0].read_text())
    assert found, f"{files[0]}: no PACKAGE_VERSION"
    assert found.group(1) == torch_nystrom.__version__, (files[0], found.group(1), torch_nystrom.__version__)


def test_cmake_lists_names_no_version_of_its_own():
    """project() takes the version parsed from _version.py, never a literal that could drift from it."""
    cmake_lists = ROOT / "CMakeLists.txt"
    if not cmake_lists.exists():
        pytest.skip(f"no source tree at {ROOT}")
    project = re.search(r"^project\(TorchNystrom[^)]*\)", cmake_lists.read_text(), re.M)
    assert project, "CMakeLists.txt: no project(TorchNystrom ...)"
    assert "VERSION ${NYSTROM_VERSION}" in project.group(0), project.group(0)
