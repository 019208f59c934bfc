"""Autocast (registered in C++ at AutocastCPU/AutocastCUDA): the op runs in the autocast dtype."""
import pytest
import torch

torch_nystrom = pytest.importorskip("torch_nystrom")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_autocast_runs_in_autocast_dtype(dtype):
    q, k, v = (torch.randn(2, 3, 45, 16) for _ in range(3))
    pad = torch.zeros(2, 45, dtype=torch.bool)
    pad[1, 30:] = True
    with torch.autocast("cpu", dtype=dtype):
        out = torch_nystrom.nystrom_attention(q, k, v, 8, key_padding_mask=pad, query_padding_mask=pad)
    assert out.dtype == dtype
    # Same as casting by hand: autocast only changes the input dtype.
    manual = torch_nystrom.nystrom_attention(q.to(dtype), k.to(dtype), v.to(dtype), 8,
                                             key_padding_mask=pad, query_padding_mask=pad)
    assert torch.equal(out, manual)


def test_cpu_autocast_backward_reaches_float32_leaves():
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch_nystrom.nystrom_attention(q, k, v, 5)
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


def test_autocast_leaves_float64_alone():
    q = torch.randn(1, 1, 20, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch_nystrom.nystrom_attention(q, q, q, 3)
    assert out.dtype == torch.float64


def test_autocast_in_scripted_module():
    layer = torch_nystrom.NystromAttention(16, 2, 4).eval()
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = layer(x)
        script = scripted(x)
    assert eager.dtype == torch.bfloat16
    torch.testing.assert_close(script, eager)
