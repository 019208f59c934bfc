"""``torch.nn`` layers built on the Nyström attention op."""
from typing import Optional

import torch
from torch import Tensor, nn


class NystromAttention(nn.Module):
    """Multi-head self-attention whose attention is Nyström attention.

    Input ``x`` of shape ``(B, L, embed_dim)`` and an optional bool
    ``key_padding_mask`` of shape ``(B, L)`` (``True`` marks padding, as in
    :class:`torch.nn.MultiheadAttention`), which masks both the keys and the
    queries: outputs at padded positions are the output projection of zero.

    Args:
        embed_dim: model width ``E``; divisible by ``num_heads``.
        num_heads: number of heads ``H``.
        num_landmarks: landmarks ``m`` per head.
        pinv_iterations: Newton–Schulz iterations.
        pinv_init: ``"per_head"`` or ``"original"`` (see :func:`nystrom_attention`).
        conv_kernel_size: if set (odd), adds the paper's depthwise convolution of
            ``V`` along the sequence (one filter per head) to the attention output;
            padded positions of ``V`` are zeroed before the convolution.
        bias: whether the q/k/v/out projections have a bias.
        group: a ``torch.distributed`` process group for sequence parallelism (docs/DESIGN.md §12): ``x`` and
            ``key_padding_mask`` are then this rank's shard of the sequence (the ranks of the group hold
            consecutive shards in rank order; lengths may differ, shards may be empty), the attention is
            :func:`torch_nystrom.distributed.nystrom_attention` and the convolution exchanges ``conv_kernel_size
            // 2`` rows with the neighbouring shards, so that the output shard equals the one-process layer's
            on the whole sequence. Parameter gradients are this rank's part: sum them over the group (as data
            parallelism does). ``None`` (default): one process. Not available in a scripted module.

    The module is accepted by :func:`torch.jit.script`; a scripted module runs
    wherever the operator library is loaded (see :func:`torch_nystrom.library_path`).
    """

    __jit_ignored_attributes__ = ["group"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_landmarks: int = 64,
        *,
        pinv_iterations: int = 6,
        pinv_init: str = "per_head",
        conv_kernel_size: Optional[int] = None,
        bias: bool = True,
        group: Optional["torch.distributed.ProcessGroup"] = None,
    ) -> None:
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"NystromAttention: embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})"
            )
        if num_landmarks < 1:
            raise ValueError(f"NystromAttention: num_landmarks must be >= 1, got {num_landmarks}")
        if pinv_iterations < 0:
            raise ValueError(f"NystromAttention: pinv_iterations must be >= 0, got {pinv_iterations}")
        if pinv_init not in ("per_head", "original"):
            raise ValueError(f'NystromAttention: pinv_init must be "per_head" or "original", got "{pinv_init}"')
        if conv_kernel_size is not None and (conv_kernel_size < 1 or conv_kernel_size % 2 == 0):
            raise ValueError(f"NystromAttention: conv_kernel_size must be a positive odd number, got {conv_kernel_size}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.pinv_init = pinv_init
        # Sequence parallelism: the group is no TorchScript type, so scripting ignores it and the sharded path.
        self.sequence_parallel = group is not None
        self.group = group
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # None or the depthwise convolution; torch.jit.script resolves the branch statically.
        self.conv: Optional[nn.Conv2d] = None
        if conv_kernel_size is not None:
            self.conv = nn.Conv2d(
                num_heads,
                num_heads,
                (conv_kernel_size, 1),
                padding=(conv_kernel_size // 2, 0),
                groups=num_heads,
                bias=False,
            )

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3 or x.size(2) != self.embed_dim:
            raise ValueError(
                f"NystromAttention: x must have shape (B, L, embed_dim={self.embed_dim}), got {list(x.shape)}"
            )
        if self.sequence_parallel:
            return self._sharded_forward(x, key_padding_mask)
        b, n, e = x.shape
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        o = torch.ops.nystrom.nystrom_attention(
            q, k, v, self.num_landmarks, self.pinv_iterations, self.pinv_init, key_padding_mask, key_padding_mask, None
        )
        conv = self.conv
        if conv is not None:
            if key_padding_mask is not None:
                pad = key_padding_mask.view(b, 1, n, 1)
                o = o + conv(v.masked_fill(pad, 0.0))
                o = o.masked_fill(pad, 0.0)
            else:
                o = o + conv(v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, e))

    @torch.jit.unused
    def _sharded_forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        from . import distributed

        b, n, e = x.shape
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        o = distributed.nystrom_attention(
            q, k, v, self.num_landmarks, pinv_iterations=self.pinv_iterations, pinv_init=self.pinv_init,
            key_padding_mask=key_padding_mask, query_padding_mask=key_padding_mask, group=self.group)
        conv = self.conv
        if conv is not None:
            pad = None if key_padding_mask is None else key_padding_mask.view(b, 1, n, 1)
            vm = v if pad is None else v.masked_fill(pad, 0.0)
            o = o + distributed.depthwise_conv_along_shards(vm, conv.weight, self.group)
            if pad is not None:
                o = o.masked_fill(pad, 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, e))

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_landmarks={self.num_landmarks}, "
            f"pinv_iterations={self.pinv_iterations}, pinv_init={self.pinv_init!r}"
        )
