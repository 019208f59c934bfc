"""Builds the operator library with CMake and ships it inside torch_nystrom.

Install with the target torch already present, without build isolation (an
isolated build would fetch another torch and build against it):

    pip install --no-build-isolation .

Environment: NYSTROM_BUILD_DIR (default build/), NYSTROM_CMAKE_ARGS (extra
arguments for the CMake configure step, e.g. "-DNYSTROM_BUILD_TESTS=ON"),
MAX_JOBS (parallel compile jobs).
"""
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        build_dir = os.path.abspath(os.environ.get("NYSTROM_BUILD_DIR", os.path.join(ROOT, "build")))
        os.makedirs(build_dir, exist_ok=True)
        configure = [
            "cmake", "-S", ROOT, "-B", build_dir,
            f"-DPython3_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ] + shlex.split(os.environ.get("NYSTROM_CMAKE_ARGS", ""))
        subprocess.check_call(configure)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "nystrom", "-j", jobs])
        target = os.path.join(os.path.abspath(self.build_lib), "torch_nystrom", "libnystrom.so")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.realpath(os.path.join(build_dir, "libnystrom.so")), target)
        if self.inplace:
            shutil.copyfile(target, os.path.join(ROOT, "python", "torch_nystrom", "libnystrom.so"))


version = {}
with open(os.path.join(ROOT, "python", "torch_nystrom", "_version.py")) as f:
    exec(f.read(), version)

setup(
    name="torch-nystrom",
    version=version["__version__"],
    description="Nyström self-attention as LibTorch operators: CPU kernels, autograd, TorchScript, C++ layer",
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[Extension("torch_nystrom.libnystrom", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    zip_safe=False,
)
