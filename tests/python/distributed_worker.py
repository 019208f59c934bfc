"""One rank of the sequence-parallel tests (test_distributed.py runs it in W processes).

    python distributed_worker.py RANK WORLD PORT OUT.json [cpu|cuda]

Joins a process group on 127.0.0.1:PORT (gloo with CPU tensors; NCCL with CUDA tensors, GPU RANK), runs every case of ``cases(WORLD)`` (each rank builds the same
full inputs from the case's seed, takes its shard, runs torch_nystrom.distributed.nystrom_attention forward and
backward, and compares its shard of the output and of the gradients with the one-process op on the whole
sequence, torch.ops.nystrom.nystrom_attention), and writes the errors per case to OUT.json. The process group is
destroyed at the end, whatever happened.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

DEVICE = torch.device("cpu")  # where the shards live (main() sets it)


@dataclass
class SPCase:
    name: str
    B: int = 2
    H: int = 2
    L: int = 37
    S: Optional[int] = None  # None: self-attention lengths (S = L)
    D: int = 5
    Dv: int = 6
    m: int = 7
    dtype: torch.dtype = torch.float64
    pinv_init: str = "per_head"
    iterations: int = 6
    q_mask: Optional[str] = None  # None, "random", "trailing", "exact_element", "empty_element", "shard_padded"
    k_mask: Optional[str] = None
    q_split: Optional[List[int]] = None  # shard sizes per rank (sum L); None: even
    k_split: Optional[List[int]] = None
    scale: Optional[float] = None
    seed: int = 0
    expect_error: Optional[str] = None  # a substring of the ValueError every rank must raise


def _even(n: int, world: int) -> List[int]:
    return [(r + 1) * n // world - r * n // world for r in range(world)]


def cases(world: int) -> List[SPCase]:
    """The case table; split sizes are given for world sizes 2 and 3."""
    def split(two, three):
        return two if world == 2 else three

    c = [
        SPCase("even", q_split=None),
        SPCase("uneven_random_masks", L=41, q_mask="random", k_mask="random", q_split=split([9, 32], [4, 30, 7]),
               seed=1),
        SPCase("empty_shard", L=33, q_mask="random", k_mask="random", q_split=split([0, 33], [20, 0, 13]), seed=2),
        SPCase("shard_all_padding", L=30, q_mask="shard_padded", k_mask="shard_padded",
               q_split=split([10, 20], [10, 10, 10]), seed=3),
        SPCase("exact_and_nystrom_elements", B=3, L=29, m=9, q_mask="exact_element", k_mask="exact_element",
               q_split=split([13, 16], [5, 11, 13]), seed=4),
        SPCase("element_without_queries", B=2, L=26, q_mask="empty_element", k_mask="random",
               q_split=split([7, 19], [7, 6, 13]), seed=5),
        SPCase("cross_attention", L=23, S=45, D=4, Dv=3, q_mask="random", k_mask="trailing",
               q_split=split([12, 11], [3, 12, 8]), k_split=split([30, 15], [15, 0, 30]), seed=6),
        SPCase("original_init", B=3, L=38, pinv_init="original", q_mask="random", k_mask="random",
               q_split=split([17, 21], [8, 17, 13]), seed=7),
        SPCase("original_init_mixed", B=3, L=29, m=9, pinv_init="original", q_mask="exact_element",
               k_mask="exact_element", q_split=split([20, 9], [2, 20, 7]), seed=8),
        SPCase("all_exact", L=11, m=16, q_mask="random", k_mask="random", q_split=split([4, 7], [4, 0, 7]), seed=9),
        SPCase("many_landmarks_uneven_segments", B=1, H=3, L=100, m=13, D=8, Dv=2, k_mask="random",
               q_split=split([61, 39], [33, 34, 33]), seed=10),
        SPCase("no_iterations_scale", L=31, iterations=0, scale=0.37, q_mask="random", k_mask="random",
               q_split=split([30, 1], [1, 1, 29]), seed=11),
        # shards longer than the stages' row chunks (csrc/stages.h: kChunkRows = 2048)
        SPCase("long_shards_in_chunks", B=1, H=2, L=4500, S=4300, D=4, Dv=3, m=7, q_mask="random", k_mask="random",
               q_split=split([2100, 2400], [100, 4300, 100]), k_split=split([4200, 100], [2049, 0, 2251]), seed=16),
        SPCase("float32", L=41, dtype=torch.float32, q_mask="random", k_mask="random",
               q_split=split([9, 32], [4, 30, 7]), seed=12),
        SPCase("float32_original", B=3, L=44, dtype=torch.float32, pinv_init="original", q_mask="random",
               k_mask="random", q_split=split([22, 22], [0, 30, 14]), seed=13),
        SPCase("float32_cross_exact", B=3, L=29, S=17, m=9, dtype=torch.float32, q_mask="exact_element",
               k_mask="exact_element", q_split=split([13, 16], [5, 11, 13]), k_split=split([17, 0], [6, 6, 5]),
               seed=14),
        SPCase("bfloat16", L=41, dtype=torch.bfloat16, q_mask="random", k_mask="random",
               q_split=split([9, 32], [4, 30, 7]), seed=15),
        SPCase("error_no_real_key", L=20, k_mask="element_no_keys", expect_error="masks every key of batch element"),
    ]
    return c


def _mask(kind: Optional[str], B: int, n: int, g: torch.Generator, m: int, split: List[int]) -> Optional[torch.Tensor]:
    if kind is None:
        return None
    mask = torch.rand(B, n, generator=g) < 0.3
    if kind == "random":
        return mask
    if kind == "trailing":
        mask = torch.zeros(B, n, dtype=torch.bool)
        for b in range(B):
            mask[b, n - 3 - 2 * b:] = True
        return mask
    if kind == "shard_padded":  # every token of the second shard is padding
        start = split[0]
        mask[:, start:start + split[1]] = True
        return mask
    if kind == "exact_element":  # element 0 keeps only m - 2 real tokens (exact path), the others are Nyström
        keep = torch.randperm(n, generator=g)[: m - 2]
        mask[0] = True
        mask[0, keep] = False
        return mask
    if kind == "empty_element":  # element 1 has no real query at all
        mask[1] = True
        return mask
    if kind == "element_no_keys":
        mask = torch.zeros(B, n, dtype=torch.bool)
        mask[B - 1] = True
        return mask
    raise ValueError(kind)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    if not torch.isfinite(a).all():
        return float("inf")
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / max(scale, 1e-300)


def run_case(c: SPCase, rank: int, world: int) -> dict:
    import torch_nystrom.distributed as tnd

    S = c.L if c.S is None else c.S
    g = torch.Generator().manual_seed(1000 + c.seed)
    q = torch.randn(c.B, c.H, c.L, c.D, generator=g, dtype=torch.float64)
    k = torch.randn(c.B, c.H, S, c.D, generator=g, dtype=torch.float64)
    v = torch.randn(c.B, c.H, S, c.Dv, generator=g, dtype=torch.float64)
    grad = torch.randn(c.B, c.H, c.L, c.Dv, generator=g, dtype=torch.float64)
    q_split = c.q_split or _even(c.L, world)
    k_split = c.k_split or (q_split if c.S is None else _even(S, world))
    qpm = _mask(c.q_mask, c.B, c.L, g, c.m, q_split)
    kpm = qpm if (c.k_mask == c.q_mask and c.S is None and c.q_mask is not None) else \
        _mask(c.k_mask, c.B, S, g, c.m, k_split)
    # values at padded positions must reach nothing
    if qpm is not None:
        q = q.masked_fill(qpm[:, None, :, None], float("nan"))
    if kpm is not None:
        k = k.masked_fill(kpm[:, None, :, None], float("nan"))
        v = v.masked_fill(kpm[:, None, :, None], float("inf"))
    kw = dict(pinv_iterations=c.iterations, pinv_init=c.pinv_init, key_padding_mask=kpm, query_padding_mask=qpm,
              scale=c.scale)

    def full(dtype):
        qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v))
        out = torch.ops.nystrom.nystrom_attention(qq, kk, vv, c.m, c.iterations, c.pinv_init, kpm, qpm, c.scale)
        out.backward(grad.to(dtype))
        return out.detach(), qq.grad, kk.grad, vv.grad

    q0, q1 = sum(q_split[:rank]), sum(q_split[:rank + 1])
    k0, k1 = sum(k_split[:rank]), sum(k_split[:rank + 1])
    loc = [t[:, :, q0:q1].to(DEVICE, c.dtype).requires_grad_() for t in (q,)] + \
          [t[:, :, k0:k1].to(DEVICE, c.dtype).requires_grad_() for t in (k, v)]
    lkw = dict(kw, key_padding_mask=None if kpm is None else kpm[:, k0:k1].to(DEVICE),
               query_padding_mask=None if qpm is None else qpm[:, q0:q1].to(DEVICE))
    if c.expect_error:
        try:
            tnd.nystrom_attention(*loc, c.m, **lkw)
        except ValueError as e:
            ok = c.expect_error in str(e)
            return {"ok": ok, "detail": str(e)}
        return {"ok": False, "detail": "no error"}
    with tnd.communication_log() as log:
        out = tnd.nystrom_attention(*loc, c.m, **lkw)
        out.backward(grad[:, :, q0:q1].to(DEVICE, c.dtype))
    got = [t.cpu() for t in (out.detach(), loc[0].grad, loc[1].grad, loc[2].grad)]
    ref64 = full(torch.float64)
    sl = [slice(q0, q1), slice(q0, q1), slice(k0, k1), slice(k0, k1)]
    names = ["out", "dq", "dk", "dv"]
    res = {"ok": True, "errors": {}, "bytes": sum(b for _, b in log), "dtype_ok": all(t.dtype == c.dtype for t in got)}
    if c.dtype == torch.float64:
        for n, a, r, s in zip(names, got, ref64, sl):
            e = _rel(a, r[:, :, s])
            res["errors"][n] = e
            res["ok"] &= e <= 1e-10
    else:
        ref32 = full(c.dtype)
        for n, a, r32, r64, s in zip(names, got, ref32, ref64, sl):
            base = _rel(r32, r64)  # the one-process op's own float32 error, over the whole sequence
            e = _rel(a, r64[:, :, s])
            # float32: the docs/DESIGN.md §11 bound; half precision: inputs and outputs rounded to the dtype,
            # arithmetic in float32 (helpers.half_precision_bound)
            tol = max(1e-4, 20 * base) if c.dtype == torch.float32 else 2 * base + 1e-3
            res["errors"][n] = (e, tol)
            res["ok"] &= e <= tol
    # padded positions: exactly zero output rows and gradients
    if qpm is not None:
        lq = qpm[:, q0:q1]
        res["ok"] &= bool((got[0][lq.unsqueeze(1).expand(-1, c.H, -1)] == 0).all())
        res["ok"] &= bool((got[1][lq.unsqueeze(1).expand(-1, c.H, -1)] == 0).all())
    if kpm is not None:
        lk = kpm[:, k0:k1].unsqueeze(1).expand(-1, c.H, -1)
        res["ok"] &= bool((got[2][lk] == 0).all()) and bool((got[3][lk] == 0).all())
    res["ok"] &= res["dtype_ok"]
    if c.pinv_init == "original":
        # the case must tell the two inits apart (the batch-wide maximum differs from the per-head ones)
        other = torch.ops.nystrom.nystrom_attention(q, k, v, c.m, c.iterations, "per_head", kpm, qpm, c.scale)
        res["init_matters"] = _rel(other, ref64[0])
        res["ok"] &= res["init_matters"] > 1e-6
    return res


LAYER_CASES = [
    # name, conv_kernel_size, pinv_init, mask, splits for world 2 / 3 (a shard shorter than the halo, an empty one)
    ("layer_conv5_masked_short_shards", 5, "per_head", True, ([1, 39], [1, 0, 39])),
    ("layer_conv7_original_uneven", 7, "original", False, ([25, 15], [12, 2, 26])),
    ("layer_no_conv", None, "per_head", True, ([20, 20], [13, 14, 13])),
]


def run_layer_case(name, conv, init, masked, splits, rank: int, world: int) -> dict:
    """NystromAttention(group=...) on shards against the one-process layer on the whole sequence: the output
    shard, the input's gradient shard, and the parameters' gradients summed over the ranks (float64)."""
    import torch_nystrom

    B, L, E, H, m = 2, 40, 12, 3, 6
    split = splits[0] if world == 2 else splits[1]
    torch.manual_seed(77)
    kw = dict(pinv_init=init, conv_kernel_size=conv)
    full = torch_nystrom.NystromAttention(E, H, m, **kw).double()
    sharded = torch_nystrom.NystromAttention(E, H, m, group=dist.group.WORLD, **kw).double().to(DEVICE)
    sharded.load_state_dict(full.state_dict())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    grad = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, L, generator=g) < 0.25) if masked else None
    x0, x1 = sum(split[:rank]), sum(split[:rank + 1])
    xf = x.clone().requires_grad_()
    out = full(xf, mask)
    out.backward(grad)
    xl = x[:, x0:x1].to(DEVICE).requires_grad_()
    outl = sharded(xl, None if mask is None else mask[:, x0:x1].to(DEVICE))
    outl.backward(grad[:, x0:x1].to(DEVICE))
    errors = {"out": _rel(outl.detach().cpu(), out.detach()[:, x0:x1]), "dx": _rel(xl.grad.cpu(), xf.grad[:, x0:x1])}
    for (pname, pf), ps in zip(full.named_parameters(), sharded.parameters()):
        total = ps.grad.clone()
        dist.all_reduce(total)
        total = total.cpu()
        # relative to the largest entry, or 1e-3 for gradients that are 0 up to rounding (the key bias: a shift
        # of every key leaves each softmax row unchanged)
        errors["d" + pname] = (total - pf.grad).abs().max().item() / max(pf.grad.abs().max().item(), 1e-3)
    return {"ok": all(e <= 1e-10 for e in errors.values()), "errors": errors}


def run_compile_case(rank: int, world: int) -> dict:
    """torch.compile (aot_eager) of a function calling the sequence-parallel op: same output and gradients as
    eager (the host reads of the element counts are graph breaks; the stage ops and functional collectives are
    traced)."""
    import torch_nystrom.distributed as tnd

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 33, 6, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 33, generator=g) < 0.2
    lo, hi = tnd.shard_bounds(33, world, rank)

    def f(a, b, c, pad):
        return tnd.nystrom_attention(a, b, c, 5, key_padding_mask=pad, query_padding_mask=pad).sin()

    results = []
    for fn in (f, torch.compile(f, backend="aot_eager")):
        a, b, c = (t[:, :, lo:hi].to(DEVICE).requires_grad_() for t in (q, k, v))
        out = fn(a, b, c, mask[:, lo:hi].to(DEVICE))
        out.sum().backward()
        results.append([t.cpu() for t in (out.detach(), a.grad, b.grad, c.grad)])
    errors = {n: _rel(x, y) for n, x, y in zip(["out", "dq", "dk", "dv"], results[1], results[0])}
    return {"ok": all(e <= 1e-12 for e in errors.values()), "errors": errors}


def main() -> int:
    global DEVICE
    rank, world, port, out_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cuda = len(sys.argv) > 5 and sys.argv[5] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        DEVICE = torch.device("cuda", rank)
    torch.set_num_threads(1)
    results = {}
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        for c in cases(world):
            try:
                results[c.name] = run_case(c, rank, world)
            except Exception:  # noqa: BLE001 - reported per case
                results[c.name] = {"ok": False, "detail": traceback.format_exc()}
        for lc in LAYER_CASES:
            try:
                results[lc[0]] = run_layer_case(*lc, rank, world)
            except Exception:  # noqa: BLE001 - reported per case
                results[lc[0]] = {"ok": False, "detail": traceback.format_exc()}
        try:
            results["torch_compile_aot_eager"] = run_compile_case(rank, world)
        except Exception:  # noqa: BLE001 - reported per case
            results["torch_compile_aot_eager"] = {"ok": False, "detail": traceback.format_exc()}
        dist.barrier()
    finally:
        dist.destroy_process_group()
        with open(out_path, "w") as f:
            json.dump(results, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
