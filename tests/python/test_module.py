"""torch_nystrom.NystromAttention: the nn.Module self-attention layer, on every test device (inputs drawn on the
CPU; the float64 reference, the layer written out with tests/python/reference.py, runs on the CPU)."""

from __future__ import annotations

import io

import pytest
import torch

from helpers import assert_rel_close, middle_mask, to_device, trailing_mask
from reference import nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")
NystromAttention = torch_nystrom.NystromAttention

E, H, M = 48, 4, 7  # head dim 12
L = 37


def make_module(conv=None, pinv_init="per_head", iterations=6, bias=True, dtype=torch.float32, m=M, device="cpu"):
    """The layer with the same parameters whatever the device (made on the CPU from one seed, then moved)."""
    torch.manual_seed(1234)
    mod = NystromAttention(E, H, m, pinv_iterations=iterations, pinv_init=pinv_init, conv_kernel_size=conv, bias=bias)
    return to_device(mod.to(dtype), device)


def manual_forward(mod, x, mask, attention, *, m=M, pinv_init="per_head", iterations=6):
    """The layer written out from its specification, with `attention` the attention function."""
    B, L_, _ = x.shape
    Dh = E // H

    def heads(t):
        return t.view(B, L_, H, Dh).transpose(1, 2)

    q, k, v = heads(mod.q_proj(x)), heads(mod.k_proj(x)), heads(mod.v_proj(x))
    o = attention(q, k, v, m, pinv_iterations=iterations, pinv_init=pinv_init,
                  key_padding_mask=mask, query_padding_mask=mask).to(x.dtype)
    if mod.conv is not None:
        vz = v if mask is None else v.masked_fill(mask[:, None, :, None], 0.0)
        o = o + mod.conv(vz)
        if mask is not None:
            o = o.masked_fill(mask[:, None, :, None], 0.0)
    return mod.out_proj(o.transpose(1, 2).reshape(B, L_, E))


def test_structure():
    mod = make_module(conv=3)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        lin = getattr(mod, name)
        assert isinstance(lin, torch.nn.Linear)
        assert lin.weight.shape == (E, E) and lin.bias is not None
    assert isinstance(mod.conv, torch.nn.Conv2d)
    assert mod.conv.weight.shape == (H, 1, 3, 1) and mod.conv.bias is None
    assert mod.conv.groups == H and tuple(mod.conv.padding) == (1, 0)
    assert make_module().conv is None
    nobias = make_module(bias=False)
    assert all(getattr(nobias, n).bias is None for n in ("q_proj", "k_proj", "v_proj", "out_proj"))


def test_embed_dim_must_divide_into_heads():
    with pytest.raises((ValueError, RuntimeError, AssertionError), match=r"embed_dim|num_heads|divisible"):
        NystromAttention(50, 4, 8)


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
@pytest.mark.parametrize("conv", [None, 3, 5], ids=["noconv", "conv3", "conv5"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_matches_manual_functional(masked, conv, pinv_init, device):
    mod = make_module(conv=conv, pinv_init=pinv_init, device=device)
    x = torch.randn(3, L, E).to(device.torch)
    mask = middle_mask(3, L, [(30, 37), (0, 0), (4, 20)]).to(device.torch) if masked else None
    with torch.no_grad():
        out = mod(x, mask) if masked else mod(x)
        expected = manual_forward(mod, x, mask, torch_nystrom.nystrom_attention, pinv_init=pinv_init)
    assert out.shape == (3, L, E) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if masked:
        # padded rows are zeroed before out_proj: what is left there is the bias
        torch.testing.assert_close(out[mask], mod.out_proj.bias.detach().expand(int(mask.sum()), E))


@pytest.mark.parametrize("conv", [None, 3], ids=["noconv", "conv3"])
def test_matches_reference_float64(conv, device):
    mod = make_module(conv=conv, dtype=torch.float64)
    x = torch.randn(2, L, E, dtype=torch.float64)
    mask = trailing_mask(2, L, [37, 23])
    with torch.no_grad():
        out = make_module(conv=conv, dtype=torch.float64, device=device)(*to_device((x, mask), device))
        expected = manual_forward(mod, x, mask, nystrom_reference)
    assert out.dtype == torch.float64
    assert_rel_close(out, expected, 1e-10)


def test_conv_skip_changes_output(device):
    # Negative control: the convolution term is really added.
    mod = make_module(conv=3, device=device)
    x = torch.randn(2, L, E).to(device.torch)
    with torch.no_grad():
        with_conv = mod(x)
        mod.conv.weight.zero_()
        without = mod(x)
    assert (with_conv - without).abs().max() > 1e-3


@pytest.mark.parametrize("conv", [None, 3], ids=["noconv", "conv3"])
def test_trailing_padding_is_invisible(conv, device):
    mod = make_module(conv=conv, dtype=torch.float64, device=device)
    x = torch.randn(2, L, E, dtype=torch.float64).to(device.torch)
    lengths = [37, 21]
    mask = trailing_mask(2, L, lengths).to(device.torch)
    x_pad = x.masked_fill(mask[..., None], 1e3)  # garbage in the padding must not matter
    with torch.no_grad():
        out = mod(x_pad, mask)
        for b, n in enumerate(lengths):
            alone = mod(x[b:b + 1, :n])
            assert_rel_close(out[b:b + 1, :n], alone, 1e-10, f"batch element {b}")


@pytest.mark.parametrize("conv", [None, 3], ids=["noconv", "conv3"])
def test_backward(conv, device):
    mod = make_module(conv=conv, device=device)
    x = torch.randn(2, L, E).to(device.torch).requires_grad_(True)
    mask = trailing_mask(2, L, [37, 30]).to(device.torch)
    out = mod(x, mask)
    (out ** 2).mean().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name != "k_proj.bias":  # its exact gradient is 0: softmax is shift invariant
            assert p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[1, 30:]) == 0  # padded tokens influence nothing


def test_gradients_match_reference_float64(device):
    mod = make_module(conv=3, dtype=torch.float64)
    x = torch.randn(2, 19, E, dtype=torch.float64)
    mask = trailing_mask(2, 19, [19, 12])
    params = list(mod.parameters())
    g = torch.randn(2, 19, E, dtype=torch.float64)
    on_device = make_module(conv=3, dtype=torch.float64, device=device)
    got = torch.autograd.grad(on_device(*to_device((x, mask), device)), list(on_device.parameters()),
                              g.to(device.torch))
    expected = torch.autograd.grad(manual_forward(mod, x, mask, nystrom_reference), params, g)
    # k_proj.bias has a zero gradient in exact arithmetic (softmax is shift invariant), so errors are
    # measured against the largest gradient entry of all parameters.
    scale = max(e.abs().max().item() for e in expected)
    for (name, _), a, e in zip(mod.named_parameters(), got, expected):
        err = (a.cpu() - e).abs().max().item() / scale
        assert err <= 1e-9, f"{name}: error {err:.3e}"
    assert expected[[n for n, _ in mod.named_parameters()].index("q_proj.weight")].abs().max() > 0


@pytest.mark.parametrize("conv", [None, 3], ids=["noconv", "conv3"])
def test_torchscript(conv, device):
    mod = make_module(conv=conv, pinv_init="original", device=device).eval()
    scripted = torch.jit.script(mod)
    x = torch.randn(2, L, E).to(device.torch)
    mask = trailing_mask(2, L, [37, 25]).to(device.torch)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, mask), mod(x, mask), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(scripted(x), mod(x), rtol=1e-6, atol=1e-6)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf, map_location=device.torch)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask), mod(x, mask), rtol=1e-6, atol=1e-6)
    # autograd works through the scripted module too
    xg = x.clone().requires_grad_(True)
    loaded(xg, mask).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_training_lowers_the_loss(device):
    teacher = make_module(conv=3, device=device)
    student = NystromAttention(E, H, M, conv_kernel_size=3).to(device.torch)
    x = torch.randn(4, 29, E).to(device.torch)
    mask = trailing_mask(4, 29, [29, 25, 17, 20]).to(device.torch)
    with torch.no_grad():
        target = teacher(x, mask)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(student(x, mask), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
