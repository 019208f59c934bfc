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

from cases import CASE
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
    §3, §5); the backward is the exact derivative of the float32 function of the same half inputs. Both stay
    within two units of the half dtype's rounding of that float32 function (relative to the largest entry; the
    emulated backend measures at most 0.8 eps, the CPU 0.4, on these cases)."""
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
