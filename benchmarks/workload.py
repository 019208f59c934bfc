"""The benchmark inputs: (B, H, n, D) queries, keys and values with structure.

Projections of real token sequences are not white noise: neighbouring tokens
look alike and attention is smooth along the sequence, which is the regime the
Nyström method is made for. Each of q, k, v is a few low-frequency components
along the sequence (random amplitudes and phases, shared between q and k so that
they correlate) plus smaller independent noise.
"""
import math

import torch


def make_inputs(B, H, n, D, dtype=torch.float32, seed=0, components=8, noise=0.3, device=None):
    """q, k, v of shape (B, H, n, D) in ``dtype``, contiguous.

    ``device`` None (or the CPU): drawn on the CPU in float64, the numbers every CPU benchmark uses. Any other
    device: the same construction drawn there in float32 (the CPU would need minutes and tens of GB for
    n = 131072 at B=4, H=16, D=128), in place where it can be: other numbers, same statistics.
    """
    if device is not None and torch.device(device).type != "cpu":
        return _make_inputs_on_device(B, H, n, D, dtype, seed, components, noise, torch.device(device))
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / max(n, 1)
    freqs = torch.arange(1, components + 1, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(components, generator=g, dtype=torch.float64)
    waves = torch.sin(2 * math.pi * t[:, None] * freqs[None, :] + phase)  # (n, C)

    def field():
        amp = torch.randn(B, H, components, D, generator=g, dtype=torch.float64) / math.sqrt(components)
        return waves @ amp  # (B, H, n, D)

    shared = field()
    q = shared + 0.5 * field() + noise * torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    k = shared + 0.5 * field() + noise * torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    v = field() + noise * torch.randn(B, H, n, D, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype).contiguous() for x in (q, k, v))


def _make_inputs_on_device(B, H, n, D, dtype, seed, components, noise, device):
    g = torch.Generator(device=device).manual_seed(seed)
    f32 = dict(dtype=torch.float32, device=device)
    t = torch.arange(n, **f32) / max(n, 1)
    freqs = torch.arange(1, components + 1, **f32)
    phase = 2 * math.pi * torch.rand(components, generator=g, **f32)
    waves = torch.sin(2 * math.pi * t[:, None] * freqs[None, :] + phase)  # (n, C)

    def field():
        amp = torch.randn(B, H, components, D, generator=g, **f32) / math.sqrt(components)
        return waves @ amp  # (B, H, n, D)

    def with_noise(x):
        x.add_(torch.randn(B, H, n, D, generator=g, **f32).mul_(noise))
        return x.to(dtype).contiguous()

    shared = field()
    q = with_noise(field().mul_(0.5).add_(shared))
    k = with_noise(field().mul_(0.5).add_(shared))
    del shared
    v = with_noise(field())
    return q, k, v
