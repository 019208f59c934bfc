"""The CPU kernels' code paths agree with each other and with the float64 reference.

NYSTROM_CPU_SIMD (read once per process, so each path runs in its own subprocess) picks them:
unset = the best this CPU has (the fused AVX-512 or AVX2 tile kernels for float32, vectorised
exponentials), ``avx2`` = the AVX2 fused kernels even where AVX-512 exists, ``0`` = plain ATen calls
(what other CPUs and float64 run). The cases reach every branch of the fused kernels' callers: padding
(gathered rows), value widths and landmark counts that are not multiples of the vector width, inputs
whose rows are not contiguous, the most landmarks the fused kernels take (256) and one more (falls back),
cross-attention, and bfloat16 inputs (converted tile by tile).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torch_nystrom  # noqa: F401
from helpers import rel_err
from reference import nystrom_reference

# name: (B, H, L, S, D, Dv, m, dtype, layout, masked)
CASES = {
    "masked_odd": (3, 2, 301, 277, 24, 24, 19, "float32", "contiguous", True),
    "d64_m64": (2, 2, 1000, 1000, 64, 64, 64, "float32", "contiguous", False),
    "strided_m100": (1, 2, 517, 517, 40, 72, 100, "float32", "transposed", False),
    "m256": (1, 1, 700, 700, 16, 16, 256, "float32", "contiguous", False),
    "m257": (1, 1, 700, 700, 16, 16, 257, "float32", "contiguous", False),
    "cross": (2, 1, 333, 1100, 32, 48, 33, "float32", "contiguous", True),
    "bf16": (1, 2, 300, 300, 64, 64, 32, "bfloat16", "contiguous", False),
}

_SCRIPT = r"""
import sys, torch, torch_nystrom
sys.path.insert(0, sys.argv[2])
from test_cpu_paths import CASES, make_case
results = {}
for name in CASES:
    q, k, v, kpm, qpm, m = make_case(name)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = torch_nystrom.nystrom_attention(q, k, v, m, key_padding_mask=kpm, query_padding_mask=qpm)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype))
    results[name] = [out.detach(), q.grad, k.grad, v.grad]
torch.save(results, sys.argv[1])
"""


def make_case(name):
    B, H, L, S, D, Dv, m, dtype, layout, masked = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    shapes = ((B, H, L, D), (B, H, S, D), (B, H, S, Dv))
    if layout == "transposed":  # rows with a column stride != 1
        q, k, v = (torch.randn(*s[:2], s[3], s[2], generator=g).transpose(-1, -2) for s in shapes)
    else:
        q, k, v = (torch.randn(*s, generator=g) for s in shapes)
    q, k, v = (t.to(getattr(torch, dtype)) for t in (q, k, v))
    kpm = qpm = None
    if masked:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[-1, S // 7 : S // 3] = True
        kpm[0, S - 5 :] = True
        qpm = torch.zeros(B, L, dtype=torch.bool)
        qpm[0, L - 11 :] = True
        if B > 2:
            kpm[1, 5:] = True  # an element on the exact path
    return q, k, v, kpm, qpm, m


def _run(flag, tmp_path):
    path = tmp_path / f"r_{flag}.pt"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("NYSTROM_CPU_SIMD", None)
    if flag != "best":
        env["NYSTROM_CPU_SIMD"] = flag
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _SCRIPT, str(path), here], check=True, env=env, cwd=str(tmp_path))
    return torch.load(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_paths")
    return {flag: _run(flag, tmp) for flag in ("best", "avx2", "0")}


@pytest.mark.parametrize("name", list(CASES))
def test_paths_agree_and_match_float64(paths, name):
    q, k, v, kpm, qpm, m = make_case(name)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref = nystrom_reference(q, k, v, m, key_padding_mask=kpm, query_padding_mask=qpm)
    low = CASES[name][7] == "bfloat16"
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))  # as the script draws it
    ref.backward(grad.to(torch.bfloat16 if low else torch.float32).double())
    expected = [ref.detach(), q.grad, k.grad, v.grad]
    agree, to_ref = (3e-2, 3e-2) if low else (3e-5, 1e-4)
    base = paths["0"][name]
    for flag in ("best", "avx2", "0"):
        got = paths[flag][name]
        for what, a, b, e in zip(("out", "dq", "dk", "dv"), got, base, expected):
            assert torch.isfinite(a).all(), (flag, what)
            assert rel_err(a.double(), b.double()) < agree, (flag, what, rel_err(a.double(), b.double()))
            assert rel_err(a.double(), e) < to_ref, (flag, what, rel_err(a.double(), e))
