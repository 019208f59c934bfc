"""The main job: Nyström attention on a built-in default workload.

Computes this library's Nyström attention, the same algorithm as plain PyTorch
calls, and exact attention on the same inputs; prints accuracy (against exact
attention and against the float64 Nyström reference), speed and memory, with
ratios. Defaults: B=2, H=8, n=4096, D=64, m=64, float32, forward and
forward+backward.

    python benchmarks/demo.py [--n 4096] [--batch 2] [--heads 8] [--dim 64] [--landmarks 64]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import median_time, memory_in_subprocess, rel_error  # noqa: E402
import impls  # noqa: E402
import workload  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--landmarks", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import torch_nystrom  # noqa: F401  (registers the ops)

    torch.manual_seed(args.seed)
    B, H, n, D, m = args.batch, args.heads, args.n, args.dim, args.landmarks
    q, k, v = workload.make_inputs(B, H, n, D, seed=args.seed)
    print(f"torch-nystrom demo: B={B} H={H} n={n} D={D} m={m} float32, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    exact = impls.sdpa(q, k, v)
    ref64 = impls.reference64(q, k, v, m)
    rows = []
    for name, impl in [("torch_nystrom", "ours"), ("composition", "composition"), ("exact_sdpa", "sdpa")]:
        fn = getattr(impls, impl)
        out = fn(q, k, v, m)
        err_exact = rel_error(out, exact)
        err_ref = rel_error(out, ref64) if name != "exact_sdpa" else float("nan")
        with torch.no_grad():
            t_fwd = median_time(lambda: fn(q, k, v, m), repeats=args.repeats)
        mem_fwd = memory_in_subprocess(impl, B, H, n, D, m)
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        grad = torch.randn_like(out)

        def fwd_bwd():
            o = fn(qg, kg, vg, m)
            o.backward(grad)
            qg.grad = kg.grad = vg.grad = None

        t_fb = median_time(fwd_bwd, repeats=args.repeats)
        mem_fb = memory_in_subprocess(impl, B, H, n, D, m, backward=True)
        rows.append((name, err_exact, err_ref, t_fwd, t_fb, mem_fwd, mem_fb))

    mib = lambda b: float("nan") if b is None else b / 2**20  # noqa: E731
    print(f"\n{'implementation':<15}{'err vs exact':>13}{'err vs ref64':>13}{'fwd ms':>10}{'fwd+bwd ms':>12}"
          f"{'fwd MiB':>10}{'fwd+bwd MiB':>13}")
    for name, e1, e2, t1, t2, m1, m2 in rows:
        print(f"{name:<15}{e1:>13.3e}{e2:>13.3e}{t1 * 1e3:>10.1f}{t2 * 1e3:>12.1f}{mib(m1):>10.1f}{mib(m2):>13.1f}")
    ours, comp, sd = rows
    print("\nratios (peer / torch_nystrom; > 1 means torch_nystrom is better):")
    for peer in (comp, sd):
        print(f"  vs {peer[0]:<12} time fwd {peer[3] / ours[3]:.2f}x, fwd+bwd {peer[4] / ours[4]:.2f}x; "
              f"memory fwd {(peer[5] or 0) / max(ours[5] or 1, 1):.2f}x, fwd+bwd {(peer[6] or 0) / max(ours[6] or 1, 1):.2f}x")
    ok = ours[2] < 1e-4
    print(f"\naccuracy check against the float64 Nyström reference: rel. error {ours[2]:.2e} "
          f"({'ok' if ok else 'FAILED'}, bound 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
