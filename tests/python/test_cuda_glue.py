"""The CUDA glue's handling of what the device must not do (issue 12's findings; docs/DESIGN.md §3, §5, §7): no
host synchronisation on the op's path (CUDA-graph capture works with masks), no TF32 in the float32 m x m steps
whatever torch's switches say, NaN keys propagate as on the CPU, and the tensor-core forward and the backward
differ by the rounding the design allows only.

Runs on the test devices with the CUDA backend ("cuda", and "emu": the emulated backend on the CPU); the checks
that need a real GPU (sync debug mode, graph capture) skip elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from cases import CASE, GRADCHECK_CASES
from helpers import (Case, assert_rel_close, cotangent, expected_gradients, expected_output, on_cpu_backend,
                     reference, rel_err, to_device, trailing)

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention


def _needs_gpu(device):
    if device.type != "cuda":
        pytest.skip(f"{device} is not a GPU (the check needs torch.cuda's sync debug mode and graphs)")


def test_no_host_sync_with_masks(cuda_device):
    """torch.cuda.set_sync_debug_mode("error") raises on any device-to-host synchronisation: forward and
    backward with both masks must not make one."""
    _needs_gpu(cuda_device)
    q, k, v, kw = CASE["d7_m17_random_masks"].build(torch.float32, cuda_device, requires_grad=True)
    g = cotangent(CASE["d7_m17_random_masks"].out_shape, torch.float32, cuda_device)
    nystrom_attention(q, k, v, **kw).backward(g)  # warm-up: one-off setup may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        nystrom_attention(q, k, v, **kw).backward(g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_graph_capture_with_key_padding_mask(cuda_device):
    """The forward with a key_padding_mask captured in a CUDA graph and replayed on new inputs equals eager."""
    _needs_gpu(cuda_device)
    q, k, v, kw = CASE["d64_m64_cross"].build(torch.float32, cuda_device)
    static = [t.clone() for t in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            nystrom_attention(*static, **kw)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nystrom_attention(*static, **kw)
    for seed in (1, 2):
        fresh = CASE["d64_m64_cross"].build(torch.float32, cuda_device, seed=seed)[:3]
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        assert_rel_close(out, nystrom_attention(*fresh, **kw), 1e-6, f"replay {seed}")


@pytest.mark.parametrize("case_id", ["d64_m100_nonsquare_A", "d200_m129_query_original", "m300_beyond_256"])
def test_tf32_switches_do_not_reach_the_float32_steps(case_id, cuda_device):
    """With torch's TF32 switches on (allow_tf32, float32 matmul precision "high"), float32 results keep float32
    accuracy: the m x m steps (cuBLAS Newton–Schulz above 128 landmarks, A's logits, the backward's m x m part)
    must not round to TF32's 10-bit mantissa."""
    q, k, v, kw = CASE[case_id].build(torch.float32, cuda_device, requires_grad=True)
    g = cotangent(CASE[case_id].out_shape, torch.float32, cuda_device)
    before = (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    try:
        out = nystrom_attention(q, k, v, **kw)
        grads = torch.autograd.grad(out, (q, k, v), g)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before[0]
        torch.set_float32_matmul_precision(before[1])
    ref, tol = expected_output(q, k, v, kw, torch.float32)
    assert_rel_close(out, ref, tol)
    ref_grads, tols = expected_gradients(q, k, v, kw, g, torch.float32)
    for name, a, e, t in zip(("dq", "dk", "dv"), grads, ref_grads, tols):
        assert_rel_close(a, e, t, name)


def _nan_pattern_call(q, k, v, kw):
    """Where the output, Bm·V and its log-sum-exps (the forward op's out, bv, lse_landmark) are NaN."""
    from helpers import ops_args

    res = torch.ops.nystrom.nystrom_attention_forward(*ops_args(q, k, v, kw))
    return [torch.isnan(res[i]).cpu() for i in (0, 3, 6)]


@pytest.mark.parametrize("where", ["one_key", "one_query"])
def test_nan_inputs_propagate_as_on_the_cpu(where, cuda_device):
    """A NaN in one real key (or query) gives NaN exactly where the CPU backend's has them, in the output and in
    Bm·V and its statistics: a NaN is not dropped with the split of keys it sits in."""
    case = Case("nan", B=2, H=2, L=300, S=700, D=16, Dv=8, m=17, key_mask=trailing(700, 500))
    q, k, v, kw = case.build(torch.float32, "cpu")
    if where == "one_key":
        k[1, 0, 123, 3] = math.nan
    else:
        q[0, 1, 77, 0] = math.nan
    cpu_nan = on_cpu_backend("test_cuda_glue", "_nan_pattern_call", q, k, v, kw)
    assert cpu_nan[0].any()
    dev_nan = _nan_pattern_call(*to_device((q, k, v), cuda_device), to_device(kw, cuda_device))
    for name, d, c in zip(("out", "bv", "lse_landmark"), dev_nan, cpu_nan):
        assert torch.equal(d, c), f"{name}: NaN at {int(d.sum())} entries on {cuda_device}, {int(c.sum())} on the CPU"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case_id", ["tc_d64_m64", "tc_d128_m17_cross"])
def test_tensor_core_forward_and_backward_differ_by_rounding_only(case_id, dtype, cuda_device):
    """On the tensor-core path the forward rounds k̃, q̃, W and the probabilities to the input dtype (docs/DESIGN.md
    §3, §5); the tensor-core backward rounds the same landmark operands and F, dS (§7; test_cuda_tc_backward.py
    has the bound and odd shapes). Both stay within two units of the half dtype's rounding of the float32 function
    of the same half inputs and its exact derivative (relative to the largest entry; the emulated backend measures
    at most ~1 eps, the CPU 0.4, on these cases)."""
    q, k, v, kw = CASE[case_id].build(dtype, cuda_device, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, dtype, cuda_device)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # the float32 function of the very same half inputs, and its exact derivative
    ref32, ref32_grads = reference(q, k, v, kw, grad_out=g, compute_dtype=torch.float32)
    eps = torch.finfo(dtype).eps
    assert rel_err(out.cpu(), ref32) <= 2 * eps, f"forward: {rel_err(out.cpu(), ref32):.3e} vs eps {eps:.1e}"
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref32_grads):
        assert rel_err(a.cpu(), e) <= 2 * eps, f"{name}: {rel_err(a.cpu(), e):.3e} vs eps {eps:.1e}"


# --------------------------------------------------------------------------------------------------------------
# The backward's m x m part: one fused kernel per head (cuda/mm_backward_kernel.cuh) or batched ATen products
# (NYSTROM_CUDA_FUSED_MM=0, and sizes without a fused variant). docs/DESIGN.md §7.

FUSED_MM_CASES = [("mixed_exact_and_nystrom", torch.float32), ("d64_m64_cross", torch.float32),
                  ("original_init_mixed", torch.float32), ("long_multi_tile_original", torch.float64),
                  ("d7_m17_random_masks", torch.float64), ("zero_iterations", torch.float32),
                  ("one_iteration", torch.float64), ("masks_uneven_original", torch.float64),
                  ("mixed_exact", torch.float64), ("tc_d128_m17_cross", torch.bfloat16),
                  ("custom_scale_sharp", torch.float32)]


_ALL_CASES = {**CASE, **{c.id: c for c in GRADCHECK_CASES}}


def _fwd_bwd(case_id, dtype, device):
    q, k, v, kw = _ALL_CASES[case_id].build(dtype, device, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, dtype, device)
    return (q, k, v, kw, g), torch.autograd.grad(out, (q, k, v), g)


def _kernel_counts():
    counts = {}
    for line in torch.ops.nystrom._emulator("kernels").splitlines():
        name, _, n = line.rpartition("=")
        counts[name] = int(n)
    return counts


def _launched(fn):
    before = _kernel_counts()
    fn()
    return {k: n - before.get(k, 0) for k, n in _kernel_counts().items() if n > before.get(k, 0)}


@pytest.mark.parametrize("case_id,dtype", FUSED_MM_CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in FUSED_MM_CASES])
def test_fused_mm_backward_matches_the_aten_path(case_id, dtype, cuda_device, monkeypatch):
    """The fused m x m backward and the batched ATen chain compute the same derivative (the same products in
    another summation order): their gradients agree to a few float32 (float64) rounding units of the largest
    entry, and both are within the suite's tolerance of the float64 reference."""
    monkeypatch.delenv("NYSTROM_CUDA_FUSED_MM", raising=False)  # the fused kernel even in a run with it off
    (q, k, v, kw, g), fused = _fwd_bwd(case_id, dtype, cuda_device)
    monkeypatch.setenv("NYSTROM_CUDA_FUSED_MM", "0")
    _, aten = _fwd_bwd(case_id, dtype, cuda_device)
    monkeypatch.delenv("NYSTROM_CUDA_FUSED_MM")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 1e-11 if acc == torch.float64 else (2e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps)
    if _ALL_CASES[case_id].extra.get("pinv_iterations", 6) >= 6 and acc == torch.float32:
        tol *= 5  # six iterations amplify the rounding of A
    for name, a, b in zip(("dq", "dk", "dv"), fused, aten):
        assert_rel_close(a, b, tol, f"{name}: fused vs ATen")
    if dtype != torch.bfloat16:
        ref_grads, tols = expected_gradients(q, k, v, kw, g, dtype)
        for name, a, e, t in zip(("dq", "dk", "dv"), fused, ref_grads, tols):
            assert_rel_close(a, e, t, name)


def _launches_of_one_backward(case_id, dtype, device):
    """Kernel launches of one backward call: on a GPU the profiler's CUDA kernels; on the emulated device the
    emulated kernels plus the ATen operators that compute (each a kernel launch on a GPU; views, allocations and
    metadata operators are not counted)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, kw = CASE[case_id].build(dtype, device, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, dtype, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(out, (q, k, v), g)
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    free = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::reshape", "aten::expand",
            "aten::as_strided", "aten::transpose", "aten::t", "aten::select", "aten::slice", "aten::unsqueeze",
            "aten::squeeze", "aten::detach", "aten::alias", "aten::_reshape_alias", "aten::_unsafe_view",
            "aten::permute", "aten::contiguous", "aten::to"}
    launched = {}

    def run():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            torch.autograd.grad(out, (q, k, v), g)
        # the ATen operators the backward op calls (a conversion counts when it copies)
        calls = [e for e in prof.events()
                 if e.cpu_parent is not None and e.cpu_parent.name == "nystrom::nystrom_attention_backward"]
        assert calls, "the backward op called no ATen operator"
        launched["aten"] = sum(1 for e in calls if e.name not in free
                               or (e.name in ("aten::to", "aten::contiguous") and e.cpu_children))

    kernels = _launched(run)
    launched["kernels"] = sum(kernels.values())
    return launched["aten"] + launched["kernels"]


@pytest.mark.parametrize("original", [False, True], ids=["per_head", "original"])
def test_one_backward_makes_a_handful_of_launches(original, cuda_device, monkeypatch):
    """The backward of a Nyström call (one that takes the fused m x m kernel) launches a few dozen kernels (most
    of them the masks' layout and zero fills), fewer than a fifth of the batched ATen chain it replaces (some 200
    more launches at six iterations). Measured on the emulated device (Xeon): 42 / 291 per-head init, 43 / 298
    with "original"."""
    case_id = "original_init_mixed" if original else "d64_m64_cross"
    monkeypatch.delenv("NYSTROM_CUDA_FUSED_MM", raising=False)  # the fused kernel even in a run with it off
    fused = _launches_of_one_backward(case_id, torch.float32, cuda_device)
    monkeypatch.setenv("NYSTROM_CUDA_FUSED_MM", "0")
    aten = _launches_of_one_backward(case_id, torch.float32, cuda_device)
    assert fused <= 45, f"{fused} launches with the fused m x m kernel"
    assert 5 * fused <= aten, f"fused {fused} vs ATen {aten} launches"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_tensor_core_rows_not_16_byte_aligned(dtype, cuda_device):
    """The tensor-core forward moves rows 16 bytes at a time where a row is 16-byte aligned, element by element
    where it is not (views at an odd offset, row strides that are not a multiple of 8 elements): both give the
    same bits as the same values in fresh, aligned tensors, in the output and the gradients."""
    q, k, v, kw = CASE["tc_d64_m64"].build(dtype, cuda_device)
    g = cotangent(q.shape[:-1] + (v.shape[-1],), dtype, cuda_device)

    def odd_view(t):  # the same values one element into a wider buffer: rows 2 bytes off, stride D + 3
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
        wide[..., 1:1 + t.shape[-1]] = t
        return wide[..., 1:1 + t.shape[-1]]

    results = []
    for inputs in ((q, k, v), tuple(odd_view(t) for t in (q, k, v))):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        out = nystrom_attention(*leaves, **kw)
        results.append([out.detach(), *torch.autograd.grad(out, leaves, g)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"{name}: aligned and unaligned rows differ"
