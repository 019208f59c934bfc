"""How far the CPU targets are from what the hardware allows, and a low-noise head-to-head.

    python benchmarks/headroom.py [--n 4096 16384] [--dtype float32 bfloat16 float16] [--rounds 9]
                                  [--out benchmarks/results/cpu_headroom.txt]

Same inputs as bench.py (workload.py), B=2, H=8, D=64, m=64, for each dtype:

1. Floors: the products no implementation of the algorithm can skip, at the rate of a large square
   GEMM (the machine's peak: float32 sgemm, or for bfloat16 / float16 inputs the faster of sgemm and
   the GEMM in that dtype). Every product is n·m·D multiply-adds per head (m = D = 64 here).
   - Forward, 4 products: q·k̃ᵀ and F·W (query side), q̃·kᵀ and Bm·V (key side).
   - Forward+backward, 14 products: the forward's 4; the gradient of each of them with respect to
     each of its two operands, 8 (query side dF = dO·Wᵀ, dW = Fᵀ·dO, dq = dS·k̃, dk̃ = dSᵀ·q; key
     side likewise dBm = dbv·vᵀ, dv = Bmᵀ·dbv, dk = dXᵀ·q̃, dq̃ = dX·k); and F and Bm once more, 2:
     the backward recomputes them from the saved log-sum-exps instead of keeping two n x m matrices
     per head from the forward (as large as q and k together), which is what keeps the op's memory
     linear and small. Everything else (landmarks, the m x m softmax, Newton–Schulz and its
     derivative: O(n·D + m³) per head) is left out of the floor.
   Next to the forward floor, the four products as batched calls with no softmax at all.
   For bfloat16 / float16 inputs a second floor, the one this op's accuracy allows: the products it
   keeps in float32 on purpose at the sgemm rate, the others at the peak. Forward: 1 (the key side's
   Bm·V, whose P stays unrounded: a bv from rounded P made dk up to 3.4x less accurate, docs/DESIGN.md
   §5); forward+backward: 3 (with dW = Fᵀ·dO and dv = Bmᵀ·dbv, rounded they cost dq, dk 1.8x and dv
   2.3x in accuracy). It is printed where the dtype's GEMM is the faster (on CPUs with bfloat16 or
   float16 matrix instructions).
2. Interleaved comparison: this op and the plain-PyTorch composition (benchmarks/impls.py) in the
   same dtype, run alternately, `--rounds` times each, forward and forward+backward; the minimum of
   each is the least disturbed run (on a shared machine the median moves with the neighbours' load).
3. First call: in a fresh process per implementation (after import and the inputs are made), the
   first forward call at the first n against the least of the five calls after it, with the minor
   page faults of each of the six calls (getrusage): fresh large buffers are faulted in page by page
   until glibc's mmap threshold adapts (docs/DESIGN.md §6, "The first call of a process"). Then the
   same with the heap made to hold, before the first call, memory already written (1.5x the output):
   what is left of the first call's excess when no fresh page has to be faulted in.
The header names the CPU, its relevant instruction-set extensions and the level the op's CPU
kernels run at (csrc/cpu/isa.h, NYSTROM_CPU_SIMD).
"""
import argparse
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import torch_nystrom  # noqa: E402,F401  (registers the ops)
import impls  # noqa: E402
from bench import cpu_name  # noqa: E402
from workload import make_inputs  # noqa: E402

FORWARD_PRODUCTS, FWD_BWD_PRODUCTS = 4, 14
# of those, kept in float32 for half-precision inputs (see 1. above)
FLOAT32_KEPT = {"forward": 1, "fwd+bwd": 3}
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16")


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in FLAGS if f in have) or "none of " + " ".join(FLAGS)
    except OSError:
        pass
    return "unknown"


def kernel_level():
    """The level the op's CPU kernels run at in a process with this environment (isa.h)."""
    code = "import torch, torch_nystrom; q = torch.randn(1, 1, 64, 16); torch_nystrom.nystrom_attention(q, q, q, 8)"
    env = dict(os.environ, NYSTROM_CPU_SIMD_VERBOSE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    lines = [x for x in res.stderr.splitlines() if "CPU kernels:" in x]
    return lines[-1].split("CPU kernels:", 1)[1].strip() if lines else "unknown (no report from the library)"


def gemm_rate(dtype, size=2048, repeats=5):
    """GFLOP/s of a square GEMM in dtype."""
    a = torch.randn(size, size).to(dtype)
    a @ a
    return 2 * size**3 / min(timed(lambda: a @ a) for _ in range(repeats)) / 1e9


def batched_products(B, H, n, D, m, dtype, repeats=7):
    q, k, v = (torch.randn(B * H, n, D).to(dtype) for _ in range(3))
    kl, ql, w = (torch.randn(B * H, m, D).to(dtype) for _ in range(3))

    def gemms():
        torch.bmm(torch.bmm(q, kl.transpose(1, 2)), w)
        torch.bmm(torch.bmm(ql, k.transpose(1, 2)), v)

    gemms()
    return min(timed(gemms) for _ in range(repeats))


def interleaved(B, H, n, D, m, dtype, rounds):
    q, k, v = (t.requires_grad_() for t in make_inputs(B, H, n, D, dtype))
    grad = torch.ones(B, H, n, D, dtype=dtype)
    impl = {"ours": impls.ours, "composition": impls.composition}

    def fwd(f):
        with torch.no_grad():
            f(q, k, v, m)

    def fwd_bwd(f):
        f(q, k, v, m).backward(grad)
        for t in (q, k, v):
            t.grad = None

    best = {}
    for mode, run in (("forward", fwd), ("fwd+bwd", fwd_bwd)):
        for f in impl.values():
            run(f)  # warm-up
        for _ in range(rounds):
            for name, f in impl.items():
                t = timed(lambda: run(f))
                best[(mode, name)] = min(best.get((mode, name), t), t)
    return best


_FIRST_CALL = r"""
import resource, sys, time, torch
sys.path.insert(0, sys.argv[1])
import torch_nystrom, impls
from workload import make_inputs
name, n, dtype, resident = sys.argv[2], int(sys.argv[3]), getattr(torch, sys.argv[4]), int(sys.argv[5])
q, k, v = make_inputs(2, 8, n, 64, dtype)
# resident > 0: that many MiB of the heap written and freed before the first call. The first
# buffer is mapped and unmapped (glibc then raises its mmap threshold to its size), the next
# come from the heap, which keeps them: the first call then finds memory already faulted in.
for _ in range(3 if resident else 0):
    torch.empty(resident << 18).fill_(1.0)
times, faults = [], []
with torch.no_grad():
    for _ in range(6):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        getattr(impls, name)(q, k, v, 64)
        times.append(time.perf_counter() - t)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(times[0], min(times[1:]), *faults)
"""


def first_call(name, n, dtype, resident_mib=0):
    """(first call s, least of the next five s, minor page faults of each of the six calls)."""
    res = subprocess.run([sys.executable, "-c", _FIRST_CALL, HERE, name, str(n), dtype, str(resident_mib)],
                         capture_output=True, text=True, check=True)
    words = res.stdout.split()
    return float(words[0]), float(words[1]), [int(w) for w in words[2:]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", help="also write the report to this file")
    args = p.parse_args()
    B, H, D, m = 2, 8, 64, 64
    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    say(f"B={B} H={H} D={D} m={m}; {cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; torch_nystrom CPU kernels: {kernel_level()}")
    say(f"times: minimum of {args.rounds} interleaved runs (forward / forward+backward), "
        f"floors: {FORWARD_PRODUCTS} / {FWD_BWD_PRODUCTS} products of n*m*D multiply-adds per head at the peak")
    sgemm = gemm_rate(torch.float32)
    say(f"square 2048^3 GEMM: float32 {sgemm:.0f} GFLOP/s")
    for dtype in args.dtype:
        dt = getattr(torch, dtype)
        peak = sgemm
        if dt != torch.float32:
            rate = gemm_rate(dt)
            peak = max(sgemm, rate)
            say(f"{dtype}: square GEMM in {dtype} {rate:.0f} GFLOP/s; the floor uses {peak:.0f}")
        for n in args.n:
            per_product = 2 * B * H * n * m * D / peak / 1e9
            batched = batched_products(B, H, n, D, m, dt)
            best = interleaved(B, H, n, D, m, dt, args.rounds)
            floor = {"forward": FORWARD_PRODUCTS * per_product, "fwd+bwd": FWD_BWD_PRODUCTS * per_product}
            say(f"{dtype} n={n}: floors at peak: forward {floor['forward'] * 1e3:.1f} ms, forward+backward "
                f"{floor['fwd+bwd'] * 1e3:.1f} ms; the four forward products as batched calls {batched * 1e3:.1f} ms")
            if peak > sgemm:
                kept = {mode: (FLOAT32_KEPT[mode] * peak / sgemm - FLOAT32_KEPT[mode]) * per_product
                        for mode in floor}
                say(f"  with the products this op keeps in float32 at the sgemm rate: forward "
                    f"{(floor['forward'] + kept['forward']) * 1e3:.1f} ms, forward+backward "
                    f"{(floor['fwd+bwd'] + kept['fwd+bwd']) * 1e3:.1f} ms")
            else:
                kept = {mode: 0.0 for mode in floor}
            for mode in ("forward", "fwd+bwd"):
                o, c = best[(mode, "ours")], best[(mode, "composition")]
                extra = f", {o / (floor[mode] + kept[mode]):.2f}x the float32-kept one" if kept[mode] else ""
                say(f"  {mode:8s} torch_nystrom {o * 1e3:7.1f} ms ({o / floor[mode]:.2f}x its floor{extra}), "
                    f"composition {c * 1e3:7.1f} ms, composition / torch_nystrom {c / o:.2f}x")
        n0 = args.n[0]
        # the output and about half as much again (the op's workspaces), rounded up
        resident = -(-3 * B * H * n0 * D * dt.itemsize // 2 // (1 << 20))
        for mib in (0, resident):
            for name in ("ours", "composition"):
                first, steady, faults = first_call(name, n0, dtype, mib)
                where = f", {mib} MiB of the heap resident before it" if mib else ""
                say(f"  first call of a fresh process{where}, {dtype} n={n0} forward, {impls.__name__}.{name}: "
                    f"{first * 1e3:.1f} ms, steady {steady * 1e3:.1f} ms, first / steady {first / steady:.2f}x; "
                    f"minor page faults per call {' '.join(map(str, faults))}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
