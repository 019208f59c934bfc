"""The algorithm of the CUDA backend, written out in float64 PyTorch and checked on the CPU.

The CUDA kernels (cuda/, csrc/cuda/) do not compute Nyström attention in the CPU kernels' order: they
pool single-token "segments" to run exact-path elements through the landmark kernel, apply Newton–Schulz
in a Horner form with G = Z·A, split the key length of Bm·V across thread blocks and merge online-softmax
partials, and assemble the backward from a query-side pass, the m x m derivative, a key-side pass and
the spreading of landmark gradients to their tokens. This file restates exactly those steps, per batch
element, and checks them against the float64 reference and the reference's autograd gradients, so the
decomposition is known right before any GPU runs it (the GPU tests then check the kernels themselves).
"""

from __future__ import annotations

import pytest
import torch

from reference import nystrom_reference, segment_bounds as bounds

DT = torch.float64


def pool(x, ms):
    return torch.stack([x[a:b].mean(0) for a, b in bounds(x.shape[0], ms)])


def spread(src, n, ms):
    """Each token's share of its segment mean's gradient."""
    out = torch.zeros(n, src.shape[1], dtype=src.dtype)
    for j, (a, b) in enumerate(bounds(n, ms)):
        out[a:b] = src[j] / (b - a)
    return out


def newton_schulz_horner(A, c, iterations):
    """The fused kernel's form: Z <- (13Z - G(15Z - G(7Z - GZ))) / 4 with G = Z·A."""
    Z = A.t() / c
    for _ in range(iterations):
        G = Z @ A
        W = Z
        for coef in (7, 15, 13):
            W = coef * Z - G @ W
        Z = W / 4
    return Z


def newton_schulz_iterates(A, c, iterations):
    """The cuBLAS path's form (the CPU's): X = AZ, Z <- Z(13I - X(15I - X(7I - X))) / 4."""
    I = torch.eye(A.shape[0], dtype=A.dtype)
    Z = [A.t() / c]
    for _ in range(iterations):
        X = A @ Z[-1]
        Y = X @ (7 * I - X)
        Y = X @ (15 * I - Y)
        Z.append(Z[-1] @ (13 * I - Y) / 4)
    return Z


def split_softmax_matmul(logits, v, splits):
    """Bm·V and its log-sum-exp from per-split (max, sum, unnormalised product) partials."""
    parts = []
    for idx in torch.tensor_split(torch.arange(logits.shape[1]), splits):
        if len(idx) == 0:  # an empty split: the merge must ignore it
            parts.append((torch.full((logits.shape[0],), -torch.inf, dtype=DT),
                          torch.zeros(logits.shape[0], dtype=DT), torch.zeros(logits.shape[0], v.shape[1], dtype=DT)))
            continue
        mx = logits[:, idx].max(1).values
        p = torch.exp(logits[:, idx] - mx[:, None])
        parts.append((mx, p.sum(1), p @ v[idx]))
    M = torch.stack([p[0] for p in parts]).max(0).values
    w = [torch.where(p[1] > 0, torch.exp(p[0] - M), torch.zeros_like(M)) for p in parts]
    l = sum(p[1] * wi for p, wi in zip(parts, w))
    acc = sum(p[2] * wi[:, None] for p, wi in zip(parts, w))
    return acc / l[:, None], M + torch.log(l)


def element(q, k, v, g, m, scale, iterations, splits, c_all=None):
    """Forward and the backward's three gradients for one batch element's real rows (per head)."""
    L, S = q.shape[0], k.shape[0]
    mq, mk = min(m, L), min(m, S)
    exact = L <= m and S <= m
    ql, kl = pool(q, mq), pool(k, mk)
    if exact:
        W = pool(v, mk)  # single-token segments: the values themselves
    else:
        A = torch.softmax(scale * ql @ kl.t(), -1)
        c = A.sum(0).max() if c_all is None else c_all
        bv, lse_l = split_softmax_matmul(scale * ql @ k.t(), v, splits)
        W = newton_schulz_horner(A, c, iterations) @ bv
    lse_q = torch.logsumexp(scale * q @ kl.t(), 1)
    F = torch.exp(scale * q @ kl.t() - lse_q[:, None])
    out = F @ W

    # Query-side pass (every element).
    dF = g @ W.t()
    dS = F * (dF - (F * dF).sum(1, keepdim=True))
    dq, dkl, dW = scale * dS @ kl, scale * dS.t() @ q, F.t() @ g
    if exact:
        return out, dq, dkl, dW
    # m x m part: through Z·bv, every Newton–Schulz iteration, c and the softmax of A.
    Z = newton_schulz_iterates(A, c, iterations)
    dbv = Z[-1].t() @ dW
    A_, c_ = A.clone().requires_grad_(), c.clone().detach().requires_grad_()
    dA, dc = torch.autograd.grad(newton_schulz_iterates(A_, c_, iterations)[-1], (A_, c_), dW @ bv.t())
    dA = dA.clone()
    dA[:, A.sum(0).argmax()] += dc
    dSA = A * (dA - (A * dA).sum(1, keepdim=True))
    dql = scale * dSA @ kl
    dkl = dkl + scale * dSA.t() @ ql
    # Key-side pass: Bm recomputed from its log-sum-exp; delta = rowsum(dbv * bv).
    Bm = torch.exp(scale * ql @ k.t() - lse_l[:, None])
    dS3 = Bm * (dbv @ v.t() - (dbv * bv).sum(1, keepdim=True))
    dk = scale * dS3.t() @ ql + spread(dkl, S, mk)
    dv = Bm.t() @ dbv
    dq = dq + spread(dql + scale * dS3 @ k, L, mq)
    return out, dq, dk, dv


def decomposition(q, k, v, g, m, kpm, qpm, iterations=6, splits=3):
    B, H, L, _ = q.shape
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(B, H, L, v.shape[-1], dtype=DT)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in range(B):
        qi, ki = (~qpm[b]).nonzero().view(-1), (~kpm[b]).nonzero().view(-1)
        for h in range(H):
            o, gq, gk, gv = element(q[b, h, qi], k[b, h, ki], v[b, h, ki], g[b, h, qi], m, scale, iterations, splits)
            out[b, h, qi], dq[b, h, qi], dk[b, h, ki], dv[b, h, ki] = o, gq, gk, gv
    return out, dq, dk, dv


@pytest.mark.parametrize(
    "L,S,m,splits",
    [(37, 41, 7, 3), (20, 70, 16, 5), (5, 6, 8, 1), (50, 50, 64, 2), (37, 41, 3, 40), (33, 33, 33, 2)],
)
def test_cuda_decomposition_matches_reference_and_its_gradients(L, S, m, splits):
    torch.manual_seed(L * 100 + m)
    B, H, D, Dv = 3, 2, 5, 3
    q, k, v = (torch.randn(B, H, n, d, dtype=DT, requires_grad=True) for n, d in ((L, D), (S, D), (S, Dv)))
    qpm = torch.zeros(B, L, dtype=torch.bool)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    qpm[0, 2:5] = True          # element 0: a hole in the queries and the keys
    kpm[0, S // 3: S // 2] = True
    qpm[1, 4:] = True            # element 1: 4 queries, 3 keys: the exact path
    kpm[1, 3:] = True
    g = torch.randn(B, H, L, Dv, dtype=DT)
    out, dq, dk, dv = decomposition(q.detach(), k.detach(), v.detach(), g, m, kpm, qpm, splits=splits)
    ref = nystrom_reference(q, k, v, m, key_padding_mask=kpm, query_padding_mask=qpm)
    gq, gk, gv = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, e in (("out", out, ref), ("dq", dq, gq), ("dk", dk, gk), ("dv", dv, gv)):
        err = ((a - e).abs().max() / e.abs().max()).item()
        assert err < 1e-12, f"{name}: relative error {err:.2e}"
