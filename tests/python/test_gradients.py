"""Gradients of the ops on every test device: against the autograd of the float64 reference (run on the CPU),
gradcheck, the backward op, torch.library.opcheck, torch.compile, empty inputs.

Tolerances: helpers.expected_gradients (float64 1e-9, 1e-7 above 64 landmarks; float32 2e-4 or 20x the error
of the same math done in float32); float16 / bfloat16 see helpers.check_low_precision.
"""

from __future__ import annotations

import pytest
import torch

from cases import CASE, GRADCHECK_CASES
from helpers import (DEVICES, FLOAT_IDS, assert_rel_close, backward_args, check_low_precision, check_padded_grads_zero,
                     cotangent, devices, expected_gradients, make_qkv, ops_args, opcheck_samples, reference,
                     to_device)

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

# Small problems whose float64 references dominate: one intra-op thread is fastest and steady on a busy
# machine (conftest.py). The CPU backward at several threads: test_hardening.py (thread counts, concurrency).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

GRAD_IDS = ["both_masks", "middle_padding", "mixed_exact_and_nystrom", "original_init", "long_multi_tile",
            "long_multi_tile_original", "m1_cross_short_keys", "d7_m17_random_masks", "d64_m64_cross",
            "d96_m100_middle_original", "d128_m128_random_key", "d256_m256_masks", "long_tiles"]


def _grads(case_id, dtype, device):
    """The case's inputs, keyword arguments, cotangent and the op's gradients at it."""
    q, k, v, kw = CASE[case_id].build(dtype, device, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, dtype, device)
    return (q, k, v), kw, g, torch.autograd.grad(out, (q, k, v), g)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("case_id", GRAD_IDS)
def test_gradients_match_reference(case_id, dtype, device):
    qkv, kw, g, grads = _grads(case_id, dtype, device)
    ref_grads, tols = expected_gradients(*qkv, kw, g, dtype)
    for name, a, e, tol in zip(("dq", "dk", "dv"), grads, ref_grads, tols):
        assert a.dtype == dtype and a.device.type == device.type
        assert_rel_close(a, e, tol, name)
    check_padded_grads_zero(grads, kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("case_id", ["both_masks", "d7_m17_random_masks", "d64_m64_cross", "d96_m100_middle_original",
                                     "d256_m256_masks", "tc_d64_m64", "tc_d128_m17_cross", "tc_d64_dv128"])
def test_low_precision_backward(case_id, dtype, device):
    qkv, kw, g, grads = _grads(case_id, dtype, device)
    _, ref_grads = reference(*qkv, kw, grad_out=g)
    _, plain_grads = reference(*qkv, kw, grad_out=g, compute_dtype=dtype)
    for name, a, e, p in zip(("dq", "dk", "dv"), grads, ref_grads, plain_grads):
        check_low_precision(a, e, p, dtype, device, name, grad=True)


@pytest.mark.parametrize("case_id", ["both_masks", "d96_m100_middle_original"])
def test_backward_op_matches_autograd(case_id, device):
    q, k, v, kw = CASE[case_id].build(torch.float64, device)
    args = ops_args(q, k, v, kw)
    saved = torch.ops.nystrom.nystrom_attention_forward(*args)
    g = cotangent(saved[0].shape, torch.float64, device)
    grads = torch.ops.nystrom.nystrom_attention_backward(*backward_args(g, args, saved))
    ref_grads, tols = expected_gradients(q, k, v, kw, g, torch.float64)
    for name, a, e, tol in zip(("dq", "dk", "dv"), grads, ref_grads, tols):
        assert_rel_close(a, e, tol, name)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck(case, device):
    q, k, v, kw = case.build(torch.float64, device, requires_grad=True)

    def f(q, k, v):
        return nystrom_attention(q, k, v, **kw)

    fast = case.m > 64  # one random direction instead of the full Jacobian
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


def test_gradcheck_scripted(device):
    q, k, v, kw = GRADCHECK_CASES[0].build(torch.float64, device, requires_grad=True)
    kpm, qpm = kw["key_padding_mask"], kw["query_padding_mask"]

    @torch.jit.script
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor, qpm: torch.Tensor):
        return torch.ops.nystrom.nystrom_attention(q, k, v, 3, 6, "per_head", kpm, qpm, None)

    torch.testing.assert_close(f(q, k, v, kpm, qpm), nystrom_attention(q, k, v, **kw), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda q, k, v: f(q, k, v, kpm, qpm), (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


WANTS = [("value",), ("query",), ("key",), ("query", "value"), ("key", "value"), ("query", "key", "value")]


@pytest.mark.parametrize("case_id,dtype", [("both_masks", torch.float64), ("d64_m100_nonsquare_A", torch.float32)],
                         ids=["small_f64", "d64_m100_f32"])
@pytest.mark.parametrize("wants", WANTS, ids=lambda w: "+".join(w))
def test_only_some_inputs_require_grad(wants, case_id, dtype, device):
    q, k, v, kw = CASE[case_id].build(dtype, device)
    inputs = dict(query=q, key=k, value=v)
    for name in wants:
        inputs[name].requires_grad_(True)
    out = nystrom_attention(q, k, v, **kw)
    assert out.requires_grad
    g = cotangent(out.shape, dtype, device)
    out.backward(g)
    ref_grads, tols = expected_gradients(q, k, v, kw, g, dtype)
    for (name, t), e, tol in zip(inputs.items(), ref_grads, tols):
        if name in wants:
            assert t.grad is not None, f"{name} requires grad but got none"
            assert_rel_close(t.grad, e, tol, f"gradient of {name}")
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


def test_no_input_requires_grad(device):
    q, k, v = to_device(make_qkv(2, 2, 8, 8, 4, 3), device)
    out = nystrom_attention(q, k, v, 3)
    assert not out.requires_grad and out.grad_fn is None


def test_double_backward_is_refused(device):
    q, k, v, kw = GRADCHECK_CASES[0].build(torch.float64, device, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"(?i)double backward|second.order|twice|higher.order|not (implemented|supported)"):
        out = nystrom_attention(q, k, v, **kw)
        (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
        dq.sum().backward()


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_nystrom_attention(requires_grad, device):
    for args in opcheck_samples(device, requires_grad):
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention.default, args)


def test_opcheck_forward_and_backward_ops(device):
    for args in opcheck_samples(device, False):
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention_forward.default, args)
        saved = torch.ops.nystrom.nystrom_attention_forward(*args)
        g = torch.randn_like(saved[0])
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention_backward.default, backward_args(g, args, saved))


# The union of the backends of the test devices; each device runs its own.
COMPILE_BACKENDS = sorted({b for name in devices() for b in DEVICES[name].compile_backends()})


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    if backend not in device.compile_backends():
        pytest.skip(f"torch.compile backend {backend} is not tested on {device}")
    torch._dynamo.reset()
    q, k, v, kw = CASE["d64_m64_cross"].build(torch.float32, device, requires_grad=True)
    kpm, qpm = kw["key_padding_mask"], kw["query_padding_mask"]

    def f(q, k, v, kpm, qpm):
        return nystrom_attention(q * 0.5, k, v, 64, key_padding_mask=kpm, query_padding_mask=qpm).relu()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    g = cotangent((2, 3, 150, 33), torch.float32, device)
    try:
        out = compiled(q, k, v, kpm, qpm)
        got = torch.autograd.grad(out, (q, k, v), g)
    finally:
        torch._dynamo.reset()
    expected_out = f(q, k, v, kpm, qpm)
    expected = torch.autograd.grad(expected_out, (q, k, v), g)
    assert_rel_close(out, expected_out, 1e-5, "output")
    for name, a, e in zip(("dq", "dk", "dv"), got, expected):
        assert_rel_close(a, e, 1e-5, name)


# ---------------------------------------------------------------------------------------------
# Empty inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("B,L,masks", [(0, 5, False), (0, 5, True), (2, 0, False), (2, 0, True)],
                         ids=["B0", "B0_masks", "L0", "L0_masks"])
def test_empty(B, L, masks, dtype, device):
    H, S, D, Dv = 2, 6, 3, 4
    q, k, v = (t.to(device.torch).requires_grad_(True) for t in make_qkv(B, H, L, S, D, Dv, dtype=dtype))
    kw = {}
    if masks:
        kw = to_device(dict(key_padding_mask=torch.zeros(B, S, dtype=torch.bool),
                            query_padding_mask=torch.zeros(B, L, dtype=torch.bool)), device)
    out = nystrom_attention(q, k, v, 2, **kw)
    assert out.shape == (B, H, L, Dv) and out.dtype == dtype and out.device.type == device.type
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert torch.count_nonzero(k.grad) == 0 and torch.count_nonzero(v.grad) == 0
