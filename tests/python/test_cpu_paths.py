"""The CPU kernels' code paths agree with each other and with the float64 reference.

NYSTROM_CPU_SIMD (read once per process, so each path runs in its own subprocess) picks them:
unset = the best this CPU has (the fused AVX-512 or AVX2 tile kernels for float32, vectorised
exponentials), ``avx2`` = the AVX2 fused kernels even where AVX-512 exists, ``0`` = plain ATen calls
(what other CPUs and float64 run). The cases reach every branch of the fused kernels' callers: padding
(gathered rows), value widths and landmark counts that are not multiples of the vector width, inputs
whose rows are not contiguous, the most landmarks the fused kernels take (256) and one more (falls back),
cross-attention, and bfloat16 / float16 inputs (converted as the kernels read them, outputs and gradients
rounded once) with padding, odd widths and strided rows. Every path also runs each case twice in its
process: the results must be bitwise equal (reproducible per thread count and instruction set).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import torch_nystrom
import torch_nystrom.info
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
    "bf16_masked_odd": (3, 2, 301, 277, 24, 24, 19, "bfloat16", "contiguous", True),
    "bf16_odd_d_strided": (3, 1, 517, 389, 33, 17, 40, "bfloat16", "transposed", True),
    "fp16_strided": (1, 2, 517, 517, 40, 72, 100, "float16", "transposed", False),
    "fp16_cross_masked": (2, 1, 333, 1100, 32, 48, 33, "float16", "contiguous", True),
}

# float32: relative error (max-norm, helpers.rel_err) allowed between two paths and against the
# float64 reference. Half precision: every entry must be the float64 reference correctly rounded to
# the dtype (within half a unit in its last place), or two paths within one unit of each other, up to
# float32 arithmetic noise of HALF_SLACK times the largest entry.
TOLERANCE = {"float32": (3e-5, 1e-4)}
PRECISION_BITS = {"bfloat16": 8, "float16": 11}
HALF_SLACK = 2e-5


def ulp(x, dtype):
    """The spacing of `dtype` values at each entry of x (float64; float16 subnormals included)."""
    _, exponent = torch.frexp(x.abs())
    spacing = torch.ldexp(torch.ones_like(x), exponent - PRECISION_BITS[dtype])
    return spacing.clamp_min(2.0**-24 if dtype == "float16" else 0.0)


def assert_rounded(actual, expected, dtype, units, what):
    """|actual - expected| <= units * ulp(expected) + HALF_SLACK * max |expected|, entry by entry."""
    a, e = actual.double(), expected.double()
    excess = (a - e).abs() - units * ulp(e, dtype) - HALF_SLACK * e.abs().max()
    assert excess.max().item() <= 0, (what, "off by", excess.max().item(), "beyond the rounding of", dtype)

_SCRIPT = r"""
import sys, torch, torch_nystrom
sys.path.insert(0, sys.argv[2])
from test_cpu_paths import CASES, make_case
results = {}
def run(name):
    q, k, v, kpm, qpm, m = make_case(name)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = torch_nystrom.nystrom_attention(q, k, v, m, key_padding_mask=kpm, query_padding_mask=qpm)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]
for name in CASES:
    first, again = run(name), run(name)
    results[name] = first + [all(torch.equal(a, b) for a, b in zip(first, again))]
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
    # every path but "bf16" multiplies bfloat16 rows in float32; "bf16" on vdpbf16ps
    env["NYSTROM_CPU_BF16"] = "1" if flag == "bf16" else "0"
    if flag not in ("best", "bf16"):
        env["NYSTROM_CPU_SIMD"] = flag
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", _SCRIPT, str(path), here], check=True, env=env, cwd=str(tmp_path))
    return torch.load(path)


def _bf16_products_available():
    """Whether the library and this CPU have the vdpbf16ps kernels (from /proc/cpuinfo without _C)."""
    cpu = torch_nystrom.info.build_info().get("cpu")
    if cpu is not None:
        return bool(cpu.get("bf16_products_available"))
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


BF16_PRODUCTS = _bf16_products_available()


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_paths")
    flags = ("best", "avx2", "0") + (("bf16",) if BF16_PRODUCTS else ())
    return {flag: _run(flag, tmp) for flag in flags}


@pytest.mark.parametrize("name", list(CASES))
def test_paths_agree_and_match_float64(paths, name):
    q, k, v, kpm, qpm, m = make_case(name)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref = nystrom_reference(q, k, v, m, key_padding_mask=kpm, query_padding_mask=qpm)
    dtype = CASES[name][7]
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))  # as the script draws it
    ref.backward(grad.to(getattr(torch, dtype)).double())
    expected = [ref.detach(), q.grad, k.grad, v.grad]
    base = paths["0"][name]
    for flag in ("best", "avx2", "0"):
        got = paths[flag][name]
        assert got[4], (flag, "two runs in one process differ")
        for what, a, b, e in zip(("out", "dq", "dk", "dv"), got, base, expected):
            assert a.dtype == getattr(torch, dtype), (flag, what, a.dtype)
            assert torch.isfinite(a).all(), (flag, what)
            if dtype == "float32":
                agree, to_ref = TOLERANCE[dtype]
                assert rel_err(a.double(), b.double()) < agree, (flag, what, rel_err(a.double(), b.double()))
                assert rel_err(a.double(), e) < to_ref, (flag, what, rel_err(a.double(), e))
            else:
                assert_rounded(a, b, dtype, 1.0, (flag, what, "against path 0"))
                assert_rounded(a, e, dtype, 0.5, (flag, what, "against float64"))


@pytest.mark.skipif(not BF16_PRODUCTS, reason="this CPU or build has no AVX512-BF16 kernels")
@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][7] == "bfloat16"])
def test_bf16_products_path(paths, name):
    """NYSTROM_CPU_BF16=1: the forward's logits and its F·W, the backward's logits, G and the products of its
    scores X on vdpbf16ps, their float32 operands (landmarks, the query side's probabilities, W, dbv, X)
    rounded to bfloat16 (docs/DESIGN.md §5). Each such product then errs by at most 2^-8 of its sum of
    |terms|, which the softmax weights bound by the largest |value| averaged: every result must stay within
    half a unit of float64 plus 2^-7 of its largest entry, and its error (max norm) within 2.5x the float32
    path's (measured: output 1.1-2.0x, gradients 1.0-1.8x on these cases, AMD EPYC Zen 4)."""
    q, k, v, kpm, qpm, m = make_case(name)
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    ref = nystrom_reference(q, k, v, m, key_padding_mask=kpm, query_padding_mask=qpm)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    ref.backward(grad.to(torch.bfloat16).double())
    expected = [ref.detach(), q.grad, k.grad, v.grad]
    got, base = paths["bf16"][name], paths["0"][name]
    assert got[4], "two runs in one process differ"
    for what, a, b, e in zip(("out", "dq", "dk", "dv"), got, base, expected):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), what
        a, b = a.double(), b.double()
        excess = (a - e).abs() - 0.5 * ulp(e, "bfloat16") - 2.0**-7 * e.abs().max()
        assert excess.max().item() <= 0, (what, "off by", excess.max().item())
        assert rel_err(a, e) <= 2.5 * rel_err(b, e), (what, rel_err(a, e), rel_err(b, e))
