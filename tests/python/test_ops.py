"""The forward of the ops on every test device against the float64 reference (tests/python/reference.py),
which runs on the CPU from the same input values.

The cases (tests/python/cases.py) run on every device. Tolerances are relative to the largest output entry:
float64 1e-10 (1e-9 above 64 landmarks, where Newton–Schulz amplifies rounding), float32 1e-4 or 20x the
error of the same math done in float32 where that is larger, float16 / bfloat16 see helpers.check_low_precision.
Gradients: test_gradients.py.
"""

from __future__ import annotations

import pytest
import torch

from cases import CASE, CASES
from helpers import (FLOAT_IDS, TOL, assert_rel_close, base_tolerance, check_low_precision, check_padded_rows_zero,
                     expected_output, float32_tolerance, make_qkv, middle_mask, ops_args, random_mask, reference,
                     rel_err, to_device, trailing_mask)
from reference import landmarks, masked_dense_reference, max_column_sum, nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

FLOATS = [torch.float64, torch.float32]
HALFS = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS.get)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case, dtype, device):
    q, k, v, kw = case.build(dtype, device)
    before = [t.clone() for t in (q, k, v)]
    out = nystrom_attention(q, k, v, **kw)
    assert out.device.type == device.type and out.dtype == dtype
    assert out.shape == case.out_shape
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0), "inputs must not be modified"
    ref, tol = expected_output(q, k, v, kw, dtype)
    assert_rel_close(out, ref, tol)
    check_padded_rows_zero(out, kw)


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
@pytest.mark.parametrize("iterations", [0, 1, 6, 13])
@pytest.mark.parametrize("case_id", ["both_masks", "d7_m17_random_masks", "d200_m129_query_original"])
@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS.get)
def test_pinv_iterations_and_init(dtype, case_id, iterations, pinv_init, device):
    q, k, v, kw = CASE[case_id].build(dtype, device)
    kw.update(pinv_iterations=iterations, pinv_init=pinv_init)
    out = nystrom_attention(q, k, v, **kw)
    ref, tol = expected_output(q, k, v, kw, dtype)
    assert_rel_close(out, ref, tol)


@pytest.mark.parametrize("case_id", ["both_masks", "d96_m100_middle_original"])
def test_pinv_init_changes_the_result(case_id, device):
    # Negative control for the test above: the two inits really differ on this batch.
    q, k, v, kw = CASE[case_id].build(torch.float64, device)
    kw.pop("pinv_init", None)
    a = nystrom_attention(q, k, v, **kw, pinv_init="original")
    b = nystrom_attention(q, k, v, **kw, pinv_init="per_head")
    assert rel_err(a, b) > 1e-6


def test_iterations_change_the_result(device):
    q, k, v, kw = CASE["cross_dv"].build(torch.float64, device)
    a = nystrom_attention(q, k, v, **kw, pinv_iterations=1)
    b = nystrom_attention(q, k, v, **kw, pinv_iterations=6)
    assert rel_err(a, b) > 1e-6


def test_default_arguments(device):
    # num_landmarks=64, pinv_iterations=6, pinv_init="per_head", scale=D**-0.5
    q, k, v = make_qkv(2, 2, 101, 83, 5, 6)
    out = nystrom_attention(*to_device((q, k, v), device))
    ref = nystrom_reference(q, k, v, 64, pinv_iterations=6, pinv_init="per_head", scale=5 ** -0.5)
    assert_rel_close(out, ref, TOL[torch.float64])


# ---------------------------------------------------------------------------------------------
# Exact attention when the landmarks cover the lengths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS.get)
@pytest.mark.parametrize(
    "B,H,L,S,D,Dv,m,key_real,query_real",
    [
        (2, 3, 16, 16, 8, 8, 16, None, None),
        (2, 3, 11, 17, 5, 7, 17, None, None),
        (2, 2, 30, 30, 6, 5, 12, [12, 9], [12, 4]),  # masks bring every element down to <= m
        (1, 2, 100, 120, 256, 255, 128, None, None),  # largest head dims
        (2, 1, 530, 610, 4, 3, 610, [610, 515], [530, 520]),  # longer than one CPU tile (512)
    ],
    ids=["m_equals_n", "cross_m_equals_S", "masked_down_to_m", "d256", "long"],
)
def test_exact_when_m_covers_lengths(B, H, L, S, D, Dv, m, key_real, query_real, dtype, device):
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype)
    kpm = trailing_mask(B, S, key_real) if key_real else None
    qpm = trailing_mask(B, L, query_real) if query_real else None
    expected = masked_dense_reference(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
    qd, kd, vd, kw = to_device((q, k, v, dict(key_padding_mask=kpm, query_padding_mask=qpm)), device)
    for init in ("per_head", "original"):
        out = nystrom_attention(qd, kd, vd, m, pinv_init=init, **kw)
        assert_rel_close(out, expected, TOL[dtype])
    if kpm is None and qpm is None:
        assert_rel_close(out, torch.nn.functional.scaled_dot_product_attention(qd, kd, vd), TOL[dtype])


def test_not_exact_when_m_is_small(device):
    # Negative control for the exactness test: with m below the length the result is an approximation.
    q, k, v = to_device(make_qkv(2, 3, 16, 16, 8, 8), device)
    out = nystrom_attention(q, k, v, 15)
    assert rel_err(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) > 1e-6


# ---------------------------------------------------------------------------------------------
# Consequences of the design
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,S,D,m", [(37, 53, 19, 7), (301, 333, 40, 17), (301, 333, 40, 129)],
                         ids=["small_m7", "m17", "m129"])
@pytest.mark.parametrize("dtype", FLOATS, ids=FLOAT_IDS.get)
def test_padding_is_invisible(dtype, L, S, D, m, device):
    """Under per_head, each batch element's output at real tokens equals the call on its real tokens alone."""
    B, H, Dv = 3, 2, 23
    q, k, v = to_device(make_qkv(B, H, L, S, D, Dv, dtype=dtype), device)
    kpm = torch.stack([trailing_mask(1, S, [S - 13])[0], middle_mask(1, S, [(5, 30)])[0],
                       random_mask(1, S, 0.3, torch.Generator().manual_seed(1))[0]])
    qpm = torch.stack([middle_mask(1, L, [(0, 6)])[0], trailing_mask(1, L, [L])[0],
                       random_mask(1, L, 0.3, torch.Generator().manual_seed(2))[0]])
    kw = to_device(dict(key_padding_mask=kpm, query_padding_mask=qpm), device)
    out = nystrom_attention(q, k, v, m, **kw)
    tol = 1e-10
    if dtype == torch.float32:
        ref64, _ = reference(q, k, v, dict(num_landmarks=m, **kw))
        ref32, _ = reference(q, k, v, dict(num_landmarks=m, **kw), compute_dtype=dtype)
        tol = float32_tolerance(1e-5, ref32, ref64)
    for b in range(B):
        qi, ki = (~kw["query_padding_mask"][b]), (~kw["key_padding_mask"][b])
        alone = nystrom_attention(q[b:b + 1][:, :, qi], k[b:b + 1][:, :, ki], v[b:b + 1][:, :, ki], m)
        assert_rel_close(out[b:b + 1][:, :, qi], alone, tol, f"batch element {b}")


@pytest.mark.parametrize("m", [7, 17, 100])
def test_per_head_does_not_depend_on_the_rest_of_the_batch(m, device):
    q, k, v = make_qkv(3, 2, 150, 170, 19, 23)
    q[2] *= 4  # a very different batch element
    q, k, v = to_device((q, k, v), device)
    out = nystrom_attention(q, k, v, m)
    # (a device may split the work differently for 2 elements than for 3: rounding only)
    assert_rel_close(out[:2], nystrom_attention(q[:2], k[:2], v[:2], m), 1e-10)
    orig = nystrom_attention(q, k, v, m, pinv_init="original")
    assert rel_err(orig[:2], nystrom_attention(q[:2], k[:2], v[:2], m, pinv_init="original")) > 1e-8


# ---------------------------------------------------------------------------------------------
# Strides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,D,m", [(37, 19, 7), (237, 64, 17), (237, 64, 100)], ids=["small", "d64_m17", "d64_m100"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
def test_non_contiguous_fused_qkv(dtype, L, D, m, device):
    B, H = 2, 3
    qkv = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(3)).to(dtype).to(device.torch)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, no copy
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    mask = trailing_mask(B, L, [L, L * 5 // 8]).to(device.torch)
    kw = dict(num_landmarks=m, key_padding_mask=mask, query_padding_mask=mask)
    out = nystrom_attention(q, k, v, **kw)
    contiguous = nystrom_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert_rel_close(out, contiguous, {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2))
    if dtype != torch.bfloat16:
        ref, tol = expected_output(q, k, v, kw, dtype)
        assert_rel_close(out, ref, tol)


@pytest.mark.parametrize("L,S,m", [(37, 53, 7), (137, 153, 70)], ids=["small_m7", "m70"])
def test_non_contiguous_cross_broadcast_and_masks(L, S, m, device):
    """Transposed storage, a key shared by all heads with a stride-0 expand, every other feature of the value,
    non-contiguous and stride-0 masks; forward and gradients."""
    B, H, D = 2, 3, 19
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, L, H, D, dtype=torch.float64, generator=g).to(device.torch).transpose(1, 2)
    kb = torch.randn(B, 1, S, D, dtype=torch.float64, generator=g).to(device.torch).requires_grad_(True)
    k = kb.expand(B, H, S, D)
    v = torch.randn(B, S, H, 2 * D, dtype=torch.float64, generator=g).to(device.torch)[..., ::2].transpose(1, 2)
    q.requires_grad_(True)
    kpm = trailing_mask(B, 2 * S, [2 * S, S + 8]).to(device.torch)[:, ::2]
    qpm = torch.zeros(1, L, dtype=torch.bool, device=device.torch).expand(B, L)
    assert not (kpm.is_contiguous() or q.is_contiguous() or v.is_contiguous())
    kw = dict(num_landmarks=m, key_padding_mask=kpm, query_padding_mask=qpm)
    out = nystrom_attention(q, k, v, **kw)
    ref, tol = expected_output(q, k, v, kw, torch.float64)
    assert_rel_close(out, ref, tol)
    gout = torch.randn(out.shape, dtype=torch.float64, generator=g).to(device.torch)
    dq, dkb = torch.autograd.grad(out, (q, kb), gout)
    q64, kb64 = (t.detach().cpu().requires_grad_(True) for t in (q, kb))
    ref = nystrom_reference(q64, kb64.expand(B, H, S, D), v.cpu(), **to_device(kw, "cpu"))
    eq, ekb = torch.autograd.grad(ref, (q64, kb64), gout.cpu())
    tol = base_tolerance(torch.float64, m, grad=True)
    assert_rel_close(dq, eq, tol, "dq")
    assert_rel_close(dkb, ekb, tol, "dk (summed over the expanded heads)")


# ---------------------------------------------------------------------------------------------
# Low precision
# ---------------------------------------------------------------------------------------------

HALF_IDS = ["both_masks", "mixed_exact_and_nystrom", "original_init", "long_multi_tile", "d7_m17_random_masks",
            "d64_m64_cross", "d96_m100_middle_original", "d128_m128_random_key", "d256_m256_masks", "long_tiles",
            "tc_d64_m64", "tc_d128_m17_cross", "tc_d64_dv128", "tc_d128_dv64"]


@pytest.mark.parametrize("dtype", HALFS, ids=FLOAT_IDS.get)
@pytest.mark.parametrize("case_id", HALF_IDS)
def test_low_precision(case_id, dtype, device):
    """Half inputs, float32 statistics (DESIGN.md): the error against the float64 reference on the same half
    inputs is bounded by that of the plain half-precision composition, and on a float32-arithmetic device by
    the error of rounding the exact result (helpers.check_low_precision)."""
    q, k, v, kw = CASE[case_id].build(dtype, device)
    out = nystrom_attention(q, k, v, **kw)
    assert out.shape == CASE[case_id].out_shape
    ref, _ = reference(q, k, v, kw)
    plain, _ = reference(q, k, v, kw, compute_dtype=dtype)
    check_low_precision(out, ref, plain, dtype, device)
    check_padded_rows_zero(out, kw)


# ---------------------------------------------------------------------------------------------
# The op entry points
# ---------------------------------------------------------------------------------------------


def test_torch_ops_entry_point_matches_python_wrapper(device):
    q, k, v, kw = CASE["original_init"].build(torch.float64, device)
    kw["scale"] = 0.3
    a = nystrom_attention(q, k, v, **kw)
    b = torch.ops.nystrom.nystrom_attention(*ops_args(q, k, v, kw))
    assert torch.equal(a, b)


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
def test_forward_op_outputs(pinv_init, device):
    q, k, v, kw = CASE["cross_dv"].build(torch.float64, device)
    kw["pinv_init"] = pinv_init
    res = torch.ops.nystrom.nystrom_attention_forward(*ops_args(q, k, v, kw))
    assert len(res) == 8
    out, q_lm, k_lm, bv, zbv, lse_q, lse_lm, pinv_scale = (t.cpu() for t in res)
    assert_rel_close(out, reference(q, k, v, kw)[0], TOL[torch.float64])
    assert q_lm.shape == (2, 3, 7, 19) and k_lm.shape == (2, 3, 7, 19)
    assert bv.shape == (2, 3, 7, 23) and zbv.shape == (2, 3, 7, 23)
    assert lse_q.shape == (2, 3, 37) and lse_lm.shape == (2, 3, 7)
    assert pinv_scale.shape == (2, 3)
    # landmarks are segment means, pinv_scale is the c of Z0 = A^T / c
    q, k = q.cpu(), k.cpu()
    c = []
    for b in range(2):
        torch.testing.assert_close(q_lm[b], landmarks(q[b], 7), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k_lm[b], landmarks(k[b], 7), rtol=1e-12, atol=1e-12)
        a = torch.softmax(19 ** -0.5 * landmarks(q[b], 7) @ landmarks(k[b], 7).transpose(-1, -2), dim=-1)
        c.append(max_column_sum(a))
    c = torch.stack(c)
    if pinv_init == "original":
        c = c.max().expand(2, 3)
    torch.testing.assert_close(pinv_scale.double(), c, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Property-based: random shapes and masks
# ---------------------------------------------------------------------------------------------

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    hypothesis = None


def _given_random_shapes(f):
    if hypothesis is None:
        return pytest.mark.skip(reason="hypothesis is not installed")(f)

    @st.composite
    def shapes(draw):
        """Small shapes (m up to 9), or larger ones with m on both sides of the CUDA Newton–Schulz limits."""
        large = draw(st.booleans())
        n, d = (150, 40) if large else (23, 7)
        ms = st.sampled_from([1, 3, 17, 64, 65, 100, 129]) if large else st.integers(1, 9)
        return dict(B=draw(st.integers(1, 3)), H=draw(st.integers(1, 3)), L=draw(st.integers(1, n)),
                    S=draw(st.integers(1, n)), D=draw(st.integers(1, d)), Dv=draw(st.integers(1, d)), m=draw(ms))

    return hypothesis.settings(max_examples=60, deadline=None, derandomize=True)(hypothesis.given(
        shape=shapes(), iterations=st.integers(0, 7), pinv_init=st.sampled_from(["per_head", "original"]),
        masked=st.booleans(), seed=st.integers(0, 2**16),
    )(f))


@_given_random_shapes
def test_random_shapes_match_reference(device, shape, iterations, pinv_init, masked, seed):
    B, H, L, S, D, Dv, m = (shape[n] for n in ("B", "H", "L", "S", "D", "Dv", "m"))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, L, S, D, Dv, seed=seed)
    kw = dict(num_landmarks=m, pinv_iterations=iterations, pinv_init=pinv_init)
    if masked:
        kw["key_padding_mask"] = random_mask(B, S, 0.4, gen)
        kw["query_padding_mask"] = torch.rand(B, L, generator=gen) < 0.3
    out = nystrom_attention(*to_device((q, k, v), device), **to_device(kw, device))
    assert out.shape == (B, H, L, Dv)
    # Newton–Schulz amplifies rounding when A is nearly singular: 1e-9 relative still catches any bug.
    assert_rel_close(out, nystrom_reference(q, k, v, **kw), 1e-9)
