"""Builds the operator library with CMake and ships it inside torch_nystrom.

Install with the target torch already present, without build isolation (an
isolated build would fetch another torch and build against it):

    pip install --no-build-isolation .

Environment: NYSTROM_BUILD_DIR (default build/), NYSTROM_CMAKE_ARGS (extra
arguments for the CMake configure step, e.g. "-DNYSTROM_BUILD_TESTS=ON"),
MAX_JOBS (parallel compile jobs).
"""
import glob
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
        package = os.path.join(os.path.abspath(self.build_lib), "torch_nystrom")
        os.makedirs(package, exist_ok=True)
        built = [os.path.realpath(os.path.join(build_dir, "libnystrom.so"))]
        # torch_nystrom._C (pybind11, for python -m torch_nystrom.info), where CMake could build it.
        if subprocess.call(["cmake", "--build", build_dir, "--target", "nystrom_python", "-j", jobs]) == 0:
            built += glob.glob(os.path.join(build_dir, "_C.*.so"))
        for path in built:
            name = "libnystrom.so" if path == built[0] else os.path.basename(path)
            shutil.copyfile(path, os.path.join(package, name))
            if self.inplace:
                shutil.copyfile(path, os.path.join(ROOT, "python", "torch_nystrom", name))


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
