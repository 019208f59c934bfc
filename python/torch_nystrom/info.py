"""What this installation of torch-nystrom is, for bug reports (as ``python -m torch.utils.collect_env`` is for
PyTorch)::

    python -m torch_nystrom.info          # a report
    python -m torch_nystrom.info --json   # the same as JSON

It prints the library's version and file, the torch and CUDA versions the library was built against and the
ones this process runs with, the CPU, the instruction sets the CPU kernels were built for, the best one this CPU
runs and the one chosen (``NYSTROM_CPU_SIMD``), OpenMP and its thread count, the CUDA architectures in the
binary, and whether the loaded library is the emulated CUDA backend (``NYSTROM_LIBRARY``). The build facts
come from the compiled library itself, read through ``torch_nystrom._C`` (pybind11).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Dict

import torch

import torch_nystrom


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for reports and benchmark headers."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_info() -> Dict[str, Any]:
    """The loaded operator library's own description (csrc/build_info.h), as a dict."""
    try:
        from torch_nystrom import _C
    except ImportError as e:  # a build without Python development headers or pybind11
        return {"error": f"torch_nystrom._C is not available ({e})"}
    return json.loads(_C.build_info(torch_nystrom.library_path()))


def collect() -> Dict[str, Any]:
    """Everything the report prints, as a dict."""
    built = build_info()
    cuda_runtime = None
    if torch.cuda.is_available():
        cuda_runtime = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "torch_nystrom": torch_nystrom.__version__,
        "library": torch_nystrom.library_path(),
        "emulated_cuda_backend": torch_nystrom.emulated(),
        "built": built,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpus": cuda_runtime,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "NYSTROM_CPU_SIMD": os.environ.get("NYSTROM_CPU_SIMD"),
        "NYSTROM_CPU_BF16": os.environ.get("NYSTROM_CPU_BF16"),
        "NYSTROM_LIBRARY": os.environ.get("NYSTROM_LIBRARY"),
    }


def report(info: Dict[str, Any]) -> str:
    built = info["built"]
    lines = [f"torch-nystrom {info['torch_nystrom']}  ({info['library']})"]
    if "error" in built:
        lines.append(f"  build facts: {built['error']}")
    else:
        lines.append(f"  built against torch {built['torch_built']} ({built.get('compiler', '?')}, "
                     f"_GLIBCXX_USE_CXX11_ABI={built.get('cxx11_abi', '?')}); library version {built['version']}")
    lines.append(f"  runs with torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), "
                 f"Python {info['python']}, {info['platform']}")
    lines.append(f"CPU: {info['cpu']}, {info['cpu_threads']} intra-op threads")
    cpu = built.get("cpu")
    if cpu:
        omp = f"OpenMP {cpu['openmp']}" if cpu.get("openmp") else "no OpenMP (the CPU kernels run on one thread)"
        lines.append(f"  CPU kernels built for: {', '.join(cpu['isa_built']) or 'no vector instruction set'}; "
                     f"best on this CPU: {cpu['isa_available']}; chosen: {cpu['isa_chosen']} "
                     f"(NYSTROM_CPU_SIMD={info['NYSTROM_CPU_SIMD'] or 'unset'}); {omp}")
        if "bf16_products" in cpu:
            has = "have" if cpu["bf16_products_available"] else "do not have"
            use = "on" if cpu["bf16_products"] else "off"
            lines.append(f"  bfloat16 products on vdpbf16ps: {use} (this CPU and build {has} them; "
                         f"NYSTROM_CPU_BF16={info['NYSTROM_CPU_BF16'] or 'unset'})")
    elif "error" not in built:
        lines.append("  no CPU kernels in this library")
    cuda = built.get("cuda")
    if cuda and cuda.get("emulated"):
        lines.append(f"CUDA backend: EMULATED on the CPU ({cuda['architectures']}; CUDA headers "
                     f"{cuda['cuda_headers']}), loaded from NYSTROM_LIBRARY: for tests, not for use")
    elif cuda:
        lines.append(f"CUDA backend: built with CUDA runtime {cuda['cuda_built']} for architectures "
                     f"{cuda['architectures'] or '?'}")
    elif "error" not in built:
        lines.append("CUDA backend: not built")
    lines.append(f"  GPUs visible: {', '.join(info['gpus']) if info['gpus'] else 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch_nystrom.info", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of the report")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
