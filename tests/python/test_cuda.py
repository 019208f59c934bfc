"""What only the CUDA backend has: agreement with the CPU backend, its Newton–Schulz size limits, the tensor-core
forward (NYSTROM_CUDA_TENSOR_CORES on / off), streams, a second device, the peak device memory of a long
sequence.

Runs on the test devices that run the CUDA backend (helpers.Device.cuda_backend: "cuda"), skipped, saying so,
when there is none. The behaviour every device shares (the case table, gradients, bad inputs, the nn layer,
autocast, torch.compile, ...) is tested once for all devices in test_ops.py, test_gradients.py,
test_bad_inputs.py, test_edge_cases.py, test_hardening.py, test_module.py and test_autocast.py;
``NYSTROM_TEST_DEVICE=cuda`` runs them on the GPU only (and makes a missing GPU an error, not a skip).

References run on the CPU from the very same input values (inputs are drawn on the CPU, rounded to the test
dtype there, then copied to the device).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cases import CASE
from helpers import (Case, assert_rel_close, check_low_precision, cotangent, expected_gradients, expected_output,
                     float32_tolerance, middle, on_cpu_backend, reference, rel_err, to_device, trailing,
                     trailing_mask)
from reference import nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention


# ---------------------------------------------------------------------------------------------
# Against the CPU backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", ["d7_m17_random_masks", "d64_m64_cross", "d96_m100_middle_original",
                                     "d128_m128_random_key", "d256_m200", "long_tiles"])
def test_matches_cpu_backend_float32(case_id, cuda_device):
    q, k, v, kw = CASE[case_id].build(torch.float32, cuda_device, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, torch.float32, cuda_device)
    grads = torch.autograd.grad(out, (q, k, v), g)
    out_cpu, grads_cpu = on_cpu_backend("helpers", "attention_and_gradients", q.detach().cpu(), k.detach().cpu(),
                                        v.detach().cpu(), to_device(kw, "cpu"), g.cpu())
    # Both run float32 math in different orders: allow twice the float32-vs-float64 error of the reference.
    ref64, ref_grads = reference(q, k, v, kw, grad_out=g)
    ref32, ref32_grads = reference(q, k, v, kw, grad_out=g, compute_dtype=torch.float32)
    assert_rel_close(out.detach().cpu(), out_cpu.detach(), 2 * float32_tolerance(1e-5, ref32, ref64), "output")
    for i, (name, a, c) in enumerate(zip(("dq", "dk", "dv"), grads, grads_cpu)):
        assert_rel_close(a.cpu(), c, 2 * float32_tolerance(1e-4, ref32_grads[i], ref_grads[i]), name)


def layer_results(state, conv, x, mask, device="cpu"):
    """Output, input gradient and parameter gradients of the layer with `state` at x (a unit of work for
    on_cpu_backend; all on the CPU unless `device`)."""
    layer = torch_nystrom.NystromAttention(96, 4, 17, pinv_init="original", conv_kernel_size=conv)
    layer.load_state_dict(state)
    layer.to(device)
    xi = x.to(device).requires_grad_(True)
    y = layer(xi, key_padding_mask=mask.to(device))
    w = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
    (y * w).sum().backward()
    return y.detach().cpu(), xi.grad.cpu(), {n: p.grad.cpu() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("conv", [None, 5])
def test_module_forward_backward_matches_cpu(conv, cuda_device):
    torch.manual_seed(1234)
    state = torch_nystrom.NystromAttention(96, 4, 17, pinv_init="original", conv_kernel_size=conv).state_dict()
    x = torch.randn(3, 203, 96, generator=torch.Generator().manual_seed(2))
    mask = trailing_mask(3, 203, [203, 150, 70])
    y_c, dx_c, g_c = on_cpu_backend("test_cuda", "layer_results", state, conv, x, mask)
    y_d, dx_d, g_d = layer_results(state, conv, x, mask, cuda_device.torch)
    assert_rel_close(y_d, y_c, 1e-4, "output")
    assert_rel_close(dx_d, dx_c, 1e-4, "input gradient")
    # k_proj.bias' gradient is zero up to rounding (it shifts whole softmax rows): compare to the largest
    scale = max(g.abs().max().item() for g in g_c.values())
    for name in g_c:
        err = (g_d[name] - g_c[name]).abs().max().item() / scale
        assert err <= 1e-4, f"gradient of {name}: {err:.3e}"


# ---------------------------------------------------------------------------------------------
# The Newton–Schulz paths: fused shared-memory kernel for m <= 64 (m <= 128 in float32), cuBLAS batched above
# ---------------------------------------------------------------------------------------------

NS_LIMITS = [(torch.float64, 64), (torch.float32, 128), (torch.float16, 64), (torch.bfloat16, 64)]


@pytest.mark.parametrize("side", ["at", "above"])
@pytest.mark.parametrize("dtype,limit", NS_LIMITS, ids=[str(d).split(".")[1] for d, _ in NS_LIMITS])
def test_newton_schulz_on_both_sides_of_the_fused_limit(dtype, limit, side, cuda_device):
    """m at the largest landmark count of the fused kernel and one above it (cuBLAS batched); forward and
    gradients against the float64 reference."""
    m = limit + (side == "above")
    case = Case(f"ns_{side}", B=2, H=2, L=m + 37, S=m + 21, D=24, Dv=9, m=m, key_mask=trailing(m + 21, m - 5),
                extra={"pinv_init": "original"})
    q, k, v, kw = case.build(dtype, cuda_device, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, dtype, cuda_device)
    grads = torch.autograd.grad(out, (q, k, v), g)
    if dtype in (torch.float16, torch.bfloat16):
        ref, ref_grads = reference(q, k, v, kw, grad_out=g)
        plain, plain_grads = reference(q, k, v, kw, grad_out=g, compute_dtype=dtype)
        check_low_precision(out, ref, plain, dtype, cuda_device)
        for name, a, e, p in zip(("dq", "dk", "dv"), grads, ref_grads, plain_grads):
            check_low_precision(a, e, p, dtype, cuda_device, name, grad=True)
        return
    ref, tol = expected_output(q, k, v, kw, dtype)
    assert_rel_close(out, ref, tol)
    ref_grads, tols = expected_gradients(q, k, v, kw, g, dtype)
    for name, a, e, t in zip(("dq", "dk", "dv"), grads, ref_grads, tols):
        assert_rel_close(a, e, t, name)


# ---------------------------------------------------------------------------------------------
# The tensor-core forward of half-precision inputs, against the generic kernels
# ---------------------------------------------------------------------------------------------

_TC_SCRIPT = r"""
import sys, torch, torch_nystrom
g = torch.Generator().manual_seed(7)
q, k, v = (torch.randn(2, 3, n, 64, generator=g).to(torch.float16).to(sys.argv[2]) for n in (333, 290, 290))
kpm = torch.zeros(2, 290, dtype=torch.bool); kpm[1, 100:] = True
out = torch_nystrom.nystrom_attention(q, k, v, 64, key_padding_mask=kpm.to(sys.argv[2]))
torch.save(out.cpu(), sys.argv[1])
"""


def test_tensor_core_forward_agrees_with_generic_kernels(tmp_path, cuda_device):
    """The same call with the tensor-core kernels on (default) and off (environment, read once per process)."""
    outs = []
    for flag in ("1", "0"):
        path = tmp_path / f"out_{flag}.pt"
        env = dict(os.environ, NYSTROM_CUDA_TENSOR_CORES=flag)
        subprocess.run([sys.executable, "-c", _TC_SCRIPT, str(path), cuda_device.type], check=True, env=env,
                       cwd=str(tmp_path))
        outs.append(torch.load(path).double())
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g).to(torch.float16) for n in (333, 290, 290))
    kpm = torch.zeros(2, 290, dtype=torch.bool)
    kpm[1, 100:] = True
    ref = nystrom_reference(q.double(), k.double(), v.double(), 64, key_padding_mask=kpm)
    tc_err, generic_err = rel_err(outs[0], ref), rel_err(outs[1], ref)
    assert generic_err < 5e-3, generic_err
    assert tc_err < 5e-3, tc_err
    assert rel_err(outs[0], outs[1]) < 5e-3


# ---------------------------------------------------------------------------------------------
# Streams, a second device
# ---------------------------------------------------------------------------------------------


def _stream_work(seed, m, device):
    return Case("stream", B=2, H=4, L=1000, S=1200, D=64, Dv=64, m=m,
                key_mask=middle((100, 300), (0, 0))).build(torch.float32, device, seed=seed)


def _fwd_bwd(q, k, v, kw, g):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = nystrom_attention(*leaves, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


def _assert_same(a, b, what):
    # The same call on another stream must give the same numbers (a tolerance of float32 rounding only).
    for name, x, y in zip(("output", "dq", "dk", "dv"), a, b):
        assert_rel_close(x, y, 1e-6, f"{what}: {name}")


def _needs_streams(device):
    if not device.streams:
        pytest.skip(f"{device} has no CUDA streams")


@pytest.mark.parametrize("m", [64, 129])
def test_non_default_stream(m, cuda_device):
    """The op runs on the current stream: inputs made on a side stream right before the call (behind a busy
    wait, so that work issued on another stream would read them too early) give the default-stream results."""
    _needs_streams(cuda_device)
    q, k, v, kw = _stream_work(0, m, cuda_device)
    g = cotangent((2, 4, 1000, 64), torch.float32, cuda_device)
    expected = _fwd_bwd(q, k, v, kw, g)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time on this stream
        q2, k2, v2, g2 = (t * 1 for t in (q, k, v, g))  # produced on the side stream
        got = _fwd_bwd(q2, k2, v2, kw, g2)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_same(expected, got, "side stream")


def test_concurrent_streams(cuda_device):
    """Several problems in flight on different streams at once equal the same problems run one by one."""
    _needs_streams(cuda_device)
    works = [_stream_work(seed, m, cuda_device) for seed, m in ((1, 17), (2, 64), (3, 100), (4, 200))]
    grads = [cotangent((2, 4, 1000, 64), torch.float32, cuda_device, seed) for seed in range(len(works))]
    expected = [_fwd_bwd(*w, g) for w, g in zip(works, grads)]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream() for _ in works]
    results = []
    for s, w, g in zip(streams, works, grads):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            results.append(_fwd_bwd(*w, g))
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(expected, results)):
        _assert_same(a, b, f"stream {i}")


def test_tensor_on_another_cuda_device(cuda_device):
    if cuda_device.count() < 2:
        pytest.skip(f"needs two {cuda_device} devices, the host has {cuda_device.count()}")
    q, k, v = (t.to(cuda_device.torch) for t in (torch.randn(2, 3, 7, 4), torch.randn(2, 3, 9, 4),
                                                 torch.randn(2, 3, 9, 5)))
    with pytest.raises(RuntimeError, match=r"\bkey\b.*same device as query.*\bcuda:1\b"):
        nystrom_attention(q, k.to(f"{cuda_device.type}:1"), v, 3)


# ---------------------------------------------------------------------------------------------
# One long sequence: numbers and peak device memory
# ---------------------------------------------------------------------------------------------

LONG_N, LONG_D, LONG_M = 65536, 64, 64


def _peak_extra(fn, keep_bytes):
    """(result, bytes): fn()'s result and the peak device memory of the call beyond what was allocated before
    it and beyond keep_bytes(result). Call it after a warm-up call, so that one-off workspaces (cuBLAS's) are
    not counted."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return result, peak - before - keep_bytes(result)


def test_long_sequence(cuda_device):
    """One head, n = 65536, D = 64, m = 64 (float32): output and gradients close to the float64 reference; the
    device memory the forward adds beyond its inputs and output stays below one n x m float32 matrix (16 MiB
    here; a composition keeps several: F, Bm and their exponentials), and that of forward+backward beyond
    inputs, output and gradients below two."""
    if not cuda_device.peak_memory:
        pytest.skip(f"{cuda_device} has no peak memory statistics")
    g = torch.Generator().manual_seed(21)
    qc, kc, vc = (torch.randn(1, 1, LONG_N, LONG_D, generator=g) for _ in range(3))
    q, k, v = to_device((qc, kc, vc), cuda_device)
    nm_bytes = LONG_N * LONG_M * 4
    with torch.no_grad():
        nystrom_attention(q, k, v, LONG_M)  # warm-up (its result is dropped at once)
        _, extra = _peak_extra(lambda: nystrom_attention(q, k, v, LONG_M), lambda o: o.numel() * o.element_size())
        assert extra < nm_bytes, (
            f"forward adds {extra / 2**20:.2f} MiB beyond inputs and output (limit {nm_bytes / 2**20:.1f} MiB)")

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    gout = cotangent((1, 1, LONG_N, LONG_D), torch.float32, cuda_device)

    def fwd_bwd():
        o = nystrom_attention(*leaves, LONG_M)
        o.backward(gout)
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        return [o.detach(), *grads]

    fwd_bwd()  # warm-up
    res, extra = _peak_extra(fwd_bwd, lambda r: sum(t.numel() * t.element_size() for t in r))
    assert extra < 2 * nm_bytes, (
        f"forward+backward adds {extra / 2**20:.2f} MiB beyond inputs, output and gradients "
        f"(limit {2 * nm_bytes / 2**20:.1f} MiB)")
    out, grads = res[0], res[1:]
    assert out.shape == (1, 1, LONG_N, LONG_D)
    # The reference of one head keeps n x m matrices only (about 2 s on the CPU).
    kw = dict(num_landmarks=LONG_M)
    ref, ref_grads = reference(qc, kc, vc, kw, grad_out=gout)
    assert_rel_close(out, ref, 1e-4, "output of the long sequence")
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(a, e, 2e-4, f"{name} of the long sequence")
