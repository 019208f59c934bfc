"""``python -m torch_nystrom.info``: the build facts come from the compiled library (torch_nystrom._C reading
nystrom_build_info), and follow what the process actually runs (the instruction set NYSTROM_CPU_SIMD chooses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

torch_nystrom = pytest.importorskip("torch_nystrom")


def run_info(*args, **env):
    e = {k: v for k, v in os.environ.items() if k not in env}
    e.update({k: v for k, v in env.items() if v is not None})
    res = subprocess.run([sys.executable, "-m", "torch_nystrom.info", *args], capture_output=True, text=True,
                         env=e, timeout=120, check=True)
    return res.stdout


def test_report_names_versions_cpu_and_backends():
    out = run_info()
    assert f"torch-nystrom {torch_nystrom.__version__}" in out
    assert f"runs with torch {torch.__version__}" in out
    assert "built against torch " + ".".join(torch.__version__.split("+")[0].split(".")[:3]) in out
    assert "CPU kernels built for:" in out and "chosen:" in out and "OpenMP" in out
    assert "CUDA backend:" in out and "GPUs visible:" in out


@pytest.mark.skipif(torch_nystrom.emulated(), reason="the emulated library has no CPU kernels")
def test_chosen_instruction_set_follows_the_environment():
    info = json.loads(run_info("--json"))
    cpu = info["built"]["cpu"]
    assert cpu["isa_chosen"] == cpu["isa_available"]
    forced = json.loads(run_info("--json", NYSTROM_CPU_SIMD="0"))
    assert forced["built"]["cpu"]["isa_chosen"] == "none" and forced["NYSTROM_CPU_SIMD"] == "0"
    if cpu["isa_available"] in ("avx2", "avx512"):
        assert json.loads(run_info("--json", NYSTROM_CPU_SIMD="avx2"))["built"]["cpu"]["isa_chosen"] == "avx2"


@pytest.mark.skipif(torch_nystrom.emulated(), reason="the emulated library has no CPU kernels")
def test_bfloat16_products_follow_the_environment():
    cpu = json.loads(run_info("--json"))["built"]["cpu"]
    assert not cpu["bf16_products"] or cpu["bf16_products_available"]
    on = json.loads(run_info("--json", NYSTROM_CPU_BF16="1"))["built"]["cpu"]
    assert on["bf16_products"] == cpu["bf16_products_available"]
    assert json.loads(run_info("--json", NYSTROM_CPU_BF16="0"))["built"]["cpu"]["bf16_products"] is False
    # they need the avx512 level
    assert json.loads(run_info("--json", NYSTROM_CPU_BF16="1", NYSTROM_CPU_SIMD="avx2"))["built"]["cpu"][
        "bf16_products"] is False
    assert "bfloat16 products on vdpbf16ps: " in run_info(NYSTROM_CPU_BF16="1")


def test_json_agrees_with_the_package():
    info = json.loads(run_info("--json"))
    assert info["built"]["version"] == torch_nystrom.__version__ == info["torch_nystrom"]
    assert info["library"] == torch_nystrom.library_path()
    assert info["emulated_cuda_backend"] == torch_nystrom.emulated()
    cuda = info["built"]["cuda"]
    if cuda is not None and not cuda["emulated"]:
        assert cuda["architectures"], "the CUDA architectures CMake built for (e.g. 80-real 90-real 90-virtual)"
