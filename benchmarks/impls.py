"""The attention implementations that the benchmarks compare, on (B, H, n, D) inputs.

- ``ours``: torch.ops.nystrom.nystrom_attention.
- ``composition``: the same Nyström algorithm written as plain PyTorch calls, in
  Hugging Face transformers' formulation (segment means by reshape, three full
  softmax matrices, Newton–Schulz on batched matmuls). Written here from the
  paper's equations; no code is taken from transformers.
- ``lucidrains``: lucidrains' ``nystrom-attention`` package (pip), its attention core
  only: the q/k/v and output projections are identities and the conv residual is off.
  It initialises the pseudoinverse differently (max row sum times max column sum).
- ``sdpa_composition``: the op's own algorithm (per_head init, the uneven segments of docs/DESIGN.md §2) built
  from two fused exact-attention calls plus the m x m steps in plain PyTorch: q̃, k̃ the segment means;
  A = softmax(scale q̃ k̃ᵀ) and Z = Newton–Schulz(A) in float32 (float64 for float64 inputs);
  bv = SDPA(q̃, k, v) = Bm·v; W = Z·bv; out = SDPA(q, k̃, W) = F·W. On a GPU both SDPA calls are flash
  kernels, forward and backward, so this is the strongest peer built from library kernels
  (issue 13). q̃ and W are rounded to the input dtype as SDPA's operands, as the op's tensor-core
  forward rounds them (docs/DESIGN.md §3.3). tests/python/test_bench_peers.py checks it against the op.
- ``sdpa``: exact attention, torch.nn.functional.scaled_dot_product_attention.
- ``reference64``: the composition in float64 with the uneven segments of docs/DESIGN.md §2 step 2,
  the yardstick for the error of the Nyström approximation itself.
"""
import torch
import torch.nn.functional as F


def ours(q, k, v, m, pinv_init="per_head", iters=6):
    return torch.ops.nystrom.nystrom_attention(q, k, v, m, iters, pinv_init, None, None, None)


def _segment_means(x, m):
    n = x.shape[-2]
    if n % m == 0:
        return x.reshape(*x.shape[:-2], m, n // m, x.shape[-1]).mean(-2)
    bounds = [(j * n) // m for j in range(m + 1)]
    return torch.stack([x[..., bounds[j]:bounds[j + 1], :].mean(-2) for j in range(m)], -2)


def newton_schulz(a, iters=6, pinv_init="per_head"):
    """Z ≈ A⁺ (docs/DESIGN.md §2 step 4): Z₀ = Aᵀ/c, then Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))."""
    colsum = a.sum(-2)
    c = colsum.max() if pinv_init == "original" else colsum.amax(-1)[..., None, None]
    z = a.transpose(-1, -2) / c
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def composition(q, k, v, m, pinv_init="per_head", iters=6):
    n, d = q.shape[-2], q.shape[-1]
    if n <= m and k.shape[-2] <= m:
        return F.scaled_dot_product_attention(q, k, v)
    scale = d ** -0.5
    ql, kl = _segment_means(q, min(m, n)), _segment_means(k, min(m, k.shape[-2]))
    f = torch.softmax(scale * q @ kl.transpose(-1, -2), -1)
    a = torch.softmax(scale * ql @ kl.transpose(-1, -2), -1)
    bm = torch.softmax(scale * ql @ k.transpose(-1, -2), -1)
    z = newton_schulz(a, iters, pinv_init)
    return f @ (z @ (bm @ v))


def sdpa_composition(q, k, v, m, pinv_init="per_head", iters=6):
    """The op's algorithm from two SDPA calls and the m x m steps (module docstring). No masks."""
    n, s, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if n <= m and s <= m:
        return F.scaled_dot_product_attention(q, k, v)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = d ** -0.5
    ql = _segment_means(q.to(acc), min(m, n))
    kl = _segment_means(k.to(acc), min(m, s))
    a = torch.softmax(scale * ql @ kl.transpose(-1, -2), -1)
    z = newton_schulz(a, iters, pinv_init)
    bv = F.scaled_dot_product_attention(ql.to(q.dtype), k, v)  # Bm·v, (mq, Dv)
    w = z @ bv.to(acc)  # (mk, Dv)
    return F.scaled_dot_product_attention(q, kl.to(q.dtype), w.to(q.dtype))


def sdpa(q, k, v, m=None, pinv_init=None, iters=None):
    return F.scaled_dot_product_attention(q, k, v)


def reference64(q, k, v, m, pinv_init="per_head", iters=6):
    return composition(q.double(), k.double(), v.double(), m, pinv_init, iters)


_LUCIDRAINS = {}


def _lucidrains_layer(H, D, m, iters, dtype, device="cpu"):
    key = (H, D, m, iters, dtype, str(device))
    if key not in _LUCIDRAINS:
        from nystrom_attention import NystromAttention

        layer = NystromAttention(dim=3 * H * D, dim_head=D, heads=H, num_landmarks=m,
                                 pinv_iterations=iters, residual=False)
        layer.to_qkv = torch.nn.Identity()
        layer.to_out = torch.nn.Identity()
        _LUCIDRAINS[key] = layer.to(device=device, dtype=dtype)
    return _LUCIDRAINS[key]


def lucidrains_pack(q, k, v):
    """(B, H, n, D) x3 -> the (B, n, 3 H D) input its layer expects."""
    B, H, n, D = q.shape
    return torch.cat([t.transpose(1, 2).reshape(B, n, H * D) for t in (q, k, v)], -1)


def lucidrains(q, k, v, m, pinv_init=None, iters=6, packed=None):
    B, H, n, D = q.shape
    x = lucidrains_pack(q, k, v) if packed is None else packed
    out = _lucidrains_layer(H, D, m, iters, q.dtype, q.device)(x)
    return out.view(B, n, H, D).transpose(1, 2)
