"""Sequence-parallel Nyström attention over ``torch.distributed`` (docs/DESIGN.md §12).

Each rank of a process group holds a contiguous shard of the sequence: the ranks hold consecutive shards in
rank order, shards may differ in length and may be empty. :func:`nystrom_attention` takes the local shards of
``query``, ``key``, ``value`` and of the padding masks and returns the local shard of the output; output and
gradients equal those of :func:`torch_nystrom.nystrom_attention` on the concatenated sequence.

What travels between the ranks does not grow with the sequence length: per call, the real-token counts of
every batch element, then per head ``m x 2D`` landmark sums (``m x (2D + Dv)`` when an element of the batch
takes the exact path: its values travel too), ``m`` row maxima and ``m x (Dv + 1)`` merged ``Bm·V``
partials; per backward ``m x (D + Dv)`` and ``m x D``. The arithmetic between the collectives
is done by registered ops (``torch.ops.nystrom.nystrom_sp_*``, CPU and CUDA kernels); the collectives are
``torch.distributed._functional_collectives``, inside a :class:`torch.autograd.Function`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["nystrom_attention", "depthwise_conv_along_shards", "communication_log", "shard_bounds"]

_OPS = torch.ops.nystrom
_NAME = "torch_nystrom.distributed.nystrom_attention"

# (collective, bytes) of every collective while communication_log() is active
_log: Optional[List[Tuple[str, int]]] = None


@contextlib.contextmanager
def communication_log() -> Iterator[List[Tuple[str, int]]]:
    """Records ``(collective, bytes sent by this rank into it)`` for every collective the calls inside the
    ``with`` block make (forward and backward), for benchmarks and tests."""
    global _log
    previous, _log = _log, []
    try:
        yield _log
    finally:
        _log = previous


# all_gather_single in recent torch (all_gather_tensor, its older name, warns there)
_gather_fn = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def _wait(t: Tensor) -> Tensor:
    return funcol.wait_tensor(t) if isinstance(t, funcol.AsyncCollectiveTensor) else t


def _all_reduce(t: Tensor, op: str, group) -> Tensor:
    if _log is not None:
        _log.append((f"all_reduce_{op}", t.numel() * t.element_size()))
    return _wait(funcol.all_reduce(t.contiguous(), op, group))


def _all_gather(t: Tensor, group) -> Tensor:
    if _log is not None:
        _log.append(("all_gather", t.numel() * t.element_size()))
    return _wait(_gather_fn(t.contiguous(), 0, group))


def _sum_many(tensors: List[Tensor], group) -> List[Tensor]:
    """All-reduce (sum) of several tensors of one dtype as one flat collective."""
    flat = _all_reduce(torch.cat([t.reshape(-1) for t in tensors]), "sum", group)
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def shard_bounds(length: int, world_size: int, rank: int) -> Tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s shard when ``length`` positions are cut into ``world_size``
    consecutive shards of sizes differing by at most one (a convenience: any split works)."""
    return rank * length // world_size, (rank + 1) * length // world_size


def _geometry(query: Tensor, key: Tensor, kpm: Optional[Tensor], qpm: Optional[Tensor], num_landmarks: int,
              group) -> Tuple[Tensor, int, bool]:
    """Per batch element [q_offset, q_total, k_offset, k_total] of this rank's real tokens (int64 (B, 4), on the
    host), the landmark rows of the stage tensors, and whether an element takes the exact path: one all-gather
    of the local counts."""
    B, L, S = query.size(0), query.size(2), key.size(2)
    dev = query.device
    lq = (~qpm).sum(1) if qpm is not None else torch.full((B,), L, dtype=torch.long, device=dev)
    lk = (~kpm).sum(1) if kpm is not None else torch.full((B,), S, dtype=torch.long, device=dev)
    local = torch.cat([lq.long(), lk.long(), torch.tensor([L, S], dtype=torch.long, device=dev)])
    counts = _all_gather(local.view(1, -1), group).view(-1, 2 * B + 2).cpu()  # (world, 2B + 2)
    rank = dist.get_rank(group)
    before = counts[:rank].sum(0)
    total = counts.sum(0)
    geometry = torch.stack([before[:B], total[:B], before[B:2 * B], total[B:2 * B]], 1).contiguous()
    q_total, k_total = total[:B], total[B:2 * B]
    bad = (q_total > 0) & (k_total == 0)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        if int(total[2 * B + 1]) == 0:
            raise ValueError(f"{_NAME}: key must have at least one position over all the shards (S >= 1) when "
                             "there are queries")
        raise ValueError(f"{_NAME}: key_padding_mask masks every key of batch element {b} (over all the shards); "
                         "each batch element with real queries needs at least one real key")
    rows = max(1, min(num_landmarks, max(int(total[2 * B]), int(total[2 * B + 1]))))
    # element.h's element_kind: with no exact-path element the value rows are zero on every rank
    exact = bool(((q_total > 0) & (k_total > 0) & (q_total <= num_landmarks) & (k_total <= num_landmarks)).any())
    return geometry, rows, exact


class _SequenceParallelNystrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, kpm, qpm, geometry, rows, exact, m, iterations, pinv_init, scale, group):
        q_sums, k_sums, v_sums = _OPS.nystrom_sp_segment_sums(query, key, value, geometry, m, rows, kpm, qpm)
        if exact:  # the exact-path elements' values travel too (they are zero elsewhere)
            q_sums, k_sums, v_sums = _sum_many([q_sums, k_sums, v_sums], group)
        else:
            q_sums, k_sums = _sum_many([q_sums, k_sums], group)
        q_lm, part_max, part_sum, part_pv = _OPS.nystrom_sp_landmark_values(q_sums, key, value, geometry, m, kpm,
                                                                            scale)
        global_max = _all_reduce(part_max, "max", group)
        part_sum, part_pv = _OPS.nystrom_sp_merge_landmark_values(part_max, part_sum, part_pv, global_max)
        bm_sum, bm_pv = _sum_many([part_sum, part_pv], group)
        k_lm, bv, zbv, lse_landmark, pinv_scale = _OPS.nystrom_sp_pseudoinverse(
            q_lm, k_sums, v_sums, bm_sum, bm_pv, global_max, geometry, m, iterations, pinv_init, scale)
        out, lse_query = _OPS.nystrom_sp_query_forward(query, k_lm, zbv, geometry, m, qpm, scale)
        ctx.save_for_backward(query, key, value, kpm, qpm, geometry, q_lm, k_lm, bv, zbv, lse_query, lse_landmark,
                              pinv_scale)
        ctx.args = (m, iterations, pinv_init, scale, group)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 13
        query, key, value, kpm, qpm, geometry, q_lm, k_lm, bv, zbv, lse_query, lse_landmark, pinv_scale = \
            ctx.saved_tensors
        m, iterations, pinv_init, scale, group = ctx.args
        dq, dkl, dw = _OPS.nystrom_sp_query_backward(grad_out.contiguous(), query, k_lm, zbv, lse_query, geometry,
                                                     m, qpm, scale)
        dkl, dw = _sum_many([dkl, dw], group)
        dql_kernel, k_share, dbv, v_share = _OPS.nystrom_sp_pseudoinverse_backward(
            dkl, dw, q_lm, k_lm, bv, pinv_scale, geometry, m, iterations, pinv_init, scale)
        dk, dv, dql_keys = _OPS.nystrom_sp_key_backward(key, value, q_lm, bv, lse_landmark, dbv, k_share, v_share,
                                                        geometry, m, kpm, scale)
        dql_keys = _all_reduce(dql_keys, "sum", group)
        dq = _OPS.nystrom_sp_query_spread(dq, dql_keys, dql_kernel, geometry, m, query.dtype, qpm)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def _check(query: Tensor, key: Tensor, value: Tensor, kpm, qpm, num_landmarks, pinv_iterations, pinv_init, scale):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{_NAME}: {name} must be a 4-D tensor shard (B, H, n, d), got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if query.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise ValueError(f"{_NAME}: query must be float32, float64, float16 or bfloat16, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{_NAME}: {name} must have query's dtype and device ({query.dtype}, {query.device}), "
                             f"got {t.dtype}, {t.device}")
    if key.shape[:2] != query.shape[:2] or value.shape[:2] != query.shape[:2]:
        raise ValueError(f"{_NAME}: query, key and value must have the same (B, H), got {list(query.shape)}, "
                         f"{list(key.shape)}, {list(value.shape)}")
    if key.size(3) != query.size(3):
        raise ValueError(f"{_NAME}: key must have query's head dimension D; query {list(query.shape)}, key "
                         f"{list(key.shape)}")
    if value.size(2) != key.size(2):
        raise ValueError(f"{_NAME}: value must have key's length; key {list(key.shape)}, value {list(value.shape)}")
    for name, mask, n in (("key_padding_mask", kpm, key.size(2)), ("query_padding_mask", qpm, query.size(2))):
        if mask is None:
            continue
        if mask.dtype != torch.bool or mask.dim() != 2 or mask.size(0) != query.size(0) or mask.size(1) != n:
            raise ValueError(f"{_NAME}: {name} must be a bool tensor of shape (B, {n}) (the local shard), got "
                             f"{mask.dtype} {list(mask.shape)}")
        if mask.device != query.device:
            raise ValueError(f"{_NAME}: {name} must be on query's device {query.device}, got {mask.device}")
    if num_landmarks < 1:
        raise ValueError(f"{_NAME}: num_landmarks must be >= 1, got {num_landmarks}")
    if pinv_iterations < 0:
        raise ValueError(f"{_NAME}: pinv_iterations must be >= 0, got {pinv_iterations}")
    if pinv_init not in ("per_head", "original"):
        raise ValueError(f'{_NAME}: pinv_init must be "per_head" or "original", got "{pinv_init}"')
    if scale is not None and not (scale > 0 and scale != float("inf")):
        raise ValueError(f"{_NAME}: scale must be a finite number > 0, got {scale}")


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
    group: Optional[dist.ProcessGroup] = None,
) -> Tensor:
    """Nyström attention of a sequence sharded over the ranks of ``group`` (default: the world).

    Args:
        query: this rank's shard ``(B, H, L_local, D)`` of the queries.
        key: ``(B, H, S_local, D)``, same dtype and device.
        value: ``(B, H, S_local, Dv)``.
        num_landmarks, pinv_iterations, pinv_init, scale: as :func:`torch_nystrom.nystrom_attention`;
            ``pinv_init="original"`` takes its maximum over the whole batch and all heads, on every rank.
        key_padding_mask: optional bool ``(B, S_local)``, this rank's shard; ``True`` marks padding.
        query_padding_mask: optional bool ``(B, L_local)``.
        group: the process group whose ranks hold consecutive shards in rank order (shards may differ in
            length, and may be empty). Every rank of the group must call with the same B, H, D, Dv, dtype and
            options.

    Returns:
        This rank's shard ``(B, H, L_local, Dv)`` of the output of :func:`torch_nystrom.nystrom_attention` on
        the concatenated sequence; differentiable in ``query``, ``key``, ``value`` (the backward runs its own
        collectives, so every rank must backpropagate too).

    Works with any backend whose collectives support all-gather and all-reduce sum/max on the tensors' device
    (gloo on CPU tensors, NCCL on CUDA tensors). With CUDA tensors the element counts are read on the host once
    per call (one synchronisation), to size the stage tensors.
    """
    _check(query, key, value, key_padding_mask, query_padding_mask, num_landmarks, pinv_iterations, pinv_init,
           scale)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{_NAME}: torch.distributed is not initialized (call torch.distributed."
                           "init_process_group first, or use torch_nystrom.nystrom_attention in one process)")
    if group is None:
        group = dist.group.WORLD
    # the stage ops view the masks as (B, 1, n, 1)
    key_padding_mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    query_padding_mask = None if query_padding_mask is None else query_padding_mask.contiguous()
    geometry, rows, exact = _geometry(query, key, key_padding_mask, query_padding_mask, num_landmarks, group)
    return _SequenceParallelNystrom.apply(query, key, value, key_padding_mask, query_padding_mask, geometry, rows,
                                          exact, num_landmarks, pinv_iterations, pinv_init, scale, group)


class _GatherEdges(torch.autograd.Function):
    """All-gather of every rank's edge rows (world, ...), differentiable: the gradient of a rank's rows is the
    sum, over the ranks, of the gradients of their copies (one all-reduce of the same size)."""

    @staticmethod
    def forward(ctx, edges, group):
        ctx.group = group
        return _all_gather(edges.unsqueeze(0), group)

    @staticmethod
    def backward(ctx, grad):
        total = _all_reduce(grad, "sum", ctx.group)
        return total[dist.get_rank(ctx.group)], None


def depthwise_conv_along_shards(x: Tensor, weight: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """The depthwise convolution along the sequence of NystromAttention's skip (``Conv2d(H, H, (K, 1),
    padding=(K // 2, 0), groups=H, bias=False)``) on a sequence sharded like :func:`nystrom_attention`: each
    rank gets the ``K // 2`` rows beyond each edge of its shard from its neighbours (halo exchange; from
    further ranks when a neighbour's shard is shorter, zeros at the ends of the whole sequence).

    ``x``: this rank's ``(B, H, L_local, Dh)``; ``weight``: ``(H, 1, K, 1)``, K odd. Differentiable in both.
    Communication: one all-gather of ``2 (K // 2)`` rows per rank (and its all-reduce in the backward),
    whatever the shard lengths.
    """
    if weight.dim() != 4 or weight.size(1) != 1 or weight.size(3) != 1 or weight.size(2) % 2 == 0 \
            or weight.size(0) != x.size(1):
        raise ValueError(f"{_NAME}: the skip convolution's weight must be (H={x.size(1)}, 1, K, 1) with K odd, "
                         f"got {list(weight.shape)}")
    if group is None:
        group = dist.group.WORLD
    p = weight.size(2) // 2
    B, H, L, Dh = x.shape
    if p == 0:
        return torch.nn.functional.conv2d(x, weight, groups=H)
    lengths = _all_gather(torch.tensor([L], dtype=torch.long, device=x.device), group).cpu().tolist()
    rank, world = dist.get_rank(group), len(lengths)
    n = min(p, L)
    zeros = x.new_zeros(B, H, p - n, Dh)
    head = torch.cat([x[:, :, :n], zeros], 2)       # first rows, left-aligned
    tail = torch.cat([zeros, x[:, :, L - n:]], 2)   # last rows, right-aligned
    edges = _GatherEdges.apply(torch.cat([head, tail], 2), group)  # (world, B, H, 2p, Dh)
    left = [edges[j, :, :, 2 * p - min(p, lengths[j]):] for j in range(rank)]
    right = [edges[j, :, :, :min(p, lengths[j])] for j in range(rank + 1, world)]
    left = torch.cat([x.new_zeros(B, H, p, Dh)] + left, 2)[:, :, -p:]
    right = torch.cat(right + [x.new_zeros(B, H, p, Dh)], 2)[:, :, :p]
    if L == 0:
        # nothing to convolve, but the edges stay in the graph: every rank's backward runs the all-reduce
        return x + (edges.sum() + weight.sum()) * 0
    return torch.nn.functional.conv2d(torch.cat([left, x, right], 2), weight, groups=H)
