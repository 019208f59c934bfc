"""The landmark pooling kernel of the CUDA backend (pool_kernel; docs/DESIGN.md §7): q̃ of every element, and k̃
where the Bm·V pass does not pool it (every dtype but the tensor-core shapes in half precision). A row is read in
16-byte chunks (8 half, 4 float, 2 double elements) by a power-of-two group of lanes, several rows per warp
instruction; rows that are not 16-byte aligned, and a last chunk that runs past D, element by element.

Checked against the float64 segment means of the real rows (the saved q_landmarks / k_landmarks of
nystrom_attention_forward), for head dims that give 1, 2, 3, 5, 12, 16 and 32 chunks per row and chunks cut by D,
with rows that are all aligned, none aligned (a view at an odd column offset) and every other one aligned (a row
stride of D + 4 half elements: 8 bytes past a multiple of 16), and with scattered query padding (index lists).

Tolerance: a float32 sum of input-dtype values (|x| < ~5) over ~30 rows, divided once: a few float32 ulps of the
sum, < 1e-5; a row dropped, doubled or read from the wrong column moves a mean by ~1 / 30. float64: 1e-12.
"""

from __future__ import annotations

import pytest
import torch

from helpers import build_mask, make_qkv, ops_args, scattered, torch_device, trailing
from reference import landmarks

torch_nystrom = pytest.importorskip("torch_nystrom")

B, H, L, S, M = 2, 2, 203, 150, 7

# (dtype, D, layout): layout "dense" = contiguous rows; "odd" = a view at column offset 1 of rows D + 1 wide (no row
# 16-byte aligned); "alternate" = rows D + 4 wide, offset 0 (half precision: every other row aligned)
CASES = [
    (torch.bfloat16, 128, "dense"), (torch.bfloat16, 128, "odd"), (torch.bfloat16, 128, "alternate"),
    (torch.bfloat16, 96, "alternate"), (torch.bfloat16, 36, "dense"), (torch.bfloat16, 256, "dense"),
    (torch.bfloat16, 5, "odd"),
    (torch.float16, 64, "alternate"), (torch.float16, 200, "odd"),
    (torch.float32, 128, "dense"), (torch.float32, 19, "odd"), (torch.float32, 256, "alternate"),
    (torch.float64, 40, "dense"), (torch.float64, 33, "odd"),
]


def strided(x: torch.Tensor, layout: str, device) -> torch.Tensor:
    """x (on the CPU) on the device, with the row layout asked for; the values are x's."""
    D = x.shape[-1]
    pad, offset = {"dense": (0, 0), "odd": (1, 1), "alternate": (4, 0)}[layout]
    base = torch.zeros(*x.shape[:-1], D + pad, dtype=x.dtype)
    base[..., offset:offset + D] = x
    view = base.to(torch_device(device))[..., offset:offset + D]
    assert view.stride(-1) == 1 and view.stride(-2) == D + pad
    return view


def expected(x: torch.Tensor, mask, m: int) -> torch.Tensor:
    """float64 segment means of each element's real rows, (B, H, min(m, max(L, S)), D)."""
    x = x.double()
    ms = min(m, max(L, S))
    out = torch.zeros(x.shape[0], x.shape[1], ms, x.shape[-1], dtype=torch.float64)
    for b in range(x.shape[0]):
        real = torch.ones(x.shape[-2], dtype=torch.bool) if mask is None else ~mask[b]
        xb = x[b][:, real, :]
        mb = min(m, xb.shape[-2])
        out[b, :, :mb] = landmarks(xb, mb)
    return out


@pytest.mark.parametrize("dtype,D,layout", CASES, ids=[f"{str(d)[6:]}-D{n}-{lay}" for d, n, lay in CASES])
def test_landmarks_are_segment_means(dtype, D, layout, cuda_device):
    q, k, v = make_qkv(B, H, L, S, D, 7, dtype=dtype, seed=3)
    qpm = build_mask(scattered(0.2), B, L, seed=4)
    kpm = build_mask(trailing(S, 121), B, S, seed=5)
    dev = torch_device(cuda_device)
    kw = {"num_landmarks": M, "query_padding_mask": qpm.to(dev), "key_padding_mask": kpm.to(dev)}
    qd, kd = strided(q, layout, cuda_device), strided(k, layout, cuda_device)
    _, q_lm, k_lm, *_ = torch.ops.nystrom.nystrom_attention_forward(*ops_args(qd, kd, v.to(dev), kw))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, got, x, mask in (("q_landmarks", q_lm, q, qpm), ("k_landmarks", k_lm, k, kpm)):
        want = expected(x, mask, M)
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        err = (got.cpu().double() - want).abs().max().item()
        assert err < tol, f"{name}: max error {err:.3e} >= {tol:.0e}"
