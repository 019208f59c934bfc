"""Drop-in Nyström attention for Hugging Face transformers' Nystromformer models.

:func:`swap_nystromformer_attention` replaces every ``NystromformerSelfAttention`` of a
transformers Nystromformer model (``NystromformerModel``, ``NystromformerForMaskedLM``,
``NystromformerForSequenceClassification``, ...) by :class:`NystromformerSelfAttentionOps`,
which computes the same function with the ``torch.ops.nystrom`` ops. The query/key/value
``Linear`` layers and the depthwise ``conv`` are the original modules, reused as they are,
so the parameters and the ``state_dict`` keys do not change.

transformers is imported only when :func:`swap_nystromformer_attention` is called.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["swap_nystromformer_attention", "NystromformerSelfAttentionOps"]

# An additive mask value at or below this counts as "padding": exp() of it underflows against any
# realistic score, so adding it is the same as removing the key (transformers uses the dtype's min).
_PADDING_THRESHOLD = -1.0e4


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class NystromformerSelfAttentionOps(nn.Module):
    """``NystromformerSelfAttention`` of transformers, computed with ``torch.ops.nystrom``.

    Built from an existing transformers layer, whose ``query``, ``key``, ``value`` and ``conv``
    (if any) modules it takes over unchanged; ``forward(hidden_states, attention_mask=None,
    output_attentions=False)`` has the signature and outputs of the original.

    What is computed, with ``n`` the actual sequence length, ``m = num_landmarks``,
    ``seq_len = segment_means_seq_len``, ``q`` and ``k`` each divided by ``head_dim ** 0.25`` (as
    transformers does, so every softmax below has scale 1):

    * ``m == seq_len`` (the configuration switch of transformers): exact attention
      ``softmax(q kᵀ + mask) v`` at any length ``n``. One op call (``num_landmarks = max(n, 1)``,
      which puts every batch element on the op's exact path, ``key_padding_mask`` = the padding).
    * otherwise Nyström attention ``F · Z · (Bm · v)`` with ``F = softmax(q k̃ᵀ)``,
      ``A = softmax(q̃ k̃ᵀ)``, ``Z`` = 6 Newton–Schulz iterations for ``A⁺`` initialised as
      transformers' ``inv_coeff_init_option`` says (``"original"``, the default: one maximum column
      sum over the whole batch and all heads; anything else: per batch element and head), and
      ``Bm = softmax(q̃ kᵀ + mask)``. The landmarks ``q̃``, ``k̃`` are segment means over **all**
      ``n`` tokens, padded ones included; the mask only enters the key-side softmax ``Bm``.

      - no padding and ``n > m``: one op call ``nystrom_attention(q, k, v, m, 6, pinv_init)``;
      - padding (or ``n == m`` on transformers' valid path, see below): a composition, because the
        op's own masks also remove padded tokens from the landmarks. ``W = Bm · v`` is an op call
        on its exact path (queries ``q̃``, keys ``k``, ``key_padding_mask``), and the output
        ``F · (Z W)`` is a second op call on its exact path (queries ``q``, keys ``k̃``, values
        ``Z W``); the landmarks, ``A`` and ``Z`` (all ``m``-sized) are plain torch, written as
        transformers writes them.

    transformers cuts the sequence into ``m`` segments of ``seq_len // m`` tokens with a reshape
    that is right only when ``n == m * (seq_len // m)`` (e.g. ``n == seq_len`` with ``m`` dividing
    it); at other lengths it raises or mixes tokens of different batch elements. There this layer
    computes the Nyström attention of docs/DESIGN.md §2 on the actual length instead: segment ``j`` covers
    tokens ``[floor(j n / m), floor((j + 1) n / m))`` (the same equal segments where transformers
    is right), and ``n <= m`` gives exact attention ``softmax(q kᵀ + mask) v``. The padding rule
    stays the one above (landmarks over all tokens, mask on ``Bm`` only), so a padded batch means
    the same thing at every length.

    The mask is the one ``NystromformerModel`` passes down: ``None`` without padding, else an
    additive float mask ``(B, 1, L, n)`` (0 for real keys, the dtype's minimum for padding) that is
    the same for every query row (a bool mask, ``True`` = attend, is accepted too). Only its key
    padding is used; outside ``torch.compile`` other masks (soft biases, per-query masks) are
    refused. transformers 5.x passes ``(B, 1, L, n)`` masks that its own Nyström path cannot
    broadcast against the ``(B, H, m, n)`` landmark scores (a RuntimeError whenever there is
    padding and ``m != seq_len``); this layer applies the mask per key as transformers 4.x did with
    its ``(B, 1, 1, n)`` masks. A batch element whose keys are all padding gets what transformers
    computes for it: every score equals the dtype's minimum, so the softmax is uniform over all
    ``n`` keys (the mean of ``v``).

    Rows of padded queries are computed like any other row (transformers does not mask queries).
    The depthwise convolution of ``v`` (if configured) is added unmasked, as in transformers.
    transformers never applies the layer's ``dropout`` (attention-probability dropout) in its
    forward, so neither does this layer, in training mode either; the other dropouts of the model
    live in modules that are not replaced. ``output_attentions=True`` returns transformers'
    attention matrix (``softmax`` probabilities on the exact path, ``F · Z`` on the Nyström path),
    computed with plain torch only when asked for.
    """

    def __init__(self, hf_attention: nn.Module) -> None:
        super().__init__()
        self.num_attention_heads = int(hf_attention.num_attention_heads)
        self.attention_head_size = int(hf_attention.attention_head_size)
        self.all_head_size = int(hf_attention.all_head_size)
        self.num_landmarks = int(hf_attention.num_landmarks)
        self.seq_len = int(hf_attention.seq_len)
        self.conv_kernel_size = hf_attention.conv_kernel_size
        self.init_option = hf_attention.init_option
        self.pinv_init = "original" if self.init_option == "original" else "per_head"
        self.pinv_iterations = 6  # transformers calls iterative_inv with its default n_iter=6
        # Registered in transformers' order, so the state_dict lists the same keys in the same order.
        self.query = hf_attention.query
        self.key = hf_attention.key
        self.value = hf_attention.value
        self.dropout = hf_attention.dropout  # kept for structure; transformers never applies it
        if self.conv_kernel_size is not None:
            self.conv = hf_attention.conv
        self.train(hf_attention.training)

    # ------------------------------------------------------------------ helpers

    def _key_padding(self, attention_mask: Optional[Tensor], batch: int, n: int) -> Optional[Tensor]:
        """(B, n) bool, True = padded key, from transformers' attention mask; None if no mask."""
        if attention_mask is None:
            return None
        mask = attention_mask
        if mask.dim() != 4 or mask.size(-1) != n:
            raise ValueError(
                "NystromformerSelfAttentionOps: attention_mask must be a 4-D mask (B, 1, L, n) as "
                f"NystromformerModel builds it, with n = {n} keys; got shape {list(mask.shape)}"
            )
        row = mask[:, 0, 0, :]
        if not torch.compiler.is_compiling():
            if not torch.equal(mask, row[:, None, None, :].expand_as(mask)):
                raise ValueError(
                    "NystromformerSelfAttentionOps: attention_mask must be a key-padding mask, the same "
                    "for every head and query (Nyström attention has no per-query masks)"
                )
            if mask.dtype != torch.bool and not bool(((row == 0) | (row <= _PADDING_THRESHOLD)).all()):
                raise ValueError(
                    "NystromformerSelfAttentionOps: an additive attention_mask must hold 0 (attend) or a "
                    f"large negative value <= {_PADDING_THRESHOLD:g} (padding), as transformers builds it"
                )
        pad = ~row if mask.dtype == torch.bool else row < 0
        return pad.expand(batch, n)

    def _landmarks(self, x: Tensor, m: int) -> Tensor:
        """Segment means along dim 2 of x (B, H, n, D) -> (B, H, m, D), n >= m."""
        b, h, n, d = x.shape
        if n % m == 0:
            # transformers' own expression (equal segments).
            return x.reshape(b, h, m, n // m, d).mean(dim=-2)
        # The segments of docs/DESIGN.md §2 step 2: token t is in segment floor(((t + 1) m - 1) / n).
        seg = ((torch.arange(n, device=x.device) + 1) * m - 1) // n
        onehot = (seg[None, :] == torch.arange(m, device=x.device)[:, None]).to(x.dtype)
        return (onehot / onehot.sum(dim=-1, keepdim=True)) @ x

    def _pinv(self, a: Tensor) -> Tensor:
        """transformers' iterative_inv (Newton–Schulz) of a (B, H, m, m), in a's dtype."""
        identity = torch.eye(a.size(-1), dtype=a.dtype, device=a.device)
        if self.pinv_init == "original":
            z = 1 / torch.max(torch.sum(a, dim=-2)) * a.transpose(-1, -2)
        else:
            z = 1 / torch.max(torch.sum(a, dim=-2), dim=-1).values[:, :, None, None] * a.transpose(-1, -2)
        for _ in range(self.pinv_iterations):
            az = torch.matmul(a, z)
            z = torch.matmul(
                0.25 * z, 13 * identity - torch.matmul(az, 15 * identity - torch.matmul(az, 7 * identity - az))
            )
        return z

    @staticmethod
    def _exact(q: Tensor, k: Tensor, v: Tensor, pad: Optional[Tensor]) -> Tensor:
        """softmax(q kᵀ + mask) v (scale 1) with the op on its exact path.

        A batch element whose keys are all padding gets transformers' result for it: all scores
        are the dtype's minimum, so the softmax is uniform over all keys.
        """
        big = max(q.size(2), k.size(2), 1)
        if pad is None:
            return torch.ops.nystrom.nystrom_attention(q, k, v, big, 0, "per_head", None, None, 1.0)
        all_pad = pad.all(dim=1)
        out = torch.ops.nystrom.nystrom_attention(
            q, k, v, big, 0, "per_head", pad & ~all_pad[:, None], None, 1.0
        )
        return torch.where(all_pad[:, None, None, None], v.mean(dim=2, keepdim=True), out)

    def _attention_probs(
        self, q: Tensor, k: Tensor, pad: Optional[Tensor], kl: Optional[Tensor], z: Optional[Tensor]
    ) -> Tensor:
        """transformers' second output: the exact softmax, or F · Z on the Nyström path."""
        if kl is None:
            scores = torch.matmul(q, k.transpose(-1, -2))
            if pad is not None:
                scores = scores.masked_fill(pad[:, None, None, :], torch.finfo(scores.dtype).min)
            return torch.softmax(scores, dim=-1)
        f = torch.softmax(torch.matmul(q, kl.transpose(-1, -2)), dim=-1)
        return torch.matmul(f, z.to(f.dtype))

    # ------------------------------------------------------------------ forward

    def forward(
        self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None, output_attentions: bool = False
    ) -> Tuple[Tensor, ...]:
        b, n = hidden_states.shape[:2]
        shape = (b, n, -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        # Exactly transformers' scaling: q and k each by head_dim ** -0.25, so all softmaxes have scale 1.
        q = q / math.sqrt(math.sqrt(self.attention_head_size))
        k = k / math.sqrt(math.sqrt(self.attention_head_size))
        pad = self._key_padding(attention_mask, b, n)

        m = self.num_landmarks
        segment = self.seq_len // m
        hf_valid = segment >= 1 and n == m * segment  # transformers' reshape is right at this length
        kl: Optional[Tensor] = None
        z: Optional[Tensor] = None
        if m == self.seq_len or (n <= m and not hf_valid):
            # Exact attention: transformers' exact branch, or docs/DESIGN.md §2 step 1 for n <= m.
            context = self._exact(q, k, v, pad)
        elif pad is None and n > m:
            # The op's Nyström path is transformers' computation (landmarks of all tokens, no mask).
            context = torch.ops.nystrom.nystrom_attention(
                q, k, v, m, self.pinv_iterations, self.pinv_init, None, None, 1.0
            )
            if output_attentions:
                kl = self._landmarks(k, m)
                ql = self._landmarks(q, m)
                acc = _compute_dtype(q.dtype)
                z = self._pinv(torch.softmax(torch.matmul(ql, kl.transpose(-1, -2)).to(acc), dim=-1))
        else:
            # Composition: the mask changes only Bm, which the op's masks cannot express alone.
            ql = self._landmarks(q, m)
            kl = self._landmarks(k, m)
            acc = _compute_dtype(q.dtype)
            z = self._pinv(torch.softmax(torch.matmul(ql, kl.transpose(-1, -2)).to(acc), dim=-1))
            w = self._exact(ql, k, v, pad)  # Bm · v, (B, H, m, Dv)
            zw = torch.matmul(z, w.to(acc)).to(v.dtype)
            context = self._exact(q, kl, zw, None)  # F · (Z · Bm · v)

        if self.conv_kernel_size is not None:
            context = context + self.conv(v)

        context = context.permute(0, 2, 1, 3).contiguous()
        context = context.view(b, n, self.all_head_size)
        if output_attentions:
            return context, self._attention_probs(q, k, pad, kl, z)
        return (context,)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_attention_heads}, head_size={self.attention_head_size}, "
            f"num_landmarks={self.num_landmarks}, segment_means_seq_len={self.seq_len}, "
            f"pinv_init={self.pinv_init!r}, conv_kernel_size={self.conv_kernel_size}"
        )


def swap_nystromformer_attention(model: nn.Module) -> nn.Module:
    """Replace every transformers ``NystromformerSelfAttention`` in ``model`` by one using ``torch.ops.nystrom``.

    Works on any Nystromformer model of transformers (``NystromformerModel``,
    ``NystromformerForMaskedLM``, ``NystromformerForSequenceClassification``, ...) or any module
    holding such layers. The replacement (:class:`NystromformerSelfAttentionOps`, whose docstring
    states exactly what it computes) reuses the original ``query``/``key``/``value`` ``Linear``
    layers and ``conv`` module: parameters, devices, dtypes and ``state_dict`` keys are unchanged,
    and a checkpoint loads into either form. Where transformers' own code is correct the outputs
    are the same as the original's (up to float rounding), with and without ``attention_mask``;
    where it is not (other sequence lengths than ``segment_means_seq_len``, padding on the
    Nyström path with transformers 5.x) the replacement computes Nyström attention on the actual
    length.

    The model is modified in place and returned (if ``model`` itself is a
    ``NystromformerSelfAttention``, its replacement is returned). Layers already swapped are left
    alone; a model without any Nystromformer self-attention raises ``ValueError``.
    """
    from transformers.models.nystromformer.modeling_nystromformer import NystromformerSelfAttention

    if isinstance(model, NystromformerSelfAttention):
        return NystromformerSelfAttentionOps(model)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, NystromformerSelfAttention)]
    if not targets and not any(isinstance(mod, NystromformerSelfAttentionOps) for mod in model.modules()):
        raise ValueError(
            f"swap_nystromformer_attention: {type(model).__name__} holds no transformers NystromformerSelfAttention"
        )
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NystromformerSelfAttentionOps(mod))
    return model
