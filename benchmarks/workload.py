"""The benchmark inputs: (B, H, n, D) queries, keys and values with structure.

Projections of real token sequences are not white noise: neighbouring tokens
look alike and attention is smooth along the sequence, which is the regime the
Nyström method is made for. Each of q, k, v is a few low-frequency components
along the sequence (random amplitudes and phases, shared between q and k so that
they correlate) plus smaller independent noise.
"""
import math

import torch


def make_inputs(B, H, n, D, dtype=torch.float32, seed=0, components=8, noise=0.3):
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
