"""Checks of the float64 reference itself (no torch_nystrom needed).

The reference is trusted by the op tests, so it is checked here against independent facts: dense
softmax attention where the design says the result is exact, torch.linalg.pinv for the Newton–Schulz
iteration, and Hugging Face transformers' NystromformerSelfAttention (pinv_init "original").
"""

import pytest
import torch

from helpers import make_qkv, middle_mask, rel_err, trailing_mask
from reference import (
    landmarks,
    masked_dense_reference,
    max_column_sum,
    newton_schulz,
    nystrom_reference,
    segment_bounds,
)


# ---------------------------------------------------------------------------------------------
# Segments and landmarks
# ---------------------------------------------------------------------------------------------


def test_segment_bounds_examples():
    assert segment_bounds(10, 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert segment_bounds(12, 3) == [(0, 4), (4, 8), (8, 12)]
    assert segment_bounds(5, 5) == [(i, i + 1) for i in range(5)]
    assert segment_bounds(7, 1) == [(0, 7)]


@pytest.mark.parametrize("n", [1, 2, 7, 16, 37, 53])
def test_segment_bounds_properties(n):
    for m in range(1, n + 1):
        bounds = segment_bounds(n, m)
        assert len(bounds) == m
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[j][1] == bounds[j + 1][0] for j in range(m - 1))
        sizes = [hi - lo for lo, hi in bounds]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        if n % m == 0:
            assert set(sizes) == {n // m}


def test_landmarks_uneven():
    x = torch.arange(5.0, dtype=torch.float64).reshape(1, 5, 1)
    # n=5, m=2: segments [0,2) and [2,5)
    assert torch.equal(landmarks(x, 2).flatten(), torch.tensor([0.5, 3.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Newton–Schulz
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 6), (3, 5), (5, 3)], ids=["square", "wide", "tall"])
def test_newton_schulz_converges_to_pinv(shape):
    a = torch.softmax(2.0 * torch.randn(2, *shape, dtype=torch.float64), dim=-1)
    z = newton_schulz(a, max_column_sum(a), 40)
    assert z.shape == (2, shape[1], shape[0])
    torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=1e-8, atol=1e-8)


def test_newton_schulz_zero_iterations_is_scaled_transpose():
    a = torch.softmax(torch.randn(3, 4, 4, dtype=torch.float64), dim=-1)
    c = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    z = newton_schulz(a, c, 0)
    torch.testing.assert_close(z, a.transpose(-1, -2) / c[:, None, None])


def test_newton_schulz_one_iteration_by_hand():
    a = torch.softmax(torch.randn(1, 3, 3, dtype=torch.float64), dim=-1)
    c = max_column_sum(a)
    z0 = a[0].T / c[0]
    i = torch.eye(3, dtype=torch.float64)
    az = a[0] @ z0
    z1 = 0.25 * z0 @ (13 * i - az @ (15 * i - az @ (7 * i - az)))
    torch.testing.assert_close(newton_schulz(a, c, 1)[0], z1)


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L,S", [(9, 9), (5, 11), (11, 4)])
def test_reference_is_dense_attention_when_m_covers_lengths(L, S):
    q, k, v = make_qkv(2, 3, L, S, 5, 6)
    out = nystrom_reference(q, k, v, num_landmarks=max(L, S))
    torch.testing.assert_close(out, masked_dense_reference(q, k, v), rtol=1e-12, atol=1e-12)


def test_reference_dense_with_masks_and_scale():
    q, k, v = make_qkv(3, 2, 12, 10, 4, 3)
    kpm = trailing_mask(3, 10, [10, 7, 3])
    qpm = middle_mask(3, 12, [(0, 0), (4, 9), (11, 12)])
    out = nystrom_reference(
        q, k, v, 12, key_padding_mask=kpm, query_padding_mask=qpm, scale=0.37
    )
    expected = masked_dense_reference(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, scale=0.37)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(out[qpm[:, None, :, None].expand_as(out)] == 0)


def test_reference_mask_decides_exact_path_per_batch_element():
    # m = 6; element 0 has 5 real tokens (exact), element 1 has 12 (Nyström).
    q, k, v = make_qkv(2, 2, 12, 12, 4, std=2.0)
    mask = trailing_mask(2, 12, [5, 12])
    out = nystrom_reference(q, k, v, 6, key_padding_mask=mask, query_padding_mask=mask)
    dense = masked_dense_reference(q, k, v, key_padding_mask=mask, query_padding_mask=mask)
    torch.testing.assert_close(out[0], dense[0], rtol=1e-12, atol=1e-12)
    assert rel_err(out[1], dense[1]) > 1e-3  # element 1 really is approximated


def test_reference_is_exact_when_every_key_is_a_landmark():
    # S <= m < L: the key landmarks are the keys, so F = softmax(q k^T), Bm = A and F A^+ A v = dense
    # attention once Newton–Schulz has converged.
    q, k, v = make_qkv(2, 2, 10, 4, 3, 5, std=2.0)
    out = nystrom_reference(q, k, v, 4, pinv_iterations=40)
    torch.testing.assert_close(out, masked_dense_reference(q, k, v), rtol=1e-8, atol=1e-8)
    # ... and with the default 6 iterations it is still a good approximation, but not exact.
    approx = nystrom_reference(q, k, v, 4)
    assert 0 < rel_err(approx, masked_dense_reference(q, k, v)) < 0.5


# ---------------------------------------------------------------------------------------------
# pinv_init
# ---------------------------------------------------------------------------------------------


def test_pinv_init_original_equals_per_head_for_a_single_head():
    q, k, v = make_qkv(1, 1, 20, 20, 4)
    a = nystrom_reference(q, k, v, 5, pinv_init="original")
    b = nystrom_reference(q, k, v, 5, pinv_init="per_head")
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_pinv_init_original_couples_batch_elements():
    q, k, v = make_qkv(2, 2, 20, 20, 4)
    q[1] *= 3.0  # sharper softmax in element 1 -> different column sums
    k[1] *= 3.0
    orig = nystrom_reference(q, k, v, 5, pinv_init="original")
    per_head = nystrom_reference(q, k, v, 5, pinv_init="per_head")
    assert rel_err(orig, per_head) > 1e-4
    # per_head of one element does not depend on the rest of the batch; original does.
    alone = nystrom_reference(q[:1], k[:1], v[:1], 5, pinv_init="per_head")
    torch.testing.assert_close(per_head[:1], alone, rtol=1e-13, atol=1e-13)
    alone_orig = nystrom_reference(q[:1], k[:1], v[:1], 5, pinv_init="original")
    assert rel_err(orig[:1], alone_orig) > 1e-6


def test_pinv_init_original_ignores_exact_batch_elements():
    # Element 0 takes the exact path (4 real tokens <= m=5); it must not enter the global max.
    q, k, v = make_qkv(2, 2, 20, 20, 4)
    mask = trailing_mask(2, 20, [4, 20])
    both = nystrom_reference(q, k, v, 5, pinv_init="original", key_padding_mask=mask, query_padding_mask=mask)
    second = nystrom_reference(q[1:], k[1:], v[1:], 5, pinv_init="original")
    torch.testing.assert_close(both[1:], second, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Differentiability
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
def test_reference_is_differentiable(pinv_init):
    q, k, v = make_qkv(2, 2, 7, 5, 3, 2, requires_grad=True)
    kpm = trailing_mask(2, 5, [5, 4])
    qpm = trailing_mask(2, 7, [6, 7])

    def f(q, k, v):
        return nystrom_reference(
            q, k, v, 3, pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm
        )

    assert torch.autograd.gradcheck(f, (q, k, v))


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers (the paper's code path; pinv_init "original")
# ---------------------------------------------------------------------------------------------


def _hf_layer(hidden, heads, landmarks_, seq_len):
    modeling = pytest.importorskip("transformers.models.nystromformer.modeling_nystromformer")
    from transformers import NystromformerConfig

    config = NystromformerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_landmarks=landmarks_,
        segment_means_seq_len=seq_len,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    # Recent transformers validate conv_kernel_size as an int, so None cannot go through the config:
    # build the layer and switch its convolution skip off afterwards.
    layer = modeling.NystromformerSelfAttention(config).eval()
    layer.conv_kernel_size = None
    del layer.conv
    assert layer.init_option == "original"
    return layer


def _split_heads(x, heads):
    B, L, E = x.shape
    return x.view(B, L, heads, E // heads).transpose(1, 2)


@pytest.mark.parametrize("landmarks_", [8, 64], ids=["nystrom", "exact"])
def test_reference_matches_huggingface(landmarks_):
    B, L, E, H = 3, 64, 64, 4
    layer = _hf_layer(E, H, landmarks_, L).double()
    x = torch.randn(B, L, E, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)[0]
        q = _split_heads(layer.query(x), H)
        k = _split_heads(layer.key(x), H)
        v = _split_heads(layer.value(x), H)
        out = nystrom_reference(q, k, v, landmarks_, pinv_init="original")
    out = out.transpose(1, 2).reshape(B, L, E)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    if landmarks_ < L:
        # Negative control: "per_head" is a different function once the batch has several heads.
        with torch.no_grad():
            other = nystrom_reference(q, k, v, landmarks_, pinv_init="per_head")
        assert rel_err(other.transpose(1, 2).reshape(B, L, E), expected) > 1e-6
