"""Nyström attention in plain PyTorch ops, without data-dependent shapes.

The compiled op drops padded tokens by gathering the real ones of each batch
element. A traced graph (``torch.export``, ONNX) cannot do that, so this module
writes the same math (docs/DESIGN.md §2) in masked form:

- the rank of each real token among the real tokens of its batch element is
  ``cumsum(real) - 1``, its segment ``floor(((rank + 1) * m' - 1) / n)`` for
  ``n`` real tokens in ``m'`` segments, and a one-hot ``(B, n, ms)`` matrix of
  segments turns the landmark means into one product;
- every batch element gets ``ms = min(m, max(L, S))`` landmark slots, of which
  it uses ``min(m, L_b)`` (queries) and ``min(m, S_b)`` (keys); the unused ones
  are masked out of every softmax and zero in A, so Newton–Schulz, which keeps
  zero padding at zero, gives each element its own pseudoinverse;
- an element with ``L_b, S_b <= m`` (the exact path) has one key per segment,
  so its key landmarks *are* its real keys, compacted: ``softmax(scale q k̃ᵀ)``
  is its exact attention and the segment means of V are its real values. The
  exact path costs ``L x ms``, never ``L x S``.

Memory is O((L + S) · ms) per head: no ``L x S`` matrix is formed.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_arguments(
    fn: str,
    query: Tensor,
    key: Tensor,
    value: Optional[Tensor],
    num_landmarks: int,
    pinv_iterations: int,
    pinv_init: str,
    key_padding_mask: Optional[Tensor],
    query_padding_mask: Optional[Tensor],
    scale: Optional[float],
) -> float:
    """The op's argument checks (csrc/checks.cpp), with the same words; returns the scale.

    ``value`` may be None (attention_weights has none). Only metadata is read, so
    this runs under tracing too.
    """
    for name, t, dims in (("query", query, "(B, H, L, D)"), ("key", key, "(B, H, S, D)"), ("value", value, "(B, H, S, Dv)")):
        if name == "value" and t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be a 4-D tensor {dims}, got shape {list(t.shape)}")
    if query.dtype not in _FLOATS:
        raise TypeError(f"{fn}: query must be float32, float64, float16 or bfloat16, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t is None:
            continue
        if t.dtype != query.dtype:
            raise TypeError(f"{fn}: {name} must have the same dtype as query ({query.dtype}), got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{fn}: {name} must be on the same device as query ({query.device}), got {t.device}")
    B, H, L, D = query.shape
    S = key.shape[2]
    if key.shape[0] != B or key.shape[1] != H:
        raise ValueError(f"{fn}: key must have the batch and head sizes of query ({B}, {H}), got {list(key.shape)}")
    if key.shape[3] != D:
        raise ValueError(f"{fn}: key must have the head dim of query ({D}), got {key.shape[3]}")
    if value is not None:
        if value.shape[0] != B or value.shape[1] != H:
            raise ValueError(f"{fn}: value must have the batch and head sizes of query ({B}, {H}), got {list(value.shape)}")
        if value.shape[2] != S:
            raise ValueError(f"{fn}: value must have as many rows as key ({S}), got {value.shape[2]}")
    if isinstance(num_landmarks, bool) or not isinstance(num_landmarks, int) or num_landmarks < 1:
        raise ValueError(f"{fn}: num_landmarks must be an int >= 1, got {num_landmarks!r}")
    if isinstance(pinv_iterations, bool) or not isinstance(pinv_iterations, int) or pinv_iterations < 0:
        raise ValueError(f"{fn}: pinv_iterations must be an int >= 0, got {pinv_iterations!r}")
    if pinv_init not in ("per_head", "original"):
        raise ValueError(f'{fn}: pinv_init must be "per_head" or "original", got {pinv_init!r}')
    for name, mask, n, n_name in (("key_padding_mask", key_padding_mask, S, "S"), ("query_padding_mask", query_padding_mask, L, "L")):
        if mask is None:
            continue
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"{fn}: {name} must be a bool tensor (True marks padding), got {got}")
        if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] != n:
            raise ValueError(f"{fn}: {name} must have shape (B, {n_name}) = ({B}, {n}), got {list(mask.shape)}")
        if mask.device != query.device:
            raise ValueError(f"{fn}: {name} must be on the same device as query ({query.device}), got {mask.device}")
    if scale is None:
        return float(D) ** -0.5
    s = float(scale)
    if not (s > 0.0 and s != float("inf")):
        raise ValueError(f"{fn}: scale must be a finite number > 0, got {scale!r}")
    return s


def landmark_slots(m: int, L, S) -> int:
    """Landmark rows per element: min(m, max(L, S)), as the op saves them; m under symbolic sizes.

    (torch.export cannot prove the size guards that min(m, max(L, S)) raises in the
    broadcasts below, so a traced graph keeps m slots: the same results, the slots past
    max(L, S) unused.)
    """
    if isinstance(L, int) and isinstance(S, int):
        return min(m, max(L, S))
    return m


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32 (docs/DESIGN.md §5)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Segments(NamedTuple):
    """How the real tokens of each batch element fall into landmark segments."""

    real: Tensor  # (B, n) bool: True = real token
    count: Tensor  # (B,) int64: real tokens n_b
    used: Tensor  # (B,) int64: segments m' = min(m, n_b)
    onehot: Tensor  # (B, n, ms) bool: token i lies in segment j (real tokens only)


def segments(mask: Optional[Tensor], batch: int, n, m: int, ms, device) -> Segments:
    """Segment j of the n_b real tokens covers ranks [floor(j n_b/m'), floor((j+1) n_b/m'))."""
    real = torch.ones(batch, n, dtype=torch.bool, device=device) if mask is None else mask.logical_not()
    count = real.sum(1)
    used = count.clamp(max=m)
    rank = real.cumsum(1) - 1
    seg = torch.div((rank + 1) * used[:, None] - 1, count.clamp(min=1)[:, None], rounding_mode="floor")
    slots = torch.arange(ms, device=device)
    onehot = (seg[:, :, None] == slots) & real[:, :, None]
    return Segments(real, count, used, onehot)


def segment_means(x: Tensor, seg: Segments) -> Tensor:
    """Mean of x (B, H, n, d) over each segment: (B, H, ms, d); 0 for unused slots."""
    w = seg.onehot.to(x.dtype)
    sums = torch.einsum("bnj,bhnd->bhjd", w, x)
    return sums / w.sum(1).clamp(min=1)[:, None, :, None]


def masked_softmax(logits: Tensor, keep: Tensor) -> Tuple[Tensor, Tensor]:
    """Softmax over the last dim of the entries where keep is True, and its log-sum-exp.

    Masked entries get probability 0. A row with nothing kept stays finite
    (uniform); callers mask such rows out.
    """
    x = logits.masked_fill(keep.logical_not(), torch.finfo(logits.dtype).min)
    return torch.softmax(x, dim=-1), torch.logsumexp(x, dim=-1)


def newton_schulz(A: Tensor, c: Tensor, iterations: int) -> Tensor:
    """Z_0 = Aᵀ / c, then Z <- 1/4 Z (13I - AZ(15I - AZ(7I - AZ))), in the op's order."""
    Z = A.transpose(-1, -2) / c
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for _ in range(iterations):
        X = A @ Z
        T = 13 * eye - X @ (15 * eye - X @ (7 * eye - X))
        Z = (Z @ T) * 0.25
    return Z


class Landmarks(NamedTuple):
    """What the query pass needs from the landmarks, per (b, h), in the compute dtype."""

    q_lm: Tensor  # (B, H, ms, D) query landmarks
    k_lm: Tensor  # (B, H, ms, D) key landmarks
    q_cols: Tensor  # (B, 1, 1, ms) bool: the key-landmark columns an element uses (mk)
    q_rows: Tensor  # (B, 1, ms, 1) bool: the query-landmark rows it uses (mq)
    Z: Tensor  # (B, H, ms, ms): Newton–Schulz pseudoinverse of A (zero padded)
    c: Tensor  # (B, H): the c of Z_0 = Aᵀ/c on the Nyström path, 0 elsewhere
    exact: Tensor  # (B,) bool: L_b, S_b <= m
    nystrom: Tensor  # (B,) bool: real queries and not exact
    qseg: Segments
    kseg: Segments


def landmarks(q: Tensor, k: Tensor, m: int, pinv_iterations: int, pinv_init: str,
              key_padding_mask: Optional[Tensor], query_padding_mask: Optional[Tensor], scale: float) -> Landmarks:
    """Landmarks, A, c and Z of docs/DESIGN.md §2 steps 2–4 for q (B,H,L,D), k (B,H,S,D) in the compute dtype."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    ms = landmark_slots(m, L, S)
    qseg = segments(query_padding_mask, B, L, m, ms, q.device)
    kseg = segments(key_padding_mask, B, S, m, ms, q.device)
    q_lm = segment_means(q, qseg)
    k_lm = segment_means(k, kseg)
    slots = torch.arange(ms, device=q.device)
    q_cols = (slots < kseg.used[:, None])[:, None, None, :]
    q_rows = (slots < qseg.used[:, None])[:, None, :, None]
    A = masked_softmax(q_lm @ (k_lm * scale).transpose(-1, -2), q_cols)[0] * q_rows
    c = A.sum(-2).amax(-1)  # (B, H): the largest column sum
    empty = qseg.count == 0
    exact = ~empty & (qseg.count <= m) & (kseg.count <= m)
    nystrom = ~empty & ~exact
    if pinv_init == "original":  # one maximum over the heads of the Nyström path
        c = torch.where(nystrom[:, None], c, 0).amax().expand(B, H)
    c = torch.where(nystrom[:, None], c, 0)
    Z = newton_schulz(A, torch.where(nystrom[:, None], c, 1)[:, :, None, None], pinv_iterations)
    return Landmarks(q_lm, k_lm, q_cols, q_rows, Z, c, exact, nystrom, qseg, kseg)


def real_keys_check(fn: str, lm: Landmarks) -> None:
    """The op refuses an element with real queries and no real key; so do eager calls here."""
    q = lm.qseg.count
    if torch.compiler.is_compiling() or q.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(q):
        return  # a traced graph cannot raise on data; such rows are undefined there
    bad = ((q > 0) & (lm.kseg.count == 0)).nonzero()
    if bad.numel():
        b = int(bad[0, 0])
        raise ValueError(
            f"{fn}: key_padding_mask masks every key of batch element {b}; "
            "each batch element with real queries needs at least one real key"
        )


def decomposed_nystrom_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_landmarks: int = 64,
    pinv_iterations: int = 6,
    pinv_init: str = "per_head",
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``torch.ops.nystrom.nystrom_attention_forward`` in plain PyTorch ops: the same eight outputs.

    ``(out, q_landmarks, k_landmarks, bv, zbv, lse_query, lse_landmark, pinv_scale)``
    with the op's shapes (``ms = min(m, max(L, S))`` landmark rows; ``m`` rows when
    traced with symbolic sizes), dtypes and zeros (unused landmark rows, padded query
    rows, exact-path elements).
    """
    fn = "decomposed_nystrom_attention"
    s = check_arguments(fn, query, key, value, num_landmarks, pinv_iterations, pinv_init,
                        key_padding_mask, query_padding_mask, scale)
    acc = accumulate_dtype(query.dtype)
    B, H, L, D = query.shape
    S, Dv = key.shape[2], value.shape[3]
    ms = landmark_slots(num_landmarks, L, S)
    if B * H == 0 or L == 0:
        z = lambda *shape: torch.zeros(*shape, dtype=acc, device=query.device)  # noqa: E731
        return (torch.zeros(B, H, L, Dv, dtype=query.dtype, device=query.device), z(B, H, ms, D), z(B, H, ms, D),
                z(B, H, ms, Dv), z(B, H, ms, Dv), z(B, H, L), z(B, H, ms), z(B, H))
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    lm = landmarks(q, k, num_landmarks, pinv_iterations, pinv_init, key_padding_mask, query_padding_mask, s)
    real_keys_check(fn, lm)
    nys = lm.nystrom[:, None, None, None]
    # Bm = softmax(scale q̃ kᵀ) over the real keys; bv = Bm·V, zbv = Z·Bm·V.
    Bm, lse_l = masked_softmax((lm.q_lm * s) @ k.transpose(-1, -2), lm.kseg.real[:, None, None, :])
    bv = torch.where(nys & lm.q_rows, Bm @ v, 0)
    zbv = lm.Z @ bv
    # F = softmax(scale q k̃ᵀ) over the used key landmarks: on the exact path
    # those are the real keys, and the segment means of V the real values.
    F, lse_q = masked_softmax(q @ (lm.k_lm * s).transpose(-1, -2), lm.q_cols)
    values = torch.where(lm.exact[:, None, None, None], segment_means(v, lm.kseg), zbv)
    real_q = lm.qseg.real[:, None, :]
    out = torch.where(real_q[..., None], F @ values, 0).to(query.dtype)
    return (
        out,
        torch.where(nys, lm.q_lm, 0),
        torch.where(nys, lm.k_lm, 0),
        bv,
        zbv,
        torch.where(real_q, lse_q, 0),
        torch.where(nys[..., 0] & lm.q_rows[..., 0], lse_l, 0),
        lm.c,
    )


def decomposed_nystrom_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_landmarks: int = 64,
    *,
    pinv_iterations: int = 6,
    pinv_init: str = "per_head",
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """:func:`torch_nystrom.nystrom_attention` in plain PyTorch ops (no compiled library needed).

    Same signature and result (up to rounding). Differentiable by autograd, traceable
    by ``torch.export`` with dynamic sizes (no data-dependent shapes), O((L + S) · m)
    memory per head. Under tracing it cannot raise on data: an element with real
    queries but no real key (an error for the op) gives undefined rows there.
    """
    return decomposed_nystrom_attention_forward(
        query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask, query_padding_mask, scale
    )[0]
