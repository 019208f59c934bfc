"""A drop-in for lucidrains' ``nystrom-attention`` layer, computed with ``torch.ops.nystrom``.

Change one import::

    from nystrom_attention import NystromAttention      # before
    from torch_nystrom.lucidrains import NystromAttention  # after

:class:`NystromAttention` has the constructor, the parameters (``state_dict`` keys ``to_qkv.weight``,
``to_out.0.weight``, ``to_out.0.bias``, ``res_conv.weight``) and the ``forward`` of
``nystrom_attention.NystromAttention`` version 0.0.14, and computes the same function, masks included
(see the class docstring for what that function is). Checkpoints load either way.
The package itself is not needed at run time.
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NystromAttention"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax(scores: Tensor, rows: Optional[Tensor], cols: Optional[Tensor]) -> Tensor:
    """softmax over the last dim, with the package's fill: an entry whose row or column flag is False
    gets ``-finfo.max`` (so a row with every entry filled is uniform). rows (B, I), cols (B, J) bool."""
    if rows is not None and cols is not None:
        keep = rows[:, None, :, None] & cols[:, None, None, :]
        scores = scores.masked_fill(~keep, -torch.finfo(scores.dtype).max)
    return torch.softmax(scores, dim=-1)


def _pinv_row_col(a: Tensor, iterations: int) -> Tensor:
    """Newton–Schulz for the pseudoinverse of a (B, H, m, m), started as the package starts it:
    ``aᵀ`` over (largest row sum of ``|a|``) x (largest column sum of ``|a|``), both maxima taken over the
    whole tensor (every batch element and head)."""
    mag = a.abs()
    z = a.transpose(-1, -2) / (mag.sum(dim=-1).max() * mag.sum(dim=-2).max())
    eye = torch.eye(a.size(-1), dtype=a.dtype, device=a.device)
    for _ in range(iterations):
        az = a @ z
        z = (0.25 * z) @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class _Landmarks:
    """The package's landmarks of (already padded, masked and scaled) q, k of length m * l: the sum over
    each fixed segment of l tokens divided by l, or with a mask by (real tokens in it + eps).
    ``present`` (B, m) bool says which segments hold a real token (None without a mask)."""

    def __init__(self, qs: Tensor, k: Tensor, keep: Optional[Tensor], m: int, eps: float) -> None:
        b, h, n, d = qs.shape
        seg = n // m
        q_sum = qs.reshape(b, h, m, seg, d).sum(dim=3)
        k_sum = k.reshape(b, h, m, seg, d).sum(dim=3)
        self.present: Optional[Tensor] = None
        if keep is None:
            self.q = q_sum / seg
            self.k = k_sum / seg
        else:
            count = keep.reshape(b, m, seg).sum(dim=-1)
            # integer count + eps: the default dtype, as in the package (float32 rounds eps away for count >= 1)
            divisor = (count + eps)[:, None, :, None]
            self.q = (q_sum / divisor).to(qs.dtype)  # a float32 divisor must not promote half inputs
            self.k = (k_sum / divisor).to(k.dtype)
            self.present = count > 0

    def pinv(self, iterations: int) -> Tensor:
        """Z, the package's Newton–Schulz pseudoinverse of A = softmax(q̃ k̃ᵀ), in the compute dtype."""
        acc = _compute_dtype(self.q.dtype)
        scores = (self.q.to(acc) @ self.k.to(acc).transpose(-1, -2))
        return _pinv_row_col(_masked_softmax(scores, self.present, self.present), iterations)


def _attend(q: Tensor, k: Tensor, v: Tensor, key_padding: Optional[Tensor]) -> Tensor:
    """softmax(q kᵀ) v (scale 1) for the composition's two products, where one side is m long;
    key_padding (B, S) bool, True = left out. A batch element whose keys are all left out is computed
    without the mask (the caller replaces its rows).

    torch's scaled_dot_product_attention, O(L S) memory. The op's exact path (num_landmarks >= L, S)
    would do the same arithmetic, but it sizes its landmark buffers (B, H, ms, ms) with
    ms = min(num_landmarks, max(L, S)): 2 GiB at L = 256, S = 8192, H = 8, where SDPA needs a few MiB.
    """
    attn_mask = None
    if key_padding is not None:
        key_padding = key_padding & ~key_padding.all(dim=1, keepdim=True)
        attn_mask = ~key_padding[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)


class NystromAttention(nn.Module):
    """lucidrains' ``nystrom_attention.NystromAttention`` (0.0.14), computed with ``torch.ops.nystrom``.

    Args (as in the package): ``dim`` model width; ``dim_head`` per-head width; ``heads``;
    ``num_landmarks`` m; ``pinv_iterations`` Newton–Schulz iterations; ``residual`` adds the depthwise
    convolution of ``v`` along the sequence (``res_conv``, kernel ``residual_conv_kernel``, odd);
    ``eps`` of the masked landmark means; ``dropout`` after the output projection.

    ``forward(x, mask=None, return_attn=False, return_attn_matrices=False, *, attn_rows=None)`` with
    ``x`` (B, n, dim) and ``mask`` (B, n) bool, **True = real token** (the package's convention, the
    opposite of ``torch.nn.MultiheadAttention``'s). What it computes is the package's function:

    * the sequence is left-padded with zero tokens to n' = m * ceil(n / m); ``q`` alone is scaled by
      ``dim_head ** -0.5``; landmark j is the sum over the fixed segment of tokens
      [j l, (j + 1) l), l = n' / m, divided by l;
    * without a mask the zero tokens are ordinary tokens: keys with score 0 and values 0, and they
      count in the landmark means;
    * with a mask, masked tokens and the left padding are zeroed in ``q``, ``k``, ``v``; a landmark is
      the sum over its segment divided by (its real tokens + eps); a segment without a real token is an
      empty landmark. Scores against masked keys or empty landmarks are ``-finfo.max``: rows of
      masked queries and of empty landmarks are therefore uniform (over all m landmarks, all m
      landmarks and all n' keys respectively, in F, A and Bm);
    * Z = ``pinv_iterations`` Newton–Schulz steps for A⁺ from Z₀ = Aᵀ / (max row sum of |A| x max
      column sum of |A|), both maxima over the whole batch and all heads; out = F Z (Bm v), plus
      ``res_conv(v)``; the output projection; the last n rows.

    Where the op's own contract computes this function (no mask and n > m: the padded length is
    more than m) the layer is one call of ``torch.ops.nystrom.nystrom_attention`` with
    ``pinv_init="original"``, whose start Aᵀ / (max column sum) differs from the package's only by
    the largest row sum of a softmax, 1 up to rounding. Otherwise (a mask, or n <= m, where the
    padded length is m and the op would take its exact path while the package still runs
    Newton–Schulz on m one-token segments) the landmarks, A and Z (all m-sized) are computed as the
    package computes them, and ``Bm v`` and ``F (Z Bm v)`` are two calls of the op on its exact path.
    float32 and float64 give the package's results up to rounding; for float16 / bfloat16 the
    m-sized parts run in float32 (the package runs them in the input dtype).

    Returns ``out`` (B, n, dim); with ``return_attn=True`` also the package's attention matrix
    F Z Bm, (B, heads, n', n') over the padded sequence (the input tokens are the last n rows and
    columns; memory n'^2 per head, as in the package, but no other n x n temporary). With
    ``attn_rows`` (indices into the n input tokens, negative counting from the end; needs
    ``return_attn=True``) only those rows, (B, heads, len(attn_rows), n'), in O((len(rows) + m) n')
    memory per head: e.g. ``attn_rows=[0]`` is a class token's map over every token. With
    ``return_attn_matrices=True`` (and not ``return_attn``) the three factors ``(F, Z, Bm)``,
    (B, heads, n', m), (B, heads, m, m), (B, heads, m, n'), as the package returns them.
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual: bool = True,
        residual_conv_kernel: int = 33,
        eps: float = 1e-8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("dim_head", dim_head), ("heads", heads), ("num_landmarks", num_landmarks)):
            if value < 1:
                raise ValueError(f"NystromAttention: {name} must be >= 1, got {value}")
        if pinv_iterations < 0:
            raise ValueError(f"NystromAttention: pinv_iterations must be >= 0, got {pinv_iterations}")
        if residual and (residual_conv_kernel < 1 or residual_conv_kernel % 2 == 0):
            raise ValueError(
                "NystromAttention: residual_conv_kernel must be a positive odd number (the convolution keeps "
                f"the sequence length only then), got {residual_conv_kernel}"
            )
        self.eps = eps
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        inner = heads * dim_head
        # The package's modules, names and order: its checkpoints load as they are.
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.residual = residual
        if residual:
            self.res_conv = nn.Conv2d(
                heads,
                heads,
                (residual_conv_kernel, 1),
                padding=(residual_conv_kernel // 2, 0),
                groups=heads,
                bias=False,
            )

    def _check(self, x: Tensor, mask: Optional[Tensor]) -> None:
        dim = self.to_qkv.in_features
        if x.dim() != 3 or x.size(2) != dim:
            raise ValueError(f"NystromAttention: x must have shape (B, n, dim={dim}), got {list(x.shape)}")
        if x.size(1) == 0:
            raise ValueError("NystromAttention: x must hold at least one token (n >= 1)")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"NystromAttention: mask must be a bool tensor (True = real token), got {mask.dtype}")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"NystromAttention: mask must have shape (B, n) = {list(x.shape[:2])}, got {list(mask.shape)}"
                )

    def _heads(self, t: Tensor, pad: int, keep: Optional[Tensor]) -> Tensor:
        b, n, _ = t.shape
        t = F.pad(t.view(b, n, self.heads, self.dim_head).transpose(1, 2), (0, 0, pad, 0))
        return t if keep is None else t * keep[:, None, :, None].to(t.dtype)

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        return_attn: bool = False,
        return_attn_matrices: bool = False,
        *,
        attn_rows: Optional[Union[Sequence[int], Tensor]] = None,
    ) -> Union[Tensor, Tuple[Tensor, Union[Tensor, Tuple[Tensor, Tensor, Tensor]]]]:
        self._check(x, mask)
        if attn_rows is not None and not return_attn:
            raise ValueError("NystromAttention: attn_rows selects rows of the attention matrix: pass return_attn=True")
        b, n, _ = x.shape
        m = self.num_landmarks
        pad = (m - n % m) % m
        padded = n + pad
        keep = None if mask is None else F.pad(mask, (pad, 0), value=False)
        # to_qkv has no bias, so projecting first and padding after gives the package's zero tokens.
        q, k, v = (self._heads(t, pad, keep) for t in self.to_qkv(x).chunk(3, dim=-1))

        if keep is None and padded > m:
            out = torch.ops.nystrom.nystrom_attention(
                q, k, v, m, self.pinv_iterations, "original", None, None, self.scale
            )
            lm: Optional[_Landmarks] = None
            z: Optional[Tensor] = None
        else:
            qs = q * self.scale
            lm = _Landmarks(qs, k, keep, m, self.eps)
            z = lm.pinv(self.pinv_iterations)
            w = _attend(lm.q, k, v, None if keep is None else ~keep)  # Bm v
            if lm.present is not None:
                # empty landmarks: uniform over all n' keys (masked values are zero)
                w = torch.where(lm.present[:, None, :, None], w, v.mean(dim=2, keepdim=True))
            zw = (z @ w.to(z.dtype)).to(v.dtype)
            out = _attend(qs, lm.k, zw, None if lm.present is None else ~lm.present)  # F (Z Bm v)
            if keep is not None:
                # masked queries: uniform over all m landmarks
                out = torch.where(keep[:, None, :, None], out, zw.mean(dim=2, keepdim=True))

        if self.residual:
            out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).reshape(b, padded, -1))[:, -n:]

        if not (return_attn or return_attn_matrices):
            return out
        if lm is None:
            lm = _Landmarks(q * self.scale, k, keep, m, self.eps)
            z = lm.pinv(self.pinv_iterations)
        assert z is not None
        if return_attn:
            return out, self._attention(q, k, keep, lm, z, n, pad, attn_rows).to(x.dtype)
        f, bm = self._factors(q, k, keep, lm, None)
        return out, (f.to(x.dtype), z.to(x.dtype), bm.to(x.dtype))

    def _factors(
        self, q: Tensor, k: Tensor, keep: Optional[Tensor], lm: _Landmarks, rows: Optional[Tensor]
    ) -> Tuple[Tensor, Tensor]:
        """F (at the padded query rows `rows`, all if None) and Bm, in the compute dtype."""
        acc = _compute_dtype(q.dtype)
        qs = (q * self.scale).to(acc)
        row_keep = keep
        if rows is not None:
            qs = qs[:, :, rows]
            row_keep = None if keep is None else keep[:, rows]
        f = _masked_softmax(qs @ lm.k.to(acc).transpose(-1, -2), row_keep, lm.present)
        bm = _masked_softmax(lm.q.to(acc) @ k.to(acc).transpose(-1, -2), lm.present, keep)
        return f, bm

    def _attention(
        self,
        q: Tensor,
        k: Tensor,
        keep: Optional[Tensor],
        lm: _Landmarks,
        z: Tensor,
        n: int,
        pad: int,
        attn_rows: Optional[Union[Sequence[int], Tensor]],
    ) -> Tensor:
        """Rows of F Z Bm, the package's (B, heads, n', n') matrix; `attn_rows` index the n input tokens."""
        rows = None
        if attn_rows is not None:
            rows = torch.as_tensor(attn_rows, dtype=torch.long, device=q.device).reshape(-1)
            if rows.numel() and (bool((rows < -n).any()) or bool((rows >= n).any())):
                raise ValueError(f"NystromAttention: attn_rows must index the n = {n} input tokens, got {attn_rows}")
            rows = torch.remainder(rows, n) + pad
        f, bm = self._factors(q, k, keep, lm, rows)
        return f @ (z @ bm)

    def extra_repr(self) -> str:
        return (
            f"heads={self.heads}, dim_head={self.dim_head}, num_landmarks={self.num_landmarks}, "
            f"pinv_iterations={self.pinv_iterations}, residual={self.residual}, eps={self.eps}"
        )
