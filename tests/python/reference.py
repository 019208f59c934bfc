"""A plain-PyTorch reference of Nyström attention, written to follow DESIGN.md line by line.

It is meant to be obviously correct, not fast: it loops over batch elements, drops padded tokens,
and builds every matrix of the design explicitly.  Everything is differentiable with autograd (the
tests use it to check the library's gradients).  By default it computes in float64; ``compute_dtype``
lets the tests run the very same math in a lower precision to estimate rounding error.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

PINV_INITS = ("per_head", "original")


def segment_bounds(n: int, m: int) -> List[Tuple[int, int]]:
    """Segment j of n tokens into m segments covers [floor(j*n/m), floor((j+1)*n/m))."""
    assert 1 <= m <= n, (n, m)
    return [((j * n) // m, ((j + 1) * n) // m) for j in range(m)]


def landmarks(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of the m segments of x along dim -2. x: (H, n, D) -> (H, m, D)."""
    n = x.shape[-2]
    rows = [x[:, lo:hi, :].mean(dim=-2) for lo, hi in segment_bounds(n, m)]
    return torch.stack(rows, dim=-2)


def max_column_sum(a: torch.Tensor) -> torch.Tensor:
    """Largest column sum of each matrix in a (H, r, c) -> (H,)."""
    return a.sum(dim=-2).max(dim=-1).values


def newton_schulz(a: torch.Tensor, c: torch.Tensor, iterations: int) -> torch.Tensor:
    """Z0 = A^T / c, then Z <- 1/4 Z (13 I - AZ (15 I - AZ (7 I - AZ))) `iterations` times.

    a: (H, r, c_), c: (H,) or a scalar tensor. Returns Z: (H, c_, r).
    """
    if c.dim() == 0:
        c = c.expand(a.shape[0])
    z = a.transpose(-1, -2) / c[:, None, None]
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale q k^T) v for (H, L, D), (H, S, D), (H, S, Dv)."""
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def nystrom_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    num_landmarks: int = 64,
    *,
    pinv_iterations: int = 6,
    pinv_init: str = "per_head",
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference Nyström attention. Returns (B, H, L, Dv) in ``compute_dtype``."""
    assert query.dim() == 4 and key.dim() == 4 and value.dim() == 4
    assert pinv_init in PINV_INITS
    B, H, L, D = query.shape
    S = key.shape[2]
    Dv = value.shape[3]
    m = num_landmarks
    if scale is None:
        scale = D ** -0.5

    q = query.to(compute_dtype)
    k = key.to(compute_dtype)
    v = value.to(compute_dtype)
    if key_padding_mask is None:
        key_padding_mask = torch.zeros(B, S, dtype=torch.bool)
    if query_padding_mask is None:
        query_padding_mask = torch.zeros(B, L, dtype=torch.bool)

    # Pass 1: per batch element, the real tokens and (on the Nyström path) F, A, Bm and c per head.
    elements = []
    for b in range(B):
        q_idx = torch.nonzero(~query_padding_mask[b]).flatten()
        k_idx = torch.nonzero(~key_padding_mask[b]).flatten()
        qb = q[b][:, q_idx, :]  # (H, L_b, D)
        kb = k[b][:, k_idx, :]  # (H, S_b, D)
        vb = v[b][:, k_idx, :]  # (H, S_b, Dv)
        L_b, S_b = qb.shape[1], kb.shape[1]
        assert S_b > 0, "every batch element needs at least one real key"
        elem = {"q_idx": q_idx, "q": qb, "k": kb, "v": vb}
        if L_b <= m and S_b <= m:
            elem["exact"] = True
        else:
            elem["exact"] = False
            mq, mk = min(m, L_b), min(m, S_b)
            q_lm = landmarks(qb, mq) if mq > 0 else qb.new_zeros(H, 0, D)
            k_lm = landmarks(kb, mk)
            elem["F"] = torch.softmax(scale * qb @ k_lm.transpose(-1, -2), dim=-1)  # (H, L_b, mk)
            elem["A"] = torch.softmax(scale * q_lm @ k_lm.transpose(-1, -2), dim=-1)  # (H, mq, mk)
            elem["Bm"] = torch.softmax(scale * q_lm @ kb.transpose(-1, -2), dim=-1)  # (H, mq, S_b)
            elem["c"] = max_column_sum(elem["A"])  # (H,)
        elements.append(elem)

    # "original": one maximum over all heads of all batch elements that take the Nyström path.
    global_c = None
    if pinv_init == "original":
        cs = [e["c"] for e in elements if not e["exact"]]
        if cs:
            global_c = torch.cat(cs).max()

    # Pass 2: outputs.
    outs = []
    for e in elements:
        if e["exact"]:
            o = dense_attention(e["q"], e["k"], e["v"], scale)
        else:
            c = e["c"] if pinv_init == "per_head" else global_c
            z = newton_schulz(e["A"], c, pinv_iterations)  # (H, mk, mq)
            o = e["F"] @ (z @ (e["Bm"] @ e["v"]))
        full = torch.zeros(H, L, Dv, dtype=compute_dtype)
        full[:, e["q_idx"], :] = o  # padded query rows stay 0
        outs.append(full)
    if not outs:
        return torch.zeros(0, H, L, Dv, dtype=compute_dtype)
    return torch.stack(outs, dim=0)


def masked_dense_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    query_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Exact masked softmax attention in float64 via scaled_dot_product_attention (padded query rows 0)."""
    q, k, v = query.double(), key.double(), value.double()
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[:, None, :, None], 0.0)
    return out
