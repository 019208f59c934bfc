"""Attention maps of Nyström attention, without forming the L x S product of the whole call."""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ._decomposition import accumulate_dtype, check_arguments, landmarks, masked_softmax, real_keys_check

Rows = Union[Tensor, Sequence[int], None]


def _row_index(rows: Rows, L: int, device: torch.device) -> Tensor:
    """rows as a 1-D int64 index on `device`, checked to lie in [0, L)."""
    fn = "attention_weights"
    if rows is None:
        return torch.arange(L, device=device)
    if isinstance(rows, Tensor):
        if rows.dtype == torch.bool or rows.is_floating_point() or rows.is_complex():
            raise TypeError(f"{fn}: rows must be a 1-D integer tensor or a sequence of ints, got dtype {rows.dtype}")
        if rows.dim() != 1:
            raise ValueError(f"{fn}: rows must be 1-D, got shape {list(rows.shape)}")
        idx = rows.to(device=device, dtype=torch.long)
    elif isinstance(rows, (list, tuple, range)):
        items = []
        for r in rows:
            try:
                if isinstance(r, bool):
                    raise TypeError
                items.append(operator.index(r))
            except TypeError:
                raise TypeError(f"{fn}: rows must hold ints, got {type(r).__name__}") from None
        idx = torch.tensor(items, dtype=torch.long, device=device)
    else:
        hint = " (use [i] for the single row i)" if isinstance(rows, int) else ""
        raise TypeError(f"{fn}: rows must be a 1-D integer tensor or a sequence of ints, got {type(rows).__name__}{hint}")
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= L:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{fn}: rows must lie in [0, L) = [0, {L}), got {bad}")
    return idx


def attention_weights(
    query: Tensor,
    key: Tensor,
    num_landmarks: int = 64,
    *,
    rows: Rows = None,
    pinv_iterations: int = 6,
    pinv_init: str = "per_head",
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """The attention probabilities that :func:`torch_nystrom.nystrom_attention` applies to ``value``.

    Returns ``W`` of shape ``(B, H, len(rows), S)`` (all ``L`` rows when ``rows`` is
    None) with ``W[..., i, :] @ value == nystrom_attention(query, key, value, ...)[..., rows[i], :]``
    up to rounding: ``F[rows] · Z · Bm`` on the Nyström path (docs/DESIGN.md §2 steps 2–5)
    and the exact softmax rows for batch elements with ``L_b, S_b <= m``. Padded keys get
    weight 0; rows of padded queries are 0. The Nyström rows are an approximation: they
    need not be non-negative nor sum to exactly 1.

    Memory is O(len(rows) · S + m · S) per head: only the requested rows are formed, so
    the class token's map over 100k patches (``rows=[0]``) is cheap. The landmarks, A, c
    and Z are those of the whole call (``pinv_init="original"`` takes its maximum over
    the whole batch, as the op does). Computed in float32 (float64 for float64 inputs),
    returned in the input dtype; differentiable with respect to ``query`` and ``key``.

    Args:
        query, key, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
        query_padding_mask, scale: as for :func:`torch_nystrom.nystrom_attention`.
        rows: the query rows to return: a 1-D integer tensor or a sequence of ints in
            ``[0, L)`` (repeats allowed), or None for all rows.
    """
    s = check_arguments("attention_weights", query, key, None, num_landmarks, pinv_iterations, pinv_init,
                        key_padding_mask, query_padding_mask, scale)
    B, H, L, _ = query.shape
    S = key.shape[2]
    idx = _row_index(rows, L, query.device)
    acc = accumulate_dtype(query.dtype)
    if B * H == 0 or idx.numel() == 0:
        return torch.zeros(B, H, idx.numel(), S, dtype=query.dtype, device=query.device)
    q, k = query.to(acc), key.to(acc)
    lm = landmarks(q, k, num_landmarks, pinv_iterations, pinv_init, key_padding_mask, query_padding_mask, s)
    real_keys_check("attention_weights", lm)
    q_rows = q.index_select(2, idx)  # (B, H, r, D)
    real_k = lm.kseg.real[:, None, None, :]  # (B, 1, 1, S)
    w = torch.zeros(B, H, idx.numel(), S, dtype=acc, device=query.device)
    if bool(lm.nystrom.any()):
        F = masked_softmax(q_rows @ (lm.k_lm * s).transpose(-1, -2), lm.q_cols)[0]  # (B, H, r, ms)
        Bm = masked_softmax((lm.q_lm * s) @ k.transpose(-1, -2), real_k)[0]  # (B, H, ms, S)
        w = torch.where(lm.nystrom[:, None, None, None], (F @ lm.Z) @ Bm, w)
    if bool(lm.exact.any()):
        exact = masked_softmax(q_rows @ (k * s).transpose(-1, -2), real_k)[0]
        w = torch.where(lm.exact[:, None, None, None], exact, w)
    real_rows = lm.qseg.real.index_select(1, idx)[:, None, :, None]  # (B, 1, r, 1)
    return torch.where(real_rows & real_k, w, 0).to(query.dtype)
