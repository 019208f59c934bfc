"""The tensor-core backward of float16 / bfloat16 (cuda/backward_tc_kernels.cuh; docs/DESIGN.md §7): the query side
and the key side of the long products on WMMA tiles with float32 accumulation, where the tensor-core forward serves
the shape (D, Dv in {64, 128}, at most 64 landmarks).

What it may round, and so the bound tested here: the float32 landmark operands (k̃, W, q̃, dbv) to the input dtype
once, and the probabilities F and dS = F∘(dF − δ) as left operands of the products, each a relative error of at most
u = eps/2; every sum is float32. A gradient entry is a float32 sum of products with at most three such rounded
factors, so it moves by at most about 3u·Σ|terms| from the float32 function of the same half inputs; with the
cancellation in dS (its entries of both signs sum to zero per row) Σ|terms| is a few times the largest entry. The
tests allow 4 eps relative to the largest entry, against the float32 function's exact derivative and against the
float32 CUDA-core backward (NYSTROM_CUDA_TC_BACKWARD=0) on the same saved forward; the emulated backend measures at
most ~1 eps on these cases. A wrong kernel (a missed scale, a wrong δ, a dropped tile or landmark) is off by O(1).

Runs on the devices with the CUDA backend ("cuda", "emu"); which kernels ran is checked on the emulated backend.
"""

from __future__ import annotations

import pytest
import torch

from helpers import Case, cotangent, emulated_library, middle, reference, rel_err, scattered, trailing

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

# Odd lengths (no multiple of 16), ragged padding of both sides, m < 64 and m = 64, both head dims and the mixed
# pairs, exact elements next to Nyström ones, and enough rows and heads that blocks walk several 64-row tiles
# (the partials accumulate across tiles).
CASES = [
    Case("tcb_d64_m37_exact_mix", B=3, H=2, L=203, S=157, D=64, Dv=64, m=37, key_mask=trailing(157, 25, 120),
         query_mask=trailing(190, 30, 203)),
    Case("tcb_d128_m64_scattered", B=2, H=2, L=141, S=333, D=128, Dv=128, m=64, key_mask=scattered(0.3),
         query_mask=middle((17, 40), (0, 0))),
    Case("tcb_d128_dv64_m9", B=1, H=3, L=77, S=95, D=128, Dv=64, m=9),
    Case("tcb_d64_dv128_m50", B=1, H=2, L=121, S=99, D=64, Dv=128, m=50, key_mask=trailing(83)),
    Case("tcb_d64_m64_tiles", B=2, H=8, L=1100, S=1301, D=64, Dv=64, m=64, key_mask=trailing(1301, 1177),
         query_mask=scattered(0.1)),
    # a Nyström element with unequal segments on both sides, one with no real query (its keys' gradients are
    # zero), one exact element (its dk, dv are its landmarks' gradients)
    Case("tcb_d64_dv128_empty_exact", B=3, H=2, L=97, S=71, D=64, Dv=128, m=24, key_mask=trailing(71, 40, 15),
         query_mask=trailing(97, 0, 20)),
]
CASE = {c.id: c for c in CASES}
DTYPES = [torch.float16, torch.bfloat16]
TOL_EPS = 4  # relative to the largest entry, in units of the dtype's eps (the module docstring)


def _grads(q, k, v, kw, g, monkeypatch, tc: bool):
    if tc:
        monkeypatch.delenv("NYSTROM_CUDA_TC_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("NYSTROM_CUDA_TC_BACKWARD", "0")
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = nystrom_attention(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, g)
    monkeypatch.delenv("NYSTROM_CUDA_TC_BACKWARD", raising=False)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "bf16"])
@pytest.mark.parametrize("case_id", list(CASE))
def test_tensor_core_backward_within_its_rounding(case_id, dtype, cuda_device, monkeypatch):
    case = CASE[case_id]
    q, k, v, kw = case.build(dtype, cuda_device)
    g = cotangent(case.out_shape, dtype, cuda_device)
    out_tc, grads_tc = _grads(q, k, v, kw, g, monkeypatch, tc=True)
    out_cc, grads_cc = _grads(q, k, v, kw, g, monkeypatch, tc=False)
    assert torch.equal(out_tc, out_cc), "the switch must not change the forward"
    _, ref32 = reference(q, k, v, kw, grad_out=g, compute_dtype=torch.float32)
    _, ref64 = reference(q, k, v, kw, grad_out=g)
    eps = torch.finfo(dtype).eps
    for name, a, c, e32, e64 in zip(("dq", "dk", "dv"), grads_tc, grads_cc, ref32, ref64):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}: dtype {a.dtype} or non-finite values"
        for what, expected in (("float32 derivative", e32), ("CUDA-core backward", c), ("float64 reference", e64)):
            err = rel_err(a, expected)
            assert err <= TOL_EPS * eps, f"{name} vs {what}: {err / eps:.2f} eps > {TOL_EPS} eps"
    # padded tokens get exactly zero gradient
    for mask, grads in ((kw.get("key_padding_mask"), grads_tc[1:]), (kw.get("query_padding_mask"), grads_tc[:1])):
        if mask is not None:
            for t in grads:
                assert torch.count_nonzero(t.detach().cpu()[mask.cpu()[:, None, :, None].expand_as(t.cpu())]) == 0


@pytest.mark.skipif(not emulated_library(), reason="which kernels ran: the emulated backend's launch log")
@pytest.mark.parametrize("case_id,tc_kernels", [("tcb_d64_m37_exact_mix", True), ("tcb_d128_dv64_m9", True)])
def test_switch_selects_the_kernels(case_id, tc_kernels, cuda_device, monkeypatch):
    """NYSTROM_CUDA_TC_BACKWARD=0 (read at every call) takes the float32 CUDA-core backward kernels; by default
    half inputs of these shapes take both tensor-core backward kernels."""
    from test_emulated import launched_during

    case = CASE[case_id]
    q, k, v, kw = case.build(torch.bfloat16, cuda_device)
    g = cotangent(case.out_shape, torch.bfloat16, cuda_device)
    _, on = launched_during(lambda: _grads(q, k, v, kw, g, monkeypatch, tc=True))
    _, off = launched_during(lambda: _grads(q, k, v, kw, g, monkeypatch, tc=False))
    names_on, names_off = " ".join(on), " ".join(off)
    for kernel in ("tc_backward_query_kernel", "tc_backward_key_kernel", "tc_backward_dq_kernel"):
        assert kernel in names_on, f"{kernel} not launched: {sorted(on)}"
        assert kernel not in names_off, f"{kernel} launched with the switch off"
    # the tensor-core passes write the gradients in the input dtype with the landmark shares folded in
    assert "spread_kernel" not in names_on, f"a spread on the tensor-core path: {sorted(on)}"
    assert "spread_kernel" in names_off
    assert "backward_query_kernel<" in names_off.replace("tc_backward_query_kernel<", "")
    assert "backward_query_kernel<" not in names_on.replace("tc_backward_query_kernel<", "")


@pytest.mark.skipif(not emulated_library(), reason="another target's limits: the emulated backend's profiles")
def test_sm80_takes_the_cuda_core_query_side_at_d128(cuda_device, monkeypatch):
    """The query side at D = Dv = 128 needs 190 KiB of shared memory per block with one stage, more than sm_80's
    163 KiB opt-in limit: there the float32 CUDA-core query kernel serves it while the key side (156.5 KiB, one
    stage) keeps the tensor cores, with the same accuracy; on sm_90 both sides take the tensor cores."""
    from test_emulated import emulator_setting, launched_during

    case = CASE["tcb_d128_m64_scattered"]
    q, k, v, kw = case.build(torch.float16, cuda_device)
    g = cotangent(case.out_shape, torch.float16, cuda_device)
    _, ref32 = reference(q, k, v, kw, grad_out=g, compute_dtype=torch.float32)
    eps = torch.finfo(torch.float16).eps
    for arch, query_tc in (("sm90", True), ("sm80", False)):
        with emulator_setting("arch", arch):
            (_, grads), launched = launched_during(lambda: _grads(q, k, v, kw, g, monkeypatch, tc=True))
        names = " ".join(launched)
        assert ("tc_backward_query_kernel" in names) == query_tc, f"{arch}: {sorted(launched)}"
        assert "tc_backward_key_kernel" in names, f"{arch}: {sorted(launched)}"
        for name, a, e in zip(("dq", "dk", "dv"), grads, ref32):
            assert rel_err(a, e) <= TOL_EPS * eps, f"{arch} {name}: {rel_err(a, e) / eps:.2f} eps"


def test_element_without_queries_has_zero_key_gradients(cuda_device):
    """The key side writes every element's dk and dv (no zero fill before it): an element whose queries are all
    padding gets exactly zero gradients for its real keys and values, and its dq is zero."""
    case = CASE["tcb_d64_dv128_empty_exact"]
    q, k, v, kw = case.build(torch.bfloat16, cuda_device)
    g = cotangent(case.out_shape, torch.bfloat16, cuda_device)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    grads = torch.autograd.grad(nystrom_attention(*leaves, **kw), leaves, g)
    assert kw["query_padding_mask"][1].all(), "element 1 must have no real query"
    for name, t in zip(("dq", "dk", "dv"), grads):
        assert torch.count_nonzero(t[1].detach().cpu()) == 0, f"{name} of the query-less element is not zero"
        assert torch.count_nonzero(t[0].detach().cpu()) > 0, f"{name} of the Nyström element is all zero"


def _grads_with_stages(case, dtype, device, monkeypatch, stages):
    q, k, v, kw = case.build(dtype, device)
    g = cotangent(case.out_shape, dtype, device)
    monkeypatch.setenv("NYSTROM_CUDA_TC_STAGES", str(stages))
    try:
        return _grads(q, k, v, kw, g, monkeypatch, tc=True)
    finally:
        monkeypatch.delenv("NYSTROM_CUDA_TC_STAGES", raising=False)


@pytest.mark.parametrize("case_id,dtype", [("tcb_d64_m64_tiles", torch.bfloat16),
                                           ("tcb_d128_m64_scattered", torch.float16),
                                           ("tcb_d64_dv128_empty_exact", torch.bfloat16)])
def test_stages_agree_bitwise(case_id, dtype, cuda_device, monkeypatch):
    """NYSTROM_CUDA_TC_STAGES=1 (each tile's owner rows loaded, then used) and 2 (the next tile's rows in flight by
    cp.async during this one; the default) change when rows arrive, not what is computed: the same bits. The cases
    walk several 64-row tiles per block (the buffers alternate) and end on partial tiles and padded rows."""
    _, one = _grads_with_stages(CASE[case_id], dtype, cuda_device, monkeypatch, 1)
    _, two = _grads_with_stages(CASE[case_id], dtype, cuda_device, monkeypatch, 2)
    for name, a, b in zip(("dq", "dk", "dv"), one, two):
        assert torch.equal(a, b), f"{name}: 1 and 2 stages differ (max {float((a.float() - b.float()).abs().max())})"


def _smem_of_last_launches():
    from test_emulated import per_kernel

    return {name: n for name, (n,) in per_kernel("smem").items()}


@pytest.mark.skipif(not emulated_library(), reason="the shared memory of a launch: the emulated backend's log")
def test_stages_set_the_shared_memory_by_the_documented_rule(cuda_device, monkeypatch):
    """At D = Dv = 128 (bf16), every line padded by 8 elements (no bank conflicts): landmark rows 34 KiB, float
    partials 68 KiB (query side) or 34 KiB + lse and delta (key side), per warp 13.5 KiB of scratch and 8.5 KiB of
    owner rows per stage. sm_90 (227 KiB) runs both sides with the stages asked for; sm_80 (163 KiB) runs the key
    side with one stage whatever is asked (two would need 190.5 KiB) and the query side on CUDA cores
    (test_sm80_takes_the_cuda_core_query_side_at_d128)."""
    from test_emulated import emulator_setting

    D = Dv = 128
    ld = lambda w: w + 8
    rows, scratch = 2 * 16 * (ld(D) + ld(Dv)), 2 * 4 * 16 * ld(64) + 2 * 2 * 16 * ld(64)
    query = lambda s: 2 * 64 * (ld(D) + ld(Dv)) + 4 * 64 * (ld(D) + ld(Dv)) + 4 * (s * rows + scratch)
    key = lambda s: 2 * 64 * (ld(D) + ld(Dv)) + 4 * 64 * ld(D) + 2 * 4 * 64 + 4 * (s * rows + scratch)
    assert (query(2), query(1), key(2), key(1)) == (224 << 10, 190 << 10, 195072, 160256)
    case = CASE["tcb_d128_m64_scattered"]
    for arch, stages, want_q, want_k in (("sm90", 2, query(2), key(2)), ("sm90", 1, query(1), key(1)),
                                          ("sm80", 2, None, key(1))):
        with emulator_setting("arch", arch):
            _grads_with_stages(case, torch.bfloat16, cuda_device, monkeypatch, stages)
        smem = {name.split("<")[0].split("::")[-1]: n for name, n in _smem_of_last_launches().items()
                if "tc_backward_" in name and "<__nv_bfloat16, 128, 128>" in name}
        assert smem["tc_backward_key_kernel"] == want_k, f"{arch}, {stages} stages: {smem}"
        if want_q is not None:
            assert smem["tc_backward_query_kernel"] == want_q, f"{arch}, {stages} stages: {smem}"


def test_bad_stage_count_is_a_clear_error(cuda_device, monkeypatch):
    case = CASE["tcb_d128_dv64_m9"]
    q, k, v, kw = case.build(torch.bfloat16, cuda_device)
    monkeypatch.setenv("NYSTROM_CUDA_TC_STAGES", "3")
    with pytest.raises(RuntimeError, match=r"NYSTROM_CUDA_TC_STAGES must be 1 or 2.*got \"3\""):
        nystrom_attention(q, k, v, **kw)
