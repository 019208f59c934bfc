"""Autocast (registered in C++ at AutocastCPU / AutocastCUDA) on every test device: the op runs in the
autocast dtype, exactly as if the inputs had been cast by hand; float64 is left alone."""

import pytest
import torch

from helpers import FLOAT_IDS, assert_same, make_qkv, to_device, trailing_mask

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("m", [8, 17, 100])
def test_autocast_runs_in_autocast_dtype(m, dtype, device):
    q, k, v = (t.to(device.torch).requires_grad_(True) for t in make_qkv(2, 3, 145, 130, 64, 64, dtype=torch.float32))
    pad = trailing_mask(2, 145, [145, 100]).to(device.torch)
    kpad = pad[:, :130]
    with torch.autocast(device.type, dtype=dtype):
        out = nystrom_attention(q, k, v, m, key_padding_mask=kpad, query_padding_mask=pad)
    assert out.dtype == dtype
    # autocast only changes the input dtype
    manual = nystrom_attention(q.to(dtype), k.to(dtype), v.to(dtype), m, key_padding_mask=kpad,
                               query_padding_mask=pad)
    assert_same([out], [manual], "autocast vs cast by hand", device.bitwise, torch.finfo(dtype).eps)
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    # the forward op of half inputs: output in that dtype, softmax statistics in float32
    res = torch.ops.nystrom.nystrom_attention_forward(q.detach().to(dtype), k.detach().to(dtype),
                                                      v.detach().to(dtype), m, 6, "per_head", kpad, pad, None)
    assert res[0].dtype == dtype
    assert res[5].dtype == torch.float32 and res[6].dtype == torch.float32, (res[5].dtype, res[6].dtype)


def test_autocast_leaves_float64_alone(device):
    q = torch.randn(1, 1, 90, 4, dtype=torch.float64, device=device.torch)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = nystrom_attention(q, q, q, 70)
    assert out.dtype == torch.float64


def test_autocast_in_scripted_module(device):
    layer = to_device(torch_nystrom.NystromAttention(16, 2, 4).eval(), device)
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 30, 16).to(device.torch)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        eager = layer(x)
        script = scripted(x)
    assert eager.dtype == torch.bfloat16
    torch.testing.assert_close(script, eager)
