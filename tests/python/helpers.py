"""Input builders and comparison helpers shared by the tests."""

from __future__ import annotations

from typing import Optional

import torch


def make_qkv(B, H, L, S, D, Dv=None, dtype=torch.float64, std=1.0, requires_grad=False, seed=None):
    """Random q (B,H,L,D), k (B,H,S,D), v (B,H,S,Dv)."""
    if Dv is None:
        Dv = D
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    q = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) * std).to(dtype)
    k = (torch.randn(B, H, S, D, dtype=torch.float64, generator=g) * std).to(dtype)
    v = torch.randn(B, H, S, Dv, dtype=torch.float64, generator=g).to(dtype)
    if requires_grad:
        q.requires_grad_(True)
        k.requires_grad_(True)
        v.requires_grad_(True)
    return q, k, v


def trailing_mask(B: int, n: int, real_lengths) -> torch.Tensor:
    """Bool (B, n), True = padding, with the first real_lengths[b] tokens real."""
    mask = torch.ones(B, n, dtype=torch.bool)
    for b, r in enumerate(real_lengths):
        mask[b, :r] = False
    return mask


def middle_mask(B: int, n: int, holes) -> torch.Tensor:
    """Bool (B, n) with padding in [lo, hi) for holes[b] = (lo, hi)."""
    mask = torch.zeros(B, n, dtype=torch.bool)
    for b, (lo, hi) in enumerate(holes):
        mask[b, lo:hi] = True
    return mask


def random_mask(B: int, n: int, p: float = 0.3, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random bool (B, n) padding with at least one real token per row."""
    mask = torch.rand(B, n, generator=generator) < p
    mask[:, 0] = False
    return mask


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64)."""
    a, e = actual.double(), expected.double()
    denom = e.abs().max().item()
    diff = (a - e).abs().max().item() if a.numel() else 0.0
    return diff / denom if denom > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "output"):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual.double()).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
