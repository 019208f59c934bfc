"""The ops of torch_nystrom against the float64 reference (tests/python/reference.py).

Sizes are odd on purpose (L=37, S=53, D=19, Dv=23, m=7) so that no dimension is a power of two and the
landmark segments are uneven.  Tolerances are relative to the largest output entry:
float64 1e-10, float32 1e-4 (the reference run in float32 is ~1e-6 off), bfloat16 / float16 a small
multiple of the error of rounding the exact result to that dtype (see test_low_precision).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from helpers import assert_rel_close, make_qkv, middle_mask, random_mask, rel_err, trailing_mask
from reference import masked_dense_reference, max_column_sum, nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 2e-4}
FLOAT_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def ops_args(q, k, v, kw):
    """The 9 positional arguments of torch.ops.nystrom.nystrom_attention(_forward)."""
    return (
        q,
        k,
        v,
        kw.get("num_landmarks", 64),
        kw.get("pinv_iterations", 6),
        kw.get("pinv_init", "per_head"),
        kw.get("key_padding_mask"),
        kw.get("query_padding_mask"),
        kw.get("scale"),
    )


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    B: int = 2
    H: int = 3
    L: int = 37
    S: int = 53
    D: int = 19
    Dv: int = 23
    m: int = 7
    key_real: Optional[list] = None  # trailing padding: real lengths per batch element
    query_real: Optional[list] = None
    key_holes: Optional[list] = None  # padding in the middle: (lo, hi) per batch element
    query_holes: Optional[list] = None
    std: float = 1.0
    extra: dict = field(default_factory=dict)

    def build(self, dtype, requires_grad=False, seed=0):
        q, k, v = make_qkv(self.B, self.H, self.L, self.S, self.D, self.Dv, dtype=dtype, std=self.std, seed=seed)
        kw = {"num_landmarks": self.m, **self.extra}
        if self.key_real is not None:
            kw["key_padding_mask"] = trailing_mask(self.B, self.S, self.key_real)
        if self.key_holes is not None:
            kw["key_padding_mask"] = middle_mask(self.B, self.S, self.key_holes)
        if self.query_real is not None:
            kw["query_padding_mask"] = trailing_mask(self.B, self.L, self.query_real)
        if self.query_holes is not None:
            kw["query_padding_mask"] = middle_mask(self.B, self.L, self.query_holes)
        if requires_grad:
            for t in (q, k, v):
                t.requires_grad_(True)
        return q, k, v, kw


CASES = [
    Case("self_no_masks", L=37, S=37, Dv=19),
    Case("cross_dv", L=37, S=53, D=19, Dv=23),
    Case("key_mask", key_real=[53, 30]),
    Case("query_mask", query_real=[37, 20]),
    Case("both_masks", key_real=[40, 53], query_real=[37, 11]),
    Case("middle_padding", key_holes=[(10, 25), (0, 5)], query_holes=[(3, 9), (30, 37)]),
    Case("even_segments", L=35, S=35, Dv=19, m=7, key_real=[35, 28], query_real=[35, 28]),
    Case("uneven_segments_m5", L=37, S=53, m=5),
    Case("exact_large_m", m=64, key_real=[53, 41], query_real=[29, 37]),
    Case("exact_m_equals_lengths", L=37, S=53, m=53),
    # element 0: 5 real queries, 7 real keys -> exact; element 1: L_b = m < S_b; element 2: S_b < m < L_b
    Case("mixed_exact_and_nystrom", B=3, L=29, S=29, Dv=11, m=7, key_real=[7, 20, 3], query_real=[5, 7, 29]),
    Case("custom_scale", key_real=[53, 44], extra={"scale": 0.113}),
    Case("sharp_softmax", L=37, S=37, Dv=19, std=2.0),
    Case("single_landmark", m=1, key_real=[53, 12]),
    Case("original_init", key_real=[53, 30], query_real=[37, 20], extra={"pinv_init": "original"}),
    # Longer than the CPU kernel's row tile (512), with padding straddling tile boundaries and a sharp
    # softmax, so that tiled / online-softmax merging is exercised.
    Case("long_multi_tile", B=2, H=2, L=1100, S=1300, D=5, Dv=3, m=9, std=3.0,
         key_holes=[(500, 530), (1000, 1300)], query_holes=[(0, 0), (513, 600)]),
    Case("long_multi_tile_original", B=2, H=1, L=1030, S=600, D=4, Dv=3, m=6, std=3.0,
         key_holes=[(0, 0), (2, 40)], query_holes=[(1, 3), (511, 513)], extra={"pinv_init": "original"}),
    Case(
        "original_init_mixed",
        B=3,
        L=29,
        S=29,
        m=7,
        key_real=[7, 20, 29],
        query_real=[5, 29, 13],
        extra={"pinv_init": "original"},
    ),
]
CASE_BY_ID = {c.id: c for c in CASES}


def check_padded_rows_zero(out, kw):
    qpm = kw.get("query_padding_mask")
    if qpm is not None:
        padded = out.detach().double()[qpm[:, None, :, None].expand_as(out)]
        assert torch.count_nonzero(padded) == 0, "rows of padded queries must be exactly 0"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype):
    q, k, v, kw = case.build(dtype)
    before = [t.clone() for t in (q, k, v)]
    out = nystrom_attention(q, k, v, **kw)
    assert out.dtype == dtype
    assert out.shape == (case.B, case.H, case.L, case.Dv)
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0), "inputs must not be modified"
    assert_rel_close(out, nystrom_reference(q, k, v, **kw), TOL[dtype])
    check_padded_rows_zero(out, kw)


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
@pytest.mark.parametrize("iterations", [0, 1, 6, 13])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
def test_pinv_iterations_and_init(iterations, pinv_init, dtype):
    case = CASE_BY_ID["both_masks"]
    q, k, v, kw = case.build(dtype)
    kw.update(pinv_iterations=iterations, pinv_init=pinv_init)
    out = nystrom_attention(q, k, v, **kw)
    assert_rel_close(out, nystrom_reference(q, k, v, **kw), TOL[dtype])


def test_pinv_init_changes_the_result():
    # Negative control for the test above: the two inits really differ on this batch.
    q, k, v, kw = CASE_BY_ID["both_masks"].build(torch.float64)
    a = nystrom_attention(q, k, v, **kw, pinv_init="original")
    b = nystrom_attention(q, k, v, **kw, pinv_init="per_head")
    assert rel_err(a, b) > 1e-6


def test_iterations_change_the_result():
    q, k, v, kw = CASE_BY_ID["cross_dv"].build(torch.float64)
    a = nystrom_attention(q, k, v, **kw, pinv_iterations=1)
    b = nystrom_attention(q, k, v, **kw, pinv_iterations=6)
    assert rel_err(a, b) > 1e-6


def test_default_arguments():
    # num_landmarks=64, pinv_iterations=6, pinv_init="per_head", scale=D**-0.5
    q, k, v = make_qkv(2, 2, 101, 83, 5, 6)
    out = nystrom_attention(q, k, v)
    ref = nystrom_reference(q, k, v, 64, pinv_iterations=6, pinv_init="per_head", scale=5 ** -0.5)
    assert_rel_close(out, ref, TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# Strides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
def test_non_contiguous_fused_qkv(dtype):
    B, L, H, D = 2, 37, 3, 19
    qkv = torch.randn(B, L, 3, H, D, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, no copy
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    mask = trailing_mask(B, L, [37, 22])
    kw = dict(num_landmarks=7, key_padding_mask=mask, query_padding_mask=mask)
    out = nystrom_attention(q, k, v, **kw)
    assert_rel_close(out, nystrom_reference(q, k, v, **kw), TOL[dtype])
    assert_rel_close(out, nystrom_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw), TOL[dtype])


def test_non_contiguous_cross_and_broadcast():
    # kv fused, head dim last but sequences transposed; k shared by all heads with a stride-0 expand;
    # the masks are non-contiguous slices too.
    B, H, L, S, D = 2, 3, 37, 53, 19
    q = torch.randn(B, L, H, D, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(B, 1, S, D, dtype=torch.float64).expand(B, H, S, D)
    v = torch.randn(B, S, H, 2 * D, dtype=torch.float64)[..., ::2].transpose(1, 2)
    kpm = trailing_mask(B, 2 * S, [2 * S, 61])[:, ::2]
    assert not kpm.is_contiguous()
    kw = dict(num_landmarks=7, key_padding_mask=kpm)
    out = nystrom_attention(q, k, v, **kw)
    assert_rel_close(out, nystrom_reference(q, k, v, **kw), TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# Low precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("case_id", ["both_masks", "mixed_exact_and_nystrom", "original_init", "long_multi_tile"])
def test_low_precision(case_id, dtype):
    """Half inputs compute internally in float32 (DESIGN.md), so the op's error against the exact result
    (float64 reference on the same half inputs) must be close to the unavoidable error of rounding that
    exact result to the half dtype.  Allowed: 4x that rounding error, plus 2 ulp of float32."""
    q, k, v, kw = CASE_BY_ID[case_id].build(dtype)
    out = nystrom_attention(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    ref = nystrom_reference(q, k, v, **kw)
    rounding = (ref.to(dtype).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    allowed = 4 * rounding + 2 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert err <= allowed, f"{dtype}: max error {err:.3e} > {allowed:.3e} (rounding alone {rounding:.3e})"
    check_padded_rows_zero(out, kw)


def _grads_and_reference_grads(case_id, dtype):
    """Gradients of the op at a random cotangent, the float64 reference's at the same one, and the case's kwargs."""
    q, k, v, kw = CASE_BY_ID[case_id].build(dtype, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = nystrom_reference(q64, k64, v64, **kw)
    return grads, torch.autograd.grad(ref, (q64, k64, v64), g.double()), kw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=FLOAT_IDS.get)
def test_low_precision_backward(dtype):
    grads, ref_grads, _ = _grads_and_reference_grads("both_masks", dtype)
    eps = torch.finfo(dtype).eps
    for name, a, e in zip("qkv", grads, ref_grads):
        assert a.dtype == dtype
        # gradients are sums over many products of half-precision factors: allow ~8 ulp of the dtype
        assert rel_err(a, e) <= 8 * eps, f"d{name}: relative error {rel_err(a, e):.3e}"


# ---------------------------------------------------------------------------------------------
# The op entry points
# ---------------------------------------------------------------------------------------------


def test_torch_ops_entry_point_matches_python_wrapper():
    q, k, v, kw = CASE_BY_ID["original_init"].build(torch.float64)
    kw["scale"] = 0.3
    a = nystrom_attention(q, k, v, **kw)
    b = torch.ops.nystrom.nystrom_attention(*ops_args(q, k, v, kw))
    assert torch.equal(a, b)


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
def test_forward_op_outputs(pinv_init):
    case = Case("fwd", L=37, S=53, m=7)
    q, k, v, kw = case.build(torch.float64)
    kw["pinv_init"] = pinv_init
    res = torch.ops.nystrom.nystrom_attention_forward(*ops_args(q, k, v, kw))
    assert len(res) == 8
    out, q_lm, k_lm, bv, zbv, lse_q, lse_lm, pinv_scale = res
    assert_rel_close(out, nystrom_reference(q, k, v, **kw), TOL[torch.float64])
    assert q_lm.shape == (2, 3, 7, 19) and k_lm.shape == (2, 3, 7, 19)
    assert bv.shape == (2, 3, 7, 23) and zbv.shape == (2, 3, 7, 23)
    assert lse_q.shape == (2, 3, 37) and lse_lm.shape == (2, 3, 7)
    assert pinv_scale.shape == (2, 3)
    # landmarks are segment means, pinv_scale is the c of Z0 = A^T / c
    from reference import landmarks

    scale = 19 ** -0.5
    c = []
    for b in range(2):
        torch.testing.assert_close(q_lm[b], landmarks(q[b], 7), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k_lm[b], landmarks(k[b], 7), rtol=1e-12, atol=1e-12)
        a = torch.softmax(scale * landmarks(q[b], 7) @ landmarks(k[b], 7).transpose(-1, -2), dim=-1)
        c.append(max_column_sum(a))
    c = torch.stack(c)
    if pinv_init == "original":
        c = c.max().expand(2, 3)
    torch.testing.assert_close(pinv_scale.double(), c, rtol=1e-12, atol=1e-12)


SAVED_NAMES = ("out", "q_landmarks", "k_landmarks", "bv", "zbv", "lse_query", "lse_landmark", "pinv_scale")
ARG_NAMES = ("query", "key", "value", "num_landmarks", "pinv_iterations", "pinv_init",
             "key_padding_mask", "query_padding_mask", "scale")


def backward_args(grad_out, args, saved):
    """Arguments of nystrom_attention_backward, matched to its schema by name.

    (The brief lists `out` among them; matching by name keeps the test independent of that detail.)
    """
    values = {"grad_out": grad_out, **dict(zip(ARG_NAMES, args)), **dict(zip(SAVED_NAMES, saved))}
    schema = torch.ops.nystrom.nystrom_attention_backward.default._schema
    return tuple(values[a.name] for a in schema.arguments)


def test_backward_op_matches_autograd():
    q, k, v, kw = CASE_BY_ID["both_masks"].build(torch.float64, requires_grad=True)
    args = ops_args(q.detach(), k.detach(), v.detach(), kw)
    saved = torch.ops.nystrom.nystrom_attention_forward(*args)
    g = torch.randn_like(saved[0])
    dq, dk, dv = torch.ops.nystrom.nystrom_attention_backward(*backward_args(g, args, saved))
    ref = nystrom_reference(q, k, v, **kw)
    eq, ek, ev = torch.autograd.grad(ref, (q, k, v), g)
    assert_rel_close(dq, eq, GRAD_TOL[torch.float64], "dq")
    assert_rel_close(dk, ek, GRAD_TOL[torch.float64], "dk")
    assert_rel_close(dv, ev, GRAD_TOL[torch.float64], "dv")


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

GRADCHECK_CASES = [
    # B, H, L, S, D, Dv, m, key_real, query_real, extra
    Case("masks_uneven", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3, key_real=[9, 5], query_real=[7, 5]),
    Case("masks_uneven_original", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3, key_real=[9, 5], query_real=[7, 5],
         extra={"pinv_init": "original"}),
    Case("cross_short_keys", B=1, H=2, L=9, S=4, D=3, Dv=2, m=3, std=1.5),
    Case("mixed_exact", B=2, H=1, L=8, S=7, D=3, Dv=3, m=4, key_real=[4, 7], query_real=[3, 8],
         extra={"pinv_init": "original"}),
    Case("middle_padding_scale", B=2, H=1, L=8, S=9, D=2, Dv=3, m=3, key_holes=[(2, 5), (0, 1)],
         query_holes=[(6, 8), (1, 2)], extra={"scale": 0.7}),
    Case("one_iteration", B=1, H=2, L=7, S=8, D=3, Dv=2, m=3, extra={"pinv_iterations": 1}),
    Case("zero_iterations", B=1, H=1, L=7, S=8, D=3, Dv=2, m=2, extra={"pinv_iterations": 0}),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: c.id)
def test_gradcheck(case):
    q, k, v, kw = case.build(torch.float64, requires_grad=True)

    def f(q, k, v):
        return nystrom_attention(q, k, v, **kw)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_scripted():
    case = GRADCHECK_CASES[0]
    q, k, v, kw = case.build(torch.float64, requires_grad=True)
    kpm, qpm = kw["key_padding_mask"], kw["query_padding_mask"]

    @torch.jit.script
    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor, qpm: torch.Tensor):
        return torch.ops.nystrom.nystrom_attention(q, k, v, 3, 6, "per_head", kpm, qpm, None)

    torch.testing.assert_close(f(q, k, v, kpm, qpm), nystrom_attention(q, k, v, **kw), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda q, k, v: f(q, k, v, kpm, qpm), (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
@pytest.mark.parametrize(
    "case_id",
    ["both_masks", "middle_padding", "mixed_exact_and_nystrom", "original_init", "long_multi_tile",
     "long_multi_tile_original"],
)
def test_gradients_match_reference(case_id, dtype):
    grads, ref_grads, kw = _grads_and_reference_grads(case_id, dtype)
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert a.dtype == dtype
        assert_rel_close(a, e, GRAD_TOL[dtype], name)
    # padded tokens do not influence the output: their gradients are exactly zero
    kpm, qpm = kw.get("key_padding_mask"), kw.get("query_padding_mask")
    if kpm is not None:
        sel = kpm[:, None, :, None]
        assert torch.count_nonzero(grads[1].masked_select(sel)) == 0
        assert torch.count_nonzero(grads[2].masked_select(sel)) == 0
    if qpm is not None:
        assert torch.count_nonzero(grads[0].masked_select(qpm[:, None, :, None])) == 0


def test_double_backward_is_refused():
    q, k, v, kw = GRADCHECK_CASES[0].build(torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"(?i)double backward|second.order|twice|higher.order|not (implemented|supported)"):
        out = nystrom_attention(q, k, v, **kw)
        (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
        dq.sum().backward()


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck
# ---------------------------------------------------------------------------------------------


def _opcheck_samples(requires_grad):
    case = Case("opcheck", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3, key_real=[9, 5], query_real=[7, 5])
    q, k, v, kw = case.build(torch.float64, requires_grad=requires_grad)
    samples = [ops_args(q, k, v, kw)]
    q2, k2, v2, kw2 = Case("opcheck_nomask", B=1, H=2, L=5, S=6, D=3, Dv=2, m=2).build(
        torch.float32, requires_grad=requires_grad
    )
    kw2.update(pinv_init="original", scale=0.5, pinv_iterations=2)
    samples.append(ops_args(q2, k2, v2, kw2))
    return samples


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_nystrom_attention(requires_grad):
    for args in _opcheck_samples(requires_grad):
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention.default, args)


def test_opcheck_forward_and_backward_ops():
    for args in _opcheck_samples(False):
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention_forward.default, args)
        saved = torch.ops.nystrom.nystrom_attention_forward(*args)
        g = torch.randn_like(saved[0])
        bwd_args = backward_args(g, args, saved)
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention_backward.default, bwd_args)


def test_torch_compile_fullgraph():
    q, k, v, kw = CASE_BY_ID["both_masks"].build(torch.float32, requires_grad=True)

    def f(q, k, v, kpm, qpm):
        return nystrom_attention(q, k, v, 7, key_padding_mask=kpm, query_padding_mask=qpm)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    kpm, qpm = kw["key_padding_mask"], kw["query_padding_mask"]
    out = compiled(q, k, v, kpm, qpm)
    torch.testing.assert_close(out, f(q, k, v, kpm, qpm))
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


# ---------------------------------------------------------------------------------------------
# Consequences of the design
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
def test_padding_is_invisible(dtype):
    """Under per_head, each batch element's output at real tokens equals the call on its real tokens alone."""
    B, H, L, S, D, Dv, m = 3, 2, 37, 53, 19, 23, 7
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype)
    kpm = torch.stack([
        trailing_mask(1, S, [40])[0],
        middle_mask(1, S, [(5, 30)])[0],
        random_mask(1, S, 0.4, torch.Generator().manual_seed(1))[0],
    ])
    qpm = torch.stack([
        middle_mask(1, L, [(0, 6)])[0],
        trailing_mask(1, L, [37])[0],
        random_mask(1, L, 0.4, torch.Generator().manual_seed(2))[0],
    ])
    out = nystrom_attention(q, k, v, m, key_padding_mask=kpm, query_padding_mask=qpm)
    for b in range(B):
        qi, ki = ~qpm[b], ~kpm[b]
        alone = nystrom_attention(q[b:b + 1][:, :, qi], k[b:b + 1][:, :, ki], v[b:b + 1][:, :, ki], m)
        assert_rel_close(out[b:b + 1][:, :, qi], alone, 10 * TOL[dtype] if dtype == torch.float64 else 1e-5,
                         f"batch element {b}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
@pytest.mark.parametrize(
    "B,H,L,S,D,Dv,m,key_real,query_real",
    [
        (2, 3, 16, 16, 8, 8, 16, None, None),
        (2, 3, 11, 17, 5, 7, 17, None, None),
        (2, 2, 30, 30, 6, 5, 12, [12, 9], [12, 4]),  # masks bring every element down to <= m
    ],
    ids=["m_equals_n", "cross_m_equals_S", "masked_down_to_m"],
)
def test_exact_when_m_covers_lengths(B, H, L, S, D, Dv, m, key_real, query_real, dtype):
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype)
    kpm = trailing_mask(B, S, key_real) if key_real else None
    qpm = trailing_mask(B, L, query_real) if query_real else None
    for init in ("per_head", "original"):
        out = nystrom_attention(q, k, v, m, pinv_init=init, key_padding_mask=kpm, query_padding_mask=qpm)
        expected = masked_dense_reference(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
        assert_rel_close(out, expected, TOL[dtype])
        if kpm is None and qpm is None:
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            assert_rel_close(out, sdpa, TOL[dtype])


def test_exact_long_sequences():
    # exact attention on elements longer than one CPU tile (m >= lengths > 512)
    q, k, v = make_qkv(2, 1, 530, 610, 4, 3, std=3.0)
    kpm = trailing_mask(2, 610, [610, 515])
    qpm = trailing_mask(2, 530, [530, 520])
    out = nystrom_attention(q, k, v, 610, key_padding_mask=kpm, query_padding_mask=qpm)
    expected = masked_dense_reference(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
    assert_rel_close(out, expected, TOL[torch.float64])


def test_deterministic_and_thread_count_insensitive():
    q, k, v, kw = CASE_BY_ID["long_multi_tile"].build(torch.float32, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out = nystrom_attention(q, k, v, **kw)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads)
    # The same thread count gives bitwise identical results ...
    for a, b in zip(results[0], results[2]):
        assert torch.equal(a, b), "results must be bitwise reproducible run to run"
    # ... and another thread count may only change the rounding.  (Not bitwise: the BLAS calls inside
    # the kernel block their reductions by thread count.)
    for a, b in zip(results[0], results[1]):
        assert rel_err(b, a) <= 1e-5


def test_not_exact_when_m_is_small():
    # Negative control for the exactness test: with m below the length the result is an approximation.
    q, k, v = make_qkv(2, 3, 16, 16, 8, 8)
    out = nystrom_attention(q, k, v, 15)
    assert rel_err(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) > 1e-6


def test_per_head_does_not_depend_on_the_rest_of_the_batch():
    q, k, v = make_qkv(3, 2, 37, 53, 19, 23)
    q[2] *= 4  # a very different batch element
    out = nystrom_attention(q, k, v, 7)
    torch.testing.assert_close(out[:2], nystrom_attention(q[:2], k[:2], v[:2], 7), rtol=1e-10, atol=1e-10)
    orig = nystrom_attention(q, k, v, 7, pinv_init="original")
    assert rel_err(orig[:2], nystrom_attention(q[:2], k[:2], v[:2], 7, pinv_init="original")) > 1e-8


# ---------------------------------------------------------------------------------------------
# Property-based: random small shapes and masks
# ---------------------------------------------------------------------------------------------

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    hypothesis = None


def _given_random_shapes(f):
    if hypothesis is None:
        return pytest.mark.skip(reason="hypothesis is not installed")(f)
    return hypothesis.settings(max_examples=40, deadline=None, derandomize=True)(hypothesis.given(
        B=st.integers(1, 3),
        H=st.integers(1, 3),
        L=st.integers(1, 23),
        S=st.integers(1, 23),
        D=st.integers(1, 7),
        Dv=st.integers(1, 7),
        m=st.integers(1, 9),
        iterations=st.integers(0, 7),
        pinv_init=st.sampled_from(["per_head", "original"]),
        masked=st.booleans(),
        seed=st.integers(0, 2**16),
    )(f))


@_given_random_shapes
def test_random_shapes_match_reference(B, H, L, S, D, Dv, m, iterations, pinv_init, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, L, S, D, Dv, seed=seed)
    kw = dict(num_landmarks=m, pinv_iterations=iterations, pinv_init=pinv_init)
    if masked:
        kw["key_padding_mask"] = random_mask(B, S, 0.4, gen)
        kw["query_padding_mask"] = torch.rand(B, L, generator=gen) < 0.3
    out = nystrom_attention(q, k, v, **kw)
    assert out.shape == (B, H, L, Dv)
    # Newton–Schulz amplifies rounding when A is nearly singular: 1e-9 relative still catches any bug.
    assert_rel_close(out, nystrom_reference(q, k, v, **kw), 1e-9)


# ---------------------------------------------------------------------------------------------
# Empty inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,L,masks",
    [(0, 5, False), (0, 5, True), (2, 0, False), (2, 0, True)],
    ids=["B0", "B0_masks", "L0", "L0_masks"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
def test_empty(B, L, masks, dtype):
    H, S, D, Dv = 2, 6, 3, 4
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype)
    kw = {}
    if masks:
        kw = dict(key_padding_mask=torch.zeros(B, S, dtype=torch.bool),
                  query_padding_mask=torch.zeros(B, L, dtype=torch.bool))
    out = nystrom_attention(q, k, v, 2, **kw)
    assert out.shape == (B, H, L, Dv) and out.dtype == dtype


@pytest.mark.parametrize("B,L", [(0, 5), (2, 0)], ids=["B0", "L0"])
def test_empty_backward(B, L):
    q, k, v = make_qkv(B, 2, L, 6, 3, 4, dtype=torch.float32, requires_grad=True)
    out = nystrom_attention(q, k, v, 2)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert torch.count_nonzero(k.grad) == 0 and torch.count_nonzero(v.grad) == 0


# ---------------------------------------------------------------------------------------------
# Argument errors
# ---------------------------------------------------------------------------------------------


def _good():
    q, k, v = make_qkv(2, 3, 7, 9, 4, 5, dtype=torch.float32)
    return dict(
        query=q, key=k, value=v, num_landmarks=3, pinv_iterations=6, pinv_init="per_head",
        key_padding_mask=torch.zeros(2, 9, dtype=torch.bool),
        query_padding_mask=torch.zeros(2, 7, dtype=torch.bool), scale=None,
    )


def _all_keys_masked(a):
    a["key_padding_mask"][1] = True


ERROR_CASES = [
    # id, mutation of the good arguments, regex the message must match
    ("query_rank", lambda a: a.update(query=a["query"][0]), r"query"),
    ("key_rank", lambda a: a.update(key=a["key"].unsqueeze(0)), r"key"),
    ("value_rank", lambda a: a.update(value=a["value"][..., 0]), r"value"),
    ("key_batch", lambda a: a.update(key=a["key"][:1]), r"key|batch"),
    ("value_batch", lambda a: a.update(value=a["value"][:1]), r"value|batch"),
    ("key_heads", lambda a: a.update(key=a["key"][:, :2]), r"key|head"),
    ("value_heads", lambda a: a.update(value=a["value"][:, :1]), r"value|head"),
    ("value_length", lambda a: a.update(value=a["value"][:, :, :8]), r"value|key"),
    ("key_dim", lambda a: a.update(key=a["key"][..., :3]), r"key|query"),
    ("key_dtype", lambda a: a.update(key=a["key"].double()), r"key|dtype"),
    ("value_dtype", lambda a: a.update(value=a["value"].half()), r"value|dtype"),
    ("query_int", lambda a: a.update(query=a["query"].long(), key=a["key"].long(), value=a["value"].long()),
     r"query|float|dtype"),
    ("num_landmarks_0", lambda a: a.update(num_landmarks=0), r"num_landmarks"),
    ("num_landmarks_negative", lambda a: a.update(num_landmarks=-3), r"num_landmarks"),
    ("pinv_iterations_negative", lambda a: a.update(pinv_iterations=-1), r"pinv_iterations"),
    ("pinv_init_unknown", lambda a: a.update(pinv_init="exact"), r"pinv_init"),
    ("key_mask_shape", lambda a: a.update(key_padding_mask=torch.zeros(2, 10, dtype=torch.bool)),
     r"key_padding_mask"),
    ("key_mask_rank", lambda a: a.update(key_padding_mask=torch.zeros(2, 1, 9, dtype=torch.bool)),
     r"key_padding_mask"),
    ("key_mask_dtype", lambda a: a.update(key_padding_mask=torch.zeros(2, 9)), r"key_padding_mask"),
    ("query_mask_shape", lambda a: a.update(query_padding_mask=torch.zeros(3, 7, dtype=torch.bool)),
     r"query_padding_mask"),
    ("query_mask_dtype", lambda a: a.update(query_padding_mask=torch.zeros(2, 7, dtype=torch.int64)),
     r"query_padding_mask"),
    ("all_keys_masked", _all_keys_masked, r"key_padding_mask|keys"),
    ("no_keys_at_all", lambda a: a.update(key=a["key"][:, :, :0], value=a["value"][:, :, :0],
                                          key_padding_mask=None), r"key"),
]


@pytest.mark.parametrize("api", ["python", "ops"])
@pytest.mark.parametrize("mutate,pattern", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_argument_errors(mutate, pattern, api):
    a = _good()
    mutate(a)
    if api == "python":
        with pytest.raises((RuntimeError, ValueError, TypeError), match=pattern):
            nystrom_attention(
                a["query"], a["key"], a["value"], a["num_landmarks"], pinv_iterations=a["pinv_iterations"],
                pinv_init=a["pinv_init"], key_padding_mask=a["key_padding_mask"],
                query_padding_mask=a["query_padding_mask"], scale=a["scale"],
            )
    else:
        with pytest.raises(RuntimeError, match=pattern):
            torch.ops.nystrom.nystrom_attention(*a.values())


def test_good_arguments_of_error_tests_are_accepted():
    # The error tests above change one thing of these arguments; they must be valid as they are.
    a = _good()
    out = torch.ops.nystrom.nystrom_attention(*a.values())
    assert out.shape == (2, 3, 7, 5)
