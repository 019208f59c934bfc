"""Sequence-parallel Nyström attention: bytes communicated and time per call, by sequence length and world size.

    python benchmarks/distributed.py                       # CPU, gloo, world sizes 1 2 3
    python benchmarks/distributed.py --world 2 4 --n 65536 262144     # CUDA tensors and NCCL on a multi-GPU host

Each world size runs in its own set of processes (torch.multiprocessing, 127.0.0.1). Every rank holds an even
shard of a (B, H, n, D) self-attention call, with float32 inputs. Reported per call, for one rank:

- bytes: what the rank puts into collectives (the tensors passed to all_gather / all_reduce, counted by
  torch_nystrom.distributed.communication_log()), forward and backward; an all-reduce of b bytes moves about
  2 b (W-1)/W bytes per rank over a ring;
- time: median wall time of the forward and of forward + backward (every rank synchronised before each repeat);
- for world size 1, the one-process op (torch_nystrom.nystrom_attention) on the same inputs, for reference.

The communication depends on B, H, D, Dv and m only: it is flat in n. Threads per rank: the cores divided by
the world size (at least one), so on a small machine the larger worlds are oversubscribed and their times
measure overheads, not speed-ups (--threads sets them).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _median_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    import torch_nystrom
    import torch_nystrom.distributed as tnd

    cuda = args.device == "cuda"
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    try:
        for n in args.n:
            lo, hi = tnd.shard_bounds(n, world, rank)
            g = torch.Generator().manual_seed(n)
            shape = (args.batch, args.heads, n, args.dim)
            q, k, v = (torch.randn(shape, generator=g)[:, :, lo:hi].to(dev).requires_grad_() for _ in range(3))
            grad = torch.randn(args.batch, args.heads, hi - lo, args.dim, generator=g).to(dev)

            def fwd():
                with torch.no_grad():
                    tnd.nystrom_attention(q, k, v, args.landmarks)

            def fwd_bwd():
                tnd.nystrom_attention(q, k, v, args.landmarks).backward(grad)

            fwd_bwd()  # warm-up
            with tnd.communication_log() as log_f:
                fwd()
            with tnd.communication_log() as log_fb:
                fwd_bwd()
            sent_f = sum(b for _, b in log_f)
            sent_b = sum(b for _, b in log_fb) - sent_f
            t_f = _median_time(fwd, args.repeats, sync)
            t_fb = _median_time(fwd_bwd, args.repeats, sync)
            row = dict(world=world, n=n, local=hi - lo, fwd_bytes=sent_f, bwd_bytes=sent_b, fwd_ms=1e3 * t_f,
                       fb_ms=1e3 * t_fb, collectives=len(log_fb))
            if world == 1:
                def one_fwd():
                    with torch.no_grad():
                        torch_nystrom.nystrom_attention(q, k, v, args.landmarks)

                def one_fb():
                    torch_nystrom.nystrom_attention(q, k, v, args.landmarks).backward(grad)

                one_fb()
                row["op_fwd_ms"] = 1e3 * _median_time(one_fwd, args.repeats, sync)
                row["op_fb_ms"] = 1e3 * _median_time(one_fb, args.repeats, sync)
            if rank == 0:
                queue.put(row)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--landmarks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0,
                   help="threads per rank (default: the cores divided by the world size, at least 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: CPU tensors and gloo; cuda: one GPU per rank and NCCL")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args()
    if args.device == "cuda" and max(args.world) > torch.cuda.device_count():
        p.error(f"--device cuda needs a GPU per rank: {max(args.world)} ranks, "
                f"{torch.cuda.device_count()} GPUs")
    from torch_nystrom.info import cpu_name
    where = (cpu_name() if args.device == "cpu" else torch.cuda.get_device_name(0))
    lines = [f"sequence-parallel Nystrom attention, B={args.batch} H={args.heads} D=Dv={args.dim} "
             f"m={args.landmarks} float32, {'gloo on CPU' if args.device == 'cpu' else 'NCCL on CUDA'}; {where}, "
             f"{os.cpu_count()} cores, {args.threads or 'cores / W'} thread(s) per rank; torch {torch.__version__}",
             f"load average at the start {os.getloadavg()[0]:.1f} (other work on the machine inflates the times; "
             "the bytes are exact)",
             "bytes: put into collectives by one rank per call; times: median of "
             f"{args.repeats}, ms; op: the one-process op on the whole sequence",
             f"{'W':>2} {'n':>7} {'n/rank':>7} {'fwd bytes':>10} {'bwd bytes':>10} {'colls':>5} {'fwd ms':>8} "
             f"{'f+b ms':>8} {'op fwd':>8} {'op f+b':>8}"]
    print("\n".join(lines), flush=True)
    ctx = mp.get_context("spawn")
    for world in args.world:
        queue = ctx.SimpleQueue()
        procs = mp.start_processes(_worker, args=(world, _free_port(), args, queue), nprocs=world, join=False,
                                   start_method="spawn")
        while not procs.join():
            pass
        while not queue.empty():
            r = queue.get()
            line = (f"{r['world']:>2} {r['n']:>7} {r['local']:>7} {r['fwd_bytes']:>10} {r['bwd_bytes']:>10} "
                    f"{r['collectives']:>5} {r['fwd_ms']:>8.1f} {r['fb_ms']:>8.1f} "
                    f"{r.get('op_fwd_ms', float('nan')):>8.1f} {r.get('op_fb_ms', float('nan')):>8.1f}")
            print(line, flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
