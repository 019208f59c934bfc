"""How far the CPU targets are from what the hardware allows, and a low-noise head-to-head.

    python benchmarks/headroom.py [--n 4096 16384] [--rounds 9]

1. Floors: the four products every Nyström forward does (q·k̃ᵀ, F·W, q̃·kᵀ, Bm·V: 4·n·m·D
   multiply-adds per head) at the rate of a large square sgemm (the machine's peak): no implementation
   of the algorithm runs its forward faster. Next to it, the same four products as MKL's batched calls
   with no softmax at all: what the composition's products alone cost.
2. Interleaved comparison: this op and the plain-PyTorch composition (benchmarks/impls.py) run
   alternately, `--rounds` times each, forward and forward+backward; the minimum of each is the least
   disturbed run (on a shared machine the median moves with the neighbours' load). Same inputs as
   bench.py (workload.py), B=2, H=8, D=64, m=64, float32.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_nystrom  # noqa: E402,F401  (registers the ops)
import impls  # noqa: E402
from bench import cpu_name  # noqa: E402
from workload import make_inputs  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gemm_floor(B, H, n, D, m, repeats=7):
    q, k, v = (torch.randn(B * H, n, D) for _ in range(3))
    kl, ql, w = (torch.randn(B * H, m, D) for _ in range(3))

    def gemms():
        torch.bmm(torch.bmm(q, kl.transpose(1, 2)), w)
        torch.bmm(torch.bmm(ql, k.transpose(1, 2)), v)

    gemms()
    return min(timed(gemms) for _ in range(repeats))


def square_sgemm_gflops(size=2048, repeats=5):
    a = torch.randn(size, size)
    a @ a
    return 2 * size**3 / min(timed(lambda: a @ a) for _ in range(repeats)) / 1e9


def interleaved(B, H, n, D, m, rounds):
    q, k, v = (t.requires_grad_() for t in make_inputs(B, H, n, D))
    impl = {"ours": impls.ours, "composition": impls.composition}

    def fwd(f):
        with torch.no_grad():
            f(q, k, v, m)

    def fwd_bwd(f):
        out = f(q, k, v, m)
        out.backward(torch.ones_like(out))

    best = {}
    for mode, run in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
        for f in impl.values():
            run(f)  # warm-up
        for _ in range(rounds):
            for name, f in impl.items():
                t = timed(lambda: run(f))
                best[(mode, name)] = min(best.get((mode, name), t), t)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()
    B, H, D, m = 2, 8, 64, 64
    print(f"B={B} H={H} D={D} m={m} float32; {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    peak = square_sgemm_gflops()
    print(f"square 2048^3 sgemm: {peak:.0f} GFLOP/s")
    for n in args.n:
        batched = gemm_floor(B, H, n, D, m)
        flops = 2 * 4 * B * H * n * m * D
        best = interleaved(B, H, n, D, m, args.rounds)
        print(f"n={n}: forward floor at peak {flops / peak / 1e6:.1f} ms; the four products as MKL batched calls"
              f" {batched * 1e3:.1f} ms ({flops / batched / 1e9:.0f} GFLOP/s)")
        for mode in ("forward", "fwd+bwd"):
            o, c = best[(mode, "ours")], best[(mode, "composition")]
            print(f"  {mode:8s} min of {args.rounds}: torch_nystrom {o * 1e3:7.1f} ms, composition {c * 1e3:7.1f} ms,"
                  f" composition / torch_nystrom {c / o:.2f}x")


if __name__ == "__main__":
    main()
