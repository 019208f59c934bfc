"""The functional form of Nyström attention."""
from typing import Optional

import torch
from torch import Tensor


def nystrom_attention(
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
    """Nyström approximation of ``softmax(scale * q k^T) v`` (Xiong et al., 2021).

    Args:
        query: ``(B, H, L, D)`` floating tensor (float32, float64, float16 or bfloat16).
        key: ``(B, H, S, D)``, same dtype and device as ``query``.
        value: ``(B, H, S, Dv)``, same dtype and device as ``query``.
        num_landmarks: number of landmarks ``m >= 1``. A batch element with at most
            ``m`` real queries and at most ``m`` real keys gets exact softmax attention.
        pinv_iterations: Newton–Schulz iterations for the pseudoinverse (``>= 0``).
        pinv_init: ``"per_head"`` (default; results do not depend on the rest of the
            batch) or ``"original"`` (the paper's and Hugging Face's initial scale, one
            maximum over the whole batch and all heads).
        key_padding_mask: optional bool ``(B, S)``; ``True`` marks padding.
        query_padding_mask: optional bool ``(B, L)``; ``True`` marks padding. Output rows
            of padded queries are zero.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(B, H, L, Dv)`` tensor of the input dtype. Softmax statistics and the
        pseudoinverse are computed in float32 (float64 for float64 inputs).

    Differentiable with respect to ``query``, ``key`` and ``value``: the gradient is the
    exact derivative of the computed function. Double backward is not supported.
    """
    return torch.ops.nystrom.nystrom_attention(
        query,
        key,
        value,
        num_landmarks,
        pinv_iterations,
        pinv_init,
        key_padding_mask,
        query_padding_mask,
        scale,
    )
