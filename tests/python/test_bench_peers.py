"""The benchmark's peers compute what they are said to (benchmarks/impls.py): the SDPA composition of the GPU
benchmark (two scaled_dot_product_attention calls and the m x m steps) is the op's own algorithm, forward and
backward, so a time ratio against it compares implementations of one function. On the CPU, float64: SDPA's
math kernel, the op's CPU backend (or the emulated CUDA backend when this process loaded it)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from helpers import make_qkv

torch_nystrom = pytest.importorskip("torch_nystrom")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
import impls  # noqa: E402


@pytest.mark.parametrize("n,s,m,iters", [(256, 256, 16, 6), (203, 331, 17, 6), (100, 90, 64, 3), (40, 30, 64, 6)],
                         ids=["even", "uneven_cross", "m64_short", "exact_path"])
def test_sdpa_composition_is_the_op(n, s, m, iters):
    """Output and gradients of impls.sdpa_composition equal the op's within float64 rounding amplified by
    Newton–Schulz (1e-9 relative to the largest entry)."""
    q, k, v = make_qkv(2, 3, n, s, 24, 19, dtype=torch.float64, seed=5)
    g = torch.randn(2, 3, n, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    results = []
    for fn in (impls.sdpa_composition, impls.ours):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, m, iters=iters)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, g)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-9, f"{name}: {err:.2e}"


def test_sdpa_composition_in_half_precision_is_close():
    """In bfloat16 (q̃ and W rounded as SDPA operands) it stays within bfloat16 rounding of the float64 op."""
    q, k, v = make_qkv(1, 2, 300, 300, 32, 32, dtype=torch.float64, seed=3)
    ref = impls.ours(q, k, v, 32)
    out = impls.sdpa_composition(q.bfloat16(), k.bfloat16(), v.bfloat16(), 32)
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 8 * torch.finfo(torch.bfloat16).eps, err


def test_bandwidth_floors_are_those_of_issue_13():
    """bench_gpu.py's floors: forward 8·n·d bytes per head, forward+backward 22·n·d, in half precision (D = Dv);
    the variant table prints them as multiples."""
    import bench_gpu

    q, k, v = make_qkv(2, 3, 100, 100, 16, dtype=torch.bfloat16, seed=1)
    fwd, fb = bench_gpu.floors(q, k, v, bandwidth=1.0)
    assert fwd == 2 * 3 * 8 * 100 * 16 and fb == 2 * 3 * 22 * 100 * 16
    rec = dict(impl="torch_nystrom", variant="fast", dtype="bfloat16", n=100, fwd_ms=2.0, fwd_bwd_ms=5.0,
               fwd_floor_x=1.5, fb_floor_x=2.5, bandwidth_gbs=4000.0)
    peer = dict(rec, impl="exact_sdpa", fwd_ms=3.0, fwd_bwd_ms=15.0)
    table = bench_gpu.variant_table([rec, peer]).splitlines()
    assert table[1].split() == ["fast", "bfloat16", "100", "2.000", "1.50", "5.000", "2.50", "1.50", "3.00", "-", "-"]
