"""Sweep: this op against its peers, on the CPU, over sequence lengths.

Compares, in one process and on the same inputs (benchmarks/workload.py):
torch_nystrom; the same algorithm as plain PyTorch calls (Hugging Face
transformers' formulation); lucidrains' nystrom-attention (pip); exact attention
(scaled_dot_product_attention). Per point: median time of the forward and of
forward+backward after a warm-up, peak memory the call adds beyond its inputs and results (measured in a
fresh process, the same way for all), relative error against exact attention
(on 256 sampled query rows) and against the float64 Nyström reference, and the
ratios of each peer to this op. Writes benchmarks/results/cpu_<dtype>.csv and
time/memory plots (log-log).

    python benchmarks/bench.py                       # B=2 H=8 D=64 m=64, n = 512 .. 65536, float32
    python benchmarks/bench.py --dtype bfloat16 --n 1024 4096 16384
"""
import argparse
import csv
import math
import os
import platform
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import impls  # noqa: E402
import workload  # noqa: E402
from measure import median_time, memory_in_subprocess, rel_error  # noqa: E402

IMPLS = ["ours", "composition", "lucidrains", "sdpa"]
LABEL = {"ours": "torch_nystrom", "composition": "composition", "lucidrains": "lucidrains", "sdpa": "exact_sdpa"}


def exact_rows(q, k, v, rows):
    """Exact attention at a subset of query rows, in float64."""
    s = q[:, :, rows].double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v.double()


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--landmarks", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--sdpa-max-n", type=int, default=16384, help="exact attention is O(n^2): skip it above this")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--replot", metavar="CSV", help="only redraw the table and plots of an earlier run's CSV")
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as f:
            records = [{k: (float(v) if k not in ("impl", "dtype", "n") and v not in ("", "None") else
                            (int(v) if k == "n" else (None if v in ("", "None") else v)))
                        for k, v in row.items()} for row in csv.DictReader(f)]
        args.dtype = records[0]["dtype"]
        machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
        report(records, args, machine)
        plot(records, args, machine)
        return
    import torch_nystrom  # noqa: F401

    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        def tqdm(x, **kw):
            return x

    dtype = getattr(torch, args.dtype)
    B, H, D, m = args.batch, args.heads, args.dim, args.landmarks
    os.makedirs(args.out, exist_ok=True)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"B={B} H={H} D={D} m={m} {args.dtype}; {machine}")
    records = []
    points = [(n, name) for n in args.n for name in args.impls]
    for n, name in tqdm(points, desc="bench", unit="pt"):
        if name == "sdpa" and n > args.sdpa_max_n:
            continue
        q, k, v = workload.make_inputs(B, H, n, D, dtype)
        fn = getattr(impls, name)
        extra = {}
        if name == "lucidrains":
            extra["packed"] = impls.lucidrains_pack(q, k, v)
        try:
            with torch.no_grad():
                out = fn(q, k, v, m, **extra)
        except RuntimeError as exc:  # a peer that cannot run this configuration
            print(f"\n{LABEL[name]} fails at n={n} {args.dtype}: {str(exc).splitlines()[0]}")
            continue
        with torch.no_grad():
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: min(n, 256)]
            err_exact = rel_error(out[:, :, rows], exact_rows(q, k, v, rows))
            err_ref = rel_error(out, impls.reference64(q, k, v, m)) if name in ("ours", "composition") else math.nan
            t_fwd = median_time(lambda: fn(q, k, v, m, **extra), repeats=args.repeats)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(out)

        def fwd_bwd():
            o = fn(*leaves, m)
            o.backward(grad)
            for t in leaves:
                t.grad = None

        t_fb = median_time(fwd_bwd, repeats=args.repeats)
        del leaves, out
        mem_f = mem_fb = None
        if not args.no_memory:
            mem_f = memory_in_subprocess(name, B, H, n, D, m, args.dtype)
            mem_fb = memory_in_subprocess(name, B, H, n, D, m, args.dtype, backward=True)
        records.append(dict(impl=LABEL[name], n=n, dtype=args.dtype, fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3,
                            fwd_mib=None if mem_f is None else mem_f / 2**20,
                            fwd_bwd_mib=None if mem_fb is None else mem_fb / 2**20,
                            err_vs_exact=err_exact, err_vs_ref64=err_ref))

    path = os.path.join(args.out, f"cpu_{args.dtype}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0].keys()))
        w.writeheader()
        w.writerows(records)
    report(records, args, machine)
    plot(records, args, machine)
    print(f"\nwrote {path}")


def fmt(x, spec):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if spec.endswith(".2f") and x >= 1000:
        return ">999"
    return format(x, spec)


def report(records, args, machine):
    by = {(r["impl"], r["n"]): r for r in records}
    print(f"\n{'n':>6} {'impl':<14}{'fwd ms':>9}{'f+b ms':>9}{'fwd MiB':>9}{'f+b MiB':>9}{'err exact':>10}{'err ref64':>10}"
          f"{'fwd x':>7}{'f+b x':>7}{'mem x':>7}")
    for r in records:
        o = by.get(("torch_nystrom", r["n"]))
        rt = rb = rm = None
        if o and r["impl"] != "torch_nystrom":
            rt, rb = r["fwd_ms"] / o["fwd_ms"], r["fwd_bwd_ms"] / o["fwd_bwd_ms"]
            if r["fwd_mib"] is not None and o["fwd_mib"] is not None:
                # below 1 MiB the measure is noise: compare against at least 1 MiB
                rm = max(r["fwd_mib"], 1.0) / max(o["fwd_mib"], 1.0)
        print(f"{r['n']:>6} {r['impl']:<14}{r['fwd_ms']:>9.1f}{r['fwd_bwd_ms']:>9.1f}{fmt(r['fwd_mib'], '9.1f'):>9}"
              f"{fmt(r['fwd_bwd_mib'], '9.1f'):>9}{r['err_vs_exact']:>10.2e}{fmt(r['err_vs_ref64'], '10.2e'):>10}"
              f"{fmt(rt, '7.2f'):>7}{fmt(rb, '7.2f'):>7}{fmt(rm, '7.2f'):>7}")
    print("(x = peer / torch_nystrom: above 1 means torch_nystrom is faster or smaller; memory ratios use at least 1 MiB)")


def plot(records, args, machine):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    impls_seen = sorted({r["impl"] for r in records}, key=lambda s: list(LABEL.values()).index(s))
    for ax, key, title in zip(axes, ["fwd_ms", "fwd_bwd_ms", "fwd_mib", "fwd_bwd_mib"],
                              ["forward time (ms)", "forward+backward time (ms)",
                               "forward memory beyond inputs, output (MiB)",
                               "fwd+bwd memory beyond inputs, output, grads (MiB)"]):
        for name in impls_seen:
            # memory below 0.1 MiB is page-granularity noise: drawn at 0.1
            pts = [(r["n"], max(r[key], 0.1) if key.endswith("mib") else r[key])
                   for r in records if r["impl"] == name and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length n")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"B={args.batch} H={args.heads} D={args.dim} m={args.landmarks} {args.dtype}; {machine}", fontsize=9)
    fig.tight_layout()
    path = os.path.join(args.out, f"cpu_{args.dtype}.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
