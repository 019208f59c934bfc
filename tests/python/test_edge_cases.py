"""Valid edge cases on every test device, against the float64 reference (tests/python/reference.py): degenerate
shapes, landmarks covering some elements and not others, expanded and non-contiguous inputs and masks, padding
at the start / middle / end, every query masked, non-finite values in the padding, very large logits.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import (FLOAT_IDS, assert_rel_close, assert_same, check_padded_rows_zero, cotangent, make_qkv,
                     middle_mask, to_device, torch_device)
from reference import nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

# Small problems whose float64 references dominate: one intra-op thread is fastest and steady on a busy
# machine (conftest.py). The CPU backward at several threads: test_hardening.py (thread counts, concurrency).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

F64_TOL = 1e-9  # float64 op vs float64 reference (Newton–Schulz amplifies rounding on near-singular A)
F64_GRAD_TOL = 1e-7


def from_leaves(*tensors, build=None):
    """make(device): float64 leaf copies of the CPU tensors on the device, and q, k, v = build(*leaves) (by
    default the leaves themselves). The same values on every device."""
    def make(dev):
        leaves = [t.detach().to(torch_device(dev)).requires_grad_(True) for t in tensors]
        return leaves, (build(*leaves) if build else leaves)
    return make


def check_against_reference(device, make, kw, grads=True, tol=F64_TOL, grad_tol=F64_GRAD_TOL, seed=0):
    """The op on the device against the reference on the CPU, both at the inputs make(device) builds (see
    from_leaves); with grads also the gradients of the leaves. Returns the op's output (on the device)."""
    cpu_leaves, (q, k, v) = make("cpu")
    dev_leaves, qkv = make(device)
    out = nystrom_attention(*qkv, **to_device(kw, device))
    ref = nystrom_reference(q, k, v, **kw)
    assert out.shape == ref.shape
    assert_rel_close(out, ref, tol)
    if grads:
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
        got = torch.autograd.grad(out, dev_leaves, g.to(device.torch))
        want = torch.autograd.grad(ref, cpu_leaves, g)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_rel_close(a, b, grad_tol, f"gradient of input {i}")
    return out


@pytest.mark.parametrize(
    "B,H,L,S,D,Dv,m",
    [
        (2, 2, 1, 10, 3, 4, 3),  # L = 1: one query, Nyström path (S_b > m) with one query landmark
        (2, 2, 1, 1, 3, 4, 3),  # L = S = 1: exact
        (2, 2, 10, 1, 3, 4, 3),  # S = 1: one key landmark
        (2, 3, 9, 11, 5, 2, 1),  # m = 1: A is 1x1
        (2, 3, 600, 530, 3, 2, 1),  # m = 1 over several tiles
        (2, 2, 9, 11, 5, 3, 11),  # m = max(L, S): exact
        (2, 2, 9, 11, 5, 3, 12),  # m > L, S: exact
        (1, 1, 13, 13, 1, 1, 4),  # D = Dv = 1
    ],
    ids=["L1", "L1_S1", "S1", "m1", "m1_multi_tile", "m_eq_n", "m_gt_n", "D1_Dv1"],
)
def test_small_and_degenerate_shapes(B, H, L, S, D, Dv, m, device):
    q, k, v = make_qkv(B, H, L, S, D, Dv, seed=3)
    out = check_against_reference(device, from_leaves(q, k, v), dict(num_landmarks=m))
    if m >= max(L, S):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert_rel_close(out, expected, 1e-12, "exact attention")


def test_num_landmarks_far_above_the_lengths_is_exact_attention(device):
    q, k, v = make_qkv(1, 1, 5, 6, 4, 3)
    out = nystrom_attention(*to_device((q, k, v), device), 2**40)
    assert_rel_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), 1e-12)
    # The saved per-landmark tensors have min(num_landmarks, max(L, S)) rows, not num_landmarks.
    saved = torch.ops.nystrom.nystrom_attention_forward(*to_device((q, k, v), device), 2**40, 6, "per_head",
                                                        None, None, None)
    assert saved[1].shape == (1, 1, 6, q.shape[-1])


def test_m_ge_n_per_element_with_masks(device):
    """m covers some elements (exact) and not others (Nyström) in one batch."""
    q, k, v = make_qkv(3, 2, 12, 12, 4, 3, seed=4)
    kpm = torch.zeros(3, 12, dtype=torch.bool)
    kpm[0, 5:] = True
    qpm = torch.zeros(3, 12, dtype=torch.bool)
    qpm[0, 4:] = True
    qpm[2, :11] = True  # one query left, 12 keys > m
    check_against_reference(device, from_leaves(q, k, v),
                            dict(num_landmarks=5, key_padding_mask=kpm, query_padding_mask=qpm))


def test_expanded_inputs(device):
    """Stride-0 inputs: the same query for every head, the same key/value for every batch element."""
    g = torch.Generator().manual_seed(5)
    qb = torch.randn(2, 1, 40, 6, dtype=torch.float64, generator=g)
    kb = torch.randn(1, 3, 50, 6, dtype=torch.float64, generator=g)
    vb = torch.randn(1, 3, 1, 4, dtype=torch.float64, generator=g)
    vn = torch.randn(1, 3, 50, 4, dtype=torch.float64, generator=g)

    def expanded(qb, kb, vb, plus_noise):
        v = vb.expand(2, 3, 50, 4)  # expanded rows of v; with the noise added, a contiguous sum
        return qb.expand(2, 3, 40, 6), kb.expand(2, 3, 50, 6), v + vn.to(v.device) if plus_noise else v

    for plus_noise in (True, False):
        make = from_leaves(qb, kb, vb, build=lambda *t: expanded(*t, plus_noise))
        check_against_reference(device, make, dict(num_landmarks=7))


def test_non_contiguous_inputs(device):
    g = torch.Generator().manual_seed(6)
    # transposed storage, every other row, a slice of the feature dimension
    raw = (torch.randn(2, 3, 5, 37, dtype=torch.float64, generator=g),
           torch.randn(2, 3, 106, 4, dtype=torch.float64, generator=g),
           torch.randn(3, 2, 53, 12, dtype=torch.float64, generator=g))

    def views(q, k, v):
        return q.transpose(-1, -2)[..., :, :4], k[:, :, ::2], v.permute(1, 0, 2, 3)[..., 1::2]  # (2,3,37|53,4|6)

    kw = dict(num_landmarks=6, key_padding_mask=middle_mask(2, 53, [(3, 9), (40, 53)]))
    out = check_against_reference(device, from_leaves(*raw, build=views), kw)
    q, k, v = views(*to_device(raw, device))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    contiguous = nystrom_attention(q.contiguous(), k.contiguous(), v.contiguous(), **to_device(kw, device))
    assert_rel_close(out, contiguous, 1e-13)


def test_non_contiguous_masks(device):
    q, k, v = make_qkv(2, 2, 9, 12, 3, 4, seed=7)
    kpm = torch.zeros(12, 2, dtype=torch.bool)
    kpm[3:6, 0] = True
    kpm[10:, 1] = True
    kpm = kpm.to(device.torch).T  # non-contiguous (B, S)
    qpm = torch.zeros(1, 9, dtype=torch.bool, device=device.torch).expand(2, 9)  # stride 0 along B
    kw = dict(num_landmarks=4, key_padding_mask=kpm, query_padding_mask=qpm)
    out = nystrom_attention(*to_device((q, k, v), device), **kw)
    assert_rel_close(out, nystrom_reference(q, k, v, **to_device(kw, "cpu")), F64_TOL)


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
def test_padding_in_the_middle(pinv_init, device):
    q, k, v = make_qkv(3, 2, 45, 60, 5, 4, seed=9)
    kpm = middle_mask(3, 60, [(10, 30), (0, 1), (59, 60)])
    qpm = middle_mask(3, 45, [(20, 21), (5, 40), (0, 0)])
    kw = dict(num_landmarks=6, pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm)
    out = check_against_reference(device, from_leaves(q, k, v), kw)
    check_padded_rows_zero(out, to_device(kw, device))


def test_zero_queries_and_zero_keys(device):
    """S = 0 is refused only when there are queries."""
    q, k, v = to_device(make_qkv(2, 2, 0, 0, 3, 4), device)
    assert nystrom_attention(q, k, v, 2).shape == (2, 2, 0, 4)


@pytest.mark.parametrize("L,S,m", [(6, 8, 2), (70, 80, 20)])
def test_every_query_masked(L, S, m, device):
    q, k, v = (t.to(device.torch).requires_grad_(True) for t in make_qkv(2, 2, L, S, 3, 4))
    qpm = torch.ones(2, L, dtype=torch.bool, device=device.torch)
    out = nystrom_attention(q, k, v, m, query_padding_mask=qpm)
    assert torch.count_nonzero(out) == 0
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.count_nonzero(t.grad) == 0


# ---------------------------------------------------------------------------------------------
# Non-finite values in the padding, very large logits
# ---------------------------------------------------------------------------------------------


def _poison(x, mask, values):
    """x (on the CPU) with the rows of padded positions (mask (B, n), True = padding) set to values (cycled)."""
    y = x.clone()
    for i, (b, r) in enumerate(mask.nonzero().tolist()):
        y[b, :, r] = values[i % len(values)]
    return y


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("m,pinv_init", [(4, "per_head"), (4, "original"), (70, "per_head"), (128, "per_head")],
                         ids=["nystrom", "nystrom_original", "nystrom_m70", "exact"])
def test_non_finite_values_in_padding_do_not_leak(m, pinv_init, dtype, device):
    """NaN and Inf at padded positions of q, k, v reach neither the outputs nor the gradients of real tokens:
    outputs and gradients at real positions equal those of the clean call (bitwise where the device's
    results are, helpers.Device.bitwise), gradients at padded positions are exactly 0."""
    B, H, L, S, D, Dv = 2, 2, 97, 111, 5, 3
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype, seed=10)
    kpm = middle_mask(B, S, [(3, 9), (90, 111)])
    qpm = middle_mask(B, L, [(0, 2), (17, 25)])
    bad = [math.nan, math.inf, -math.inf]
    dirty = [_poison(t, msk, bad).to(device.torch).requires_grad_(True) for t, msk in ((q, qpm), (k, kpm), (v, kpm))]
    clean = [t.to(device.torch).requires_grad_(True) for t in (q, k, v)]
    kw = to_device(dict(num_landmarks=m, pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm), device)
    g = cotangent((B, H, L, Dv), dtype, device)
    out_dirty = nystrom_attention(*dirty, **kw)
    out_clean = nystrom_attention(*clean, **kw)
    same = 1e-2 if dtype == torch.bfloat16 else 1e-6
    assert torch.isfinite(out_dirty).all()
    assert_same([out_dirty], [out_clean], "output changed by values in the padding", device.bitwise, same)
    out_dirty.backward(g)
    out_clean.backward(g)
    for name, d, c, mask in (("query", dirty[0], clean[0], qpm), ("key", dirty[1], clean[1], kpm),
                             ("value", dirty[2], clean[2], kpm)):
        padded = mask.to(device.torch)[:, None, :, None].expand_as(d.grad)
        assert torch.isfinite(d.grad).all(), f"non-finite gradient of {name}"
        assert torch.count_nonzero(d.grad[padded]) == 0, f"gradient of {name} at padded positions must be 0"
        assert_same([d.grad], [c.grad], f"gradient of {name} changed by values in the padding", device.bitwise, same)


def test_large_magnitude_inputs_match_reference(device):
    """Logits of ~1e4 (sharp softmax) must not overflow: the softmax statistics are shifted."""
    q, k, v = make_qkv(2, 2, 50, 70, 8, 3, std=40.0, seed=11)
    out = nystrom_attention(*(t.float().to(device.torch) for t in (q, k, v)), 5)
    assert torch.isfinite(out).all()
    check_against_reference(device, from_leaves(q, k, v), dict(num_landmarks=5), tol=1e-7, grad_tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("m", [5, 100])
def test_large_magnitude_inputs_stay_finite(m, dtype, device):
    """Logits of ~1e4 in every dtype: output and gradients finite. (The fused CPU backward once gave NaN here:
    its padding landmark columns saturated exp(-lse) and met the zero rows of the packed operands.)"""
    q, k, v = make_qkv(2, 2, 150, 170, 8, 3, std=40.0, seed=11)
    args = [t.to(dtype).to(device.torch).requires_grad_(True) for t in (q, k, v)]
    out = nystrom_attention(*args, m)
    assert torch.isfinite(out).all(), f"m={m} {dtype}: non-finite output"
    out.backward(torch.ones_like(out))
    for name, t in zip("qkv", args):
        assert torch.isfinite(t.grad).all(), f"m={m} {dtype}: non-finite gradient of {name}"
