"""Sweep: this op against its peers, over sequence lengths, on the CPU (default) or a CUDA device.

Compares, in one process and on the same inputs (benchmarks/workload.py):
torch_nystrom; the same algorithm as plain PyTorch calls (Hugging Face
transformers' formulation); lucidrains' nystrom-attention (pip); exact attention
(scaled_dot_product_attention). Per point: median time of the forward and of
forward+backward after a warm-up, peak memory the call adds beyond its inputs and results (measured in a
fresh process, the same way for all), relative error against exact attention
(on 256 sampled query rows) and against the float64 Nyström reference, and the
ratios of each peer to this op. Writes benchmarks/results/cpu_<dtype>.csv and
cpu_<dtype>.png: time (top row) and memory (bottom row) against n, forward and
forward+backward, log-log, one line per implementation. The plots need
matplotlib (requirements-dev.txt); without it the run says so when it starts
and writes the CSV only (--no-plot: no PNG, no note).

    python benchmarks/bench.py                       # B=2 H=8 D=64 m=64, n = 512 .. 65536, float32
    python benchmarks/bench.py --dtype bfloat16 --n 1024 4096 16384

--device cuda: defaults B=4 H=16 D=128 m=64, n = 1024 .. 131072, float16 and
bfloat16. Times are CUDA events around each call (median after a warm-up), with
several input sets (--input-sets, default 3) rotated between repeats so that
the caches do not flatter; memory is torch.cuda.max_memory_allocated() during
the call (peak reset just before) minus what was allocated before it: the
output (and for forward+backward the gradients) and every temporary, the same
way for all (the CSV also has it beyond the results); errors as on the CPU,
computed on the device in float64. For every forward the fraction of the
memory-bandwidth floor reached: Q, K, V read once and O written once at the
bandwidth of a device-to-device copy measured in the same process (read + write
bytes). lucidrains' package is skipped with a note where it is not installed.
Writes gpu_<card>_<dtype>.csv, .txt (and .png with matplotlib) and
gpu_<card>_short.txt (one line per n and dtype: this op and its ratios).

    python benchmarks/bench.py --device cuda --max-seconds 150

--max-seconds (either device): a time budget; the sweep stops before a point
that would overrun it (estimated from the previous length, linear in n, SDPA
quadratic) and writes what it has.
"""
import argparse
import csv
import importlib.util
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import impls  # noqa: E402
import workload  # noqa: E402
from measure import median_time, memory_in_subprocess, rel_error  # noqa: E402

IMPLS = ["ours", "composition", "lucidrains", "sdpa_composition", "sdpa"]
LABEL = {"ours": "torch_nystrom", "composition": "composition", "lucidrains": "lucidrains",
         "sdpa_composition": "sdpa_comp", "sdpa": "exact_sdpa"}

# --variants (GPU): the CUDA backend's code paths, chosen by environment switches read by the library
# (docs/DESIGN.md §7), each run in a process of its own (the tensor-core switch is read once per process):
# name -> (environment, dtype override or None).
VARIANTS = {
    "fast": ({}, None),                                        # tensor-core forward and backward, fused m x m
    "no_tc": ({"NYSTROM_CUDA_TENSOR_CORES": "0"}, None),       # generic forward kernels, fused m x m
    "one_stage": ({"NYSTROM_CUDA_TC_STAGES": "1"}, None),      # tensor-core backward sides without cp.async prefetch
    "no_tc_bwd": ({"NYSTROM_CUDA_TC_BACKWARD": "0"}, None),    # tensor-core forward, float32 CUDA-core backward
    "aten_mm": ({"NYSTROM_CUDA_FUSED_MM": "0"}, None),         # tensor-core forward, m x m on ATen/cuBLAS
    "generic": ({"NYSTROM_CUDA_TENSOR_CORES": "0", "NYSTROM_CUDA_FUSED_MM": "0"}, None),
    "fp32": ({}, "float32"),                                   # float32: generic kernels, fused m x m
}


def available_impls(names):
    """names without the peers whose package is not installed here (with a note)."""
    names = list(names)
    if "lucidrains" in names and importlib.util.find_spec("nystrom_attention") is None:
        print("note: lucidrains' nystrom-attention is not installed here: skipped")
        names.remove("lucidrains")
    return names


def exact_rows(q, k, v, rows):
    """Exact attention at a subset of query rows, in float64."""
    s = q[:, :, rows].double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1) @ v.double()


def cpu_name():
    """The CPU's model name, as `python -m torch_nystrom.info` reports it (imported on use: --replot of a run
    that recorded its machine needs no library)."""
    from torch_nystrom.info import cpu_name as name
    return name()


# Defaults per device: the CPU sweep as it always was; the GPU sweep at a transformer-layer size.
DEFAULTS = {
    "cpu": dict(n=[512, 1024, 2048, 4096, 8192, 16384, 32768, 65536], batch=2, heads=8, dim=64, landmarks=64,
                dtype=["float32"], sdpa_max_n=16384, repeats=3, impls=["ours", "composition", "lucidrains", "sdpa"]),
    "cuda": dict(n=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072], batch=4, heads=16, dim=128,
                 landmarks=64, dtype=["float16", "bfloat16"], sdpa_max_n=32768, repeats=10, impls=IMPLS),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n", type=int, nargs="+", help="sequence lengths (default: per device, see above)")
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--dim", type=int)
    p.add_argument("--landmarks", type=int)
    p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16", "float16"],
                   help="one or more (default: float32 on the CPU, float16 and bfloat16 on CUDA)")
    p.add_argument("--impls", nargs="+", choices=IMPLS,
                   help="default: all on CUDA; on the CPU all but sdpa_composition")
    p.add_argument("--sdpa-max-n", type=int, help="exact attention is O(n^2): skip it above this "
                                                  "(default 16384 on the CPU, 32768 on CUDA)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--input-sets", type=int, default=3, help="CUDA: input sets rotated between repeats")
    p.add_argument("--max-seconds", type=float, help="time budget of the sweep: stop cleanly when it is spent")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--replot", metavar="CSV", help="only redraw the table and plots of an earlier run's CSV")
    p.add_argument("--no-plot", action="store_true", help="write no PNG (matplotlib is then not needed)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   help="CUDA: time this op in each variant (VARIANTS), each in a child process, with the SDPA and "
                        "SDPA-composition peers, and print one table (no memory, no errors, no files)")
    p.add_argument("--variant-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--profile-point", type=int, metavar="N",
                   help="CUDA: one forward+backward of this op at length N (first --dtype) between "
                        "cudaProfilerStart/Stop, after a warm-up: for ncu --profile-from-start off")
    args = p.parse_args(argv)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def read_records(path):
    with open(path) as f:
        return [{k: (float(v) if k not in ("impl", "dtype", "n") and v not in ("", "None") else
                     (int(v) if k == "n" else (None if v in ("", "None") else v)))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None if matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def recorded_machine(csv_path):
    """The machine line of an earlier run, from the first line of the table next to its CSV
    ("B=... dtype; <machine>"), or None."""
    try:
        with open(os.path.splitext(csv_path)[0] + ".txt") as f:
            first = f.readline().strip()
    except OSError:
        return None
    return first.split("; ", 1)[1] if first.startswith("B=") and "; " in first else None


def main(argv=None):
    args = parse_args(argv)
    if not args.no_plot and pyplot() is None:  # said first, not after an hour of sweep
        print("bench.py: matplotlib is not installed: this run writes no plots "
              "(pip install -r requirements-dev.txt; --no-plot silences this)", file=sys.stderr)
    if args.device == "cuda" or args.replot:
        import bench_gpu  # the CUDA modes (bench_gpu.py)
    if args.replot:
        records = read_records(args.replot)
        args.dtype = records[0]["dtype"]
        if "bw_frac" in records[0]:  # a GPU sweep: its table and plot go next to the CSV
            for name, column in (("batch", "B"), ("heads", "H"), ("dim", "D"), ("landmarks", "m")):
                setattr(args, name, int(records[0][column]))
            stem = os.path.splitext(args.replot)[0]
            machine = recorded_machine(args.replot) or os.path.basename(stem)
            print(bench_gpu.gpu_report(records, args, machine))
            plot(records, args, machine, path=stem + ".png", gpu=True)
            return
        machine = (recorded_machine(args.replot)
                   or f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        report(records, args, machine)
        plot(records, args, machine, path=os.path.splitext(args.replot)[0] + ".png")
        return
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    if args.device == "cuda" and args.profile_point:
        bench_gpu.profile_point(args)
        return
    if args.device == "cuda" and args.variant_child:
        bench_gpu.variant_child(args)
        return
    if args.device == "cuda" and args.variants:
        bench_gpu.run_variants(args, argv)
        return
    if args.device == "cuda":
        bench_gpu.run_cuda(args, deadline)
        return
    for dtype in args.dtype:
        run_cpu(argparse.Namespace(**{**vars(args), "dtype": dtype}), deadline)


def run_cpu(args, deadline=None):
    """The CPU sweep of one dtype (args.dtype)."""
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
    points = [(n, name) for n in args.n for name in available_impls(args.impls)]
    for n, name in tqdm(points, desc="bench", unit="pt"):
        if name == "sdpa" and n > args.sdpa_max_n:
            continue
        if deadline is not None and time.monotonic() > deadline:
            print(f"\ntime budget ({args.max_seconds:g} s) spent: stopped before n={n} {LABEL[name]}")
            break
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

    if not records:
        print(f"no point measured for {args.dtype}")
        return
    path = os.path.join(args.out, f"cpu_{args.dtype}.csv")
    write_csv(path, records)
    report(records, args, machine)
    plot(records, args, machine)
    print(f"\nwrote {path}")


def write_csv(path, records):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0].keys()))
        w.writeheader()
        w.writerows(records)


def fmt(x, spec):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if spec.endswith(".2f") and x >= 1000:
        return ">999"
    return format(x, spec)


def ratios(r, by, mem="fwd_mib"):
    """Peer / torch_nystrom for a record r: forward time, forward+backward time, memory (field `mem`);
    None for this op itself or where a value is missing. Below 1 MiB the memory measure is noise: both
    sides count as at least 1 MiB."""
    o = by.get(("torch_nystrom", r["n"]))
    if not o or r["impl"] == "torch_nystrom":
        return None, None, None
    rm = None
    if r[mem] is not None and o[mem] is not None:
        rm = max(r[mem], 1.0) / max(o[mem], 1.0)
    return r["fwd_ms"] / o["fwd_ms"], r["fwd_bwd_ms"] / o["fwd_bwd_ms"], rm


def report(records, args, machine):
    by = {(r["impl"], r["n"]): r for r in records}
    print(f"\n{'n':>6} {'impl':<14}{'fwd ms':>9}{'f+b ms':>9}{'fwd MiB':>9}{'f+b MiB':>9}{'err exact':>10}{'err ref64':>10}"
          f"{'fwd x':>7}{'f+b x':>7}{'mem x':>7}")
    for r in records:
        rt, rb, rm = ratios(r, by)
        print(f"{r['n']:>6} {r['impl']:<14}{r['fwd_ms']:>9.1f}{r['fwd_bwd_ms']:>9.1f}{fmt(r['fwd_mib'], '9.1f'):>9}"
              f"{fmt(r['fwd_bwd_mib'], '9.1f'):>9}{r['err_vs_exact']:>10.2e}{fmt(r['err_vs_ref64'], '10.2e'):>10}"
              f"{fmt(rt, '7.2f'):>7}{fmt(rb, '7.2f'):>7}{fmt(rm, '7.2f'):>7}")
    print("(x = peer / torch_nystrom: above 1 means torch_nystrom is faster or smaller; memory ratios use at least 1 MiB)")


def plot(records, args, machine, path=None, gpu=False):
    """Log-log plots, one line per implementation: time (top row) and memory (bottom row) against n, the
    forward on the left, forward+backward next to it; on a GPU sweep a third column holds the forward's
    fraction of the memory-bandwidth floor."""
    if args.no_plot:
        return
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed (pip install -r requirements-dev.txt): no plots")
        return
    memory = "peak memory beyond inputs" if gpu else "memory beyond inputs, output"
    grid = [[("fwd_ms", "forward time (ms)"), ("fwd_bwd_ms", "forward+backward time (ms)")],
            [("fwd_mib", f"forward {memory} (MiB)"),
             ("fwd_bwd_mib", f"fwd+bwd {memory}{'' if gpu else ', grads'} (MiB)")]]
    if gpu:
        grid[0].append(("bw_frac", "forward: fraction of the bandwidth floor"))
        grid[1].append(None)
    fig, axes = plt.subplots(2, len(grid[0]), figsize=(5.5 * len(grid[0]), 8.5), squeeze=False)
    impls_seen = sorted({r["impl"] for r in records}, key=lambda s: list(LABEL.values()).index(s))
    for row, panels in enumerate(grid):
        for col, panel in enumerate(panels):
            ax = axes[row][col]
            if panel is None:
                ax.axis("off")
                continue
            key, title = panel
            for name in impls_seen:
                # memory below 0.1 MiB is page-granularity noise: drawn at 0.1
                pts = [(r["n"], max(r[key], 0.1) if key.endswith("mib") else r[key])
                       for r in records if r["impl"] == name and r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # an empty panel (e.g. --no-memory) has nothing to label
                ax.legend(fontsize=8)
    fig.suptitle(f"B={args.batch} H={args.heads} D={args.dim} m={args.landmarks} {args.dtype}; {machine}", fontsize=9)
    fig.tight_layout()
    if path is None:
        path = os.path.join(args.out, f"cpu_{args.dtype}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------- CUDA

GPU = "cuda"  # the device of the CUDA sweep


if __name__ == "__main__":
    main()
