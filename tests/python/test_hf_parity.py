"""Parity with Hugging Face transformers' NystromformerSelfAttention (pinv_init="original").

The HF layer has no masking of landmarks, so parity is checked without padding.
"""

from __future__ import annotations

import pytest
import torch

from helpers import rel_err, to_device

torch_nystrom = pytest.importorskip("torch_nystrom")
modeling = pytest.importorskip("transformers.models.nystromformer.modeling_nystromformer")
from transformers import NystromformerConfig  # noqa: E402

HIDDEN, HEADS, SEQ = 64, 4, 64


def hf_layer(num_landmarks, conv_kernel_size=None, seq_len=SEQ):
    config = NystromformerConfig(
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        num_landmarks=num_landmarks,
        segment_means_seq_len=seq_len,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
        conv_kernel_size=conv_kernel_size if conv_kernel_size is not None else 65,
    )
    torch.manual_seed(7)
    layer = modeling.NystromformerSelfAttention(config).eval()
    if conv_kernel_size is None:
        # Recent transformers reject conv_kernel_size=None in the config; switch the conv off here.
        layer.conv_kernel_size = None
        del layer.conv
    assert layer.init_option == "original"
    return layer


def split_heads(t):
    B, L, _ = t.shape
    return t.view(B, L, HEADS, HIDDEN // HEADS).transpose(1, 2)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("num_landmarks,batch", [(8, 3), (16, 1), (64, 2)], ids=["m8_B3", "m16_B1", "exact_m64"])
def test_functional_matches_hf(num_landmarks, batch, dtype, tol, device):
    layer = hf_layer(num_landmarks).to(dtype)
    x = torch.randn(batch, SEQ, HIDDEN, dtype=dtype)
    with torch.no_grad():
        expected = layer(x)[0]  # transformers on the CPU; the op on the device, on the same projections
        q, k, v = to_device(tuple(split_heads(lin(x)) for lin in (layer.query, layer.key, layer.value)), device)
        out = torch_nystrom.nystrom_attention(q, k, v, num_landmarks, pinv_init="original")
    out = out.transpose(1, 2).reshape(batch, SEQ, HIDDEN)
    assert out.dtype == dtype
    err = rel_err(out, expected)
    assert err <= tol, f"relative error vs transformers {err:.3e} > {tol:.0e}"
    if num_landmarks < SEQ and batch * HEADS > 1:
        # Negative control: per_head initialisation is not what HF computes.
        with torch.no_grad():
            other = torch_nystrom.nystrom_attention(q, k, v, num_landmarks, pinv_init="per_head")
        assert rel_err(other.transpose(1, 2).reshape(batch, SEQ, HIDDEN), expected) > 10 * tol


def test_module_with_conv_matches_hf(device):
    """NystromAttention(conv_kernel_size=3) with HF's weights and an identity out_proj is HF's layer."""
    layer = hf_layer(8, conv_kernel_size=3)
    mod = torch_nystrom.NystromAttention(HIDDEN, HEADS, 8, pinv_init="original", conv_kernel_size=3)
    with torch.no_grad():
        for ours, theirs in ((mod.q_proj, layer.query), (mod.k_proj, layer.key), (mod.v_proj, layer.value)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        mod.conv.weight.copy_(layer.conv.weight)
        mod.out_proj.weight.copy_(torch.eye(HIDDEN))
        mod.out_proj.bias.zero_()
        x = torch.randn(2, SEQ, HIDDEN)
        expected = layer(x)[0]
        out = mod.to(device.torch)(x.to(device.torch))
    err = rel_err(out, expected)
    assert err <= 1e-5, f"relative error vs transformers {err:.3e}"
