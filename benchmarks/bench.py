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
import platform
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import impls  # noqa: E402
import workload  # noqa: E402
from measure import (cuda_copy_bandwidth, cuda_median_time, cuda_peak_memory, median_time,  # noqa: E402
                     memory_in_subprocess, rel_error)

IMPLS = ["ours", "composition", "lucidrains", "sdpa_composition", "sdpa"]
LABEL = {"ours": "torch_nystrom", "composition": "composition", "lucidrains": "lucidrains",
         "sdpa_composition": "sdpa_comp", "sdpa": "exact_sdpa"}

# --variants (GPU): the CUDA backend's code paths, chosen by environment switches read by the library
# (docs/DESIGN.md §7), each run in a process of its own (the tensor-core switch is read once per process):
# name -> (environment, dtype override or None).
VARIANTS = {
    "fast": ({}, None),                                        # tensor-core forward, fused m x m kernels
    "no_tc": ({"NYSTROM_CUDA_TENSOR_CORES": "0"}, None),       # generic forward kernels, fused m x m
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
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
    if args.replot:
        records = read_records(args.replot)
        args.dtype = records[0]["dtype"]
        if "bw_frac" in records[0]:  # a GPU sweep: its table and plot go next to the CSV
            for name, column in (("batch", "B"), ("heads", "H"), ("dim", "D"), ("landmarks", "m")):
                setattr(args, name, int(records[0][column]))
            stem = os.path.splitext(args.replot)[0]
            machine = recorded_machine(args.replot) or os.path.basename(stem)
            print(gpu_report(records, args, machine))
            plot(records, args, machine, path=stem + ".png", gpu=True)
            return
        machine = (recorded_machine(args.replot)
                   or f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        report(records, args, machine)
        plot(records, args, machine, path=os.path.splitext(args.replot)[0] + ".png")
        return
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    if args.device == "cuda" and args.profile_point:
        profile_point(args)
        return
    if args.device == "cuda" and args.variant_child:
        variant_child(args)
        return
    if args.device == "cuda" and args.variants:
        run_variants(args, argv)
        return
    if args.device == "cuda":
        run_cuda(args, deadline)
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


def card_tag(name):
    """The device name as a file-name part: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.-") or "gpu"


def gpu_paths(out, tag, dtype):
    """csv, txt and png paths of one dtype's GPU sweep."""
    stem = os.path.join(out, f"gpu_{tag}_{dtype}")
    return stem + ".csv", stem + ".txt", stem + ".png"


def _flat_heads(t):
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _chunks(count, bytes_each, budget=1 << 30):
    """Slices of range(count) holding at most `budget` bytes each (at least one item)."""
    step = max(1, budget // max(1, bytes_each))
    return [slice(i, min(count, i + step)) for i in range(0, count, step)]


def exact_rows_error(out, q, k, v, rows):
    """Relative (Frobenius) error of out at query rows `rows` against exact attention in float64, a few
    heads at a time (all heads at once would need B*H*len(rows)*n doubles)."""
    qf, kf, vf, of = (_flat_heads(t) for t in (q, k, v, out))
    n, D = kf.shape[1], kf.shape[2]
    num = den = 0.0
    for sl in _chunks(qf.shape[0], 8 * n * (len(rows) + kf.shape[2] + vf.shape[2])):
        s = (qf[sl][:, rows].double() @ kf[sl].double().transpose(-1, -2)) * D ** -0.5
        ref = torch.softmax(s, -1) @ vf[sl].double()
        num += (of[sl][:, rows].double() - ref).square().sum().item()
        den += ref.square().sum().item()
    return math.sqrt(num / den)


def ref64_error(out, q, k, v, m):
    """Relative (Frobenius) error against the float64 Nyström reference (per_head: heads are independent, so
    it runs a few heads at a time)."""
    qf, kf, vf, of = (_flat_heads(t) for t in (q, k, v, out))
    n, D, Dv = kf.shape[1], kf.shape[2], vf.shape[2]
    num = den = 0.0
    for sl in _chunks(qf.shape[0], 8 * n * (2 * D + 2 * Dv + 4 * m)):
        ref = impls.reference64(qf[sl][None], kf[sl][None], vf[sl][None], m)[0]
        num += (of[sl].double() - ref).square().sum().item()
        den += ref.square().sum().item()
    return math.sqrt(num / den)


def _nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def gpu_point(name, sets, m, args, bandwidth):
    """One (implementation, n, dtype) of the GPU sweep: a record, or None if the peer cannot run it."""
    fn = getattr(impls, name)
    q, k, v = sets[0]
    B, H, n, D = q.shape
    Dv = v.shape[-1]
    extras = [{"packed": impls.lucidrains_pack(*s)} if name == "lucidrains" else {} for s in sets]
    try:
        with torch.no_grad():
            out = fn(q, k, v, m, **extras[0])
            rows = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: min(n, 256)].to(q.device)
            errors = not getattr(args, "no_errors", False)
            err_exact = exact_rows_error(out, q, k, v, rows) if errors else math.nan
            err_ref = (ref64_error(out, q, k, v, m) if errors and name in ("ours", "composition", "sdpa_composition")
                       else math.nan)
            out_bytes = _nbytes([out])
            del out
            t_fwd = cuda_median_time(lambda i: fn(*sets[i % len(sets)], m, **extras[i % len(sets)]),
                                     repeats=args.repeats)
            mem_f = None
            if not args.no_memory:
                mem_f, res = cuda_peak_memory(lambda: fn(q, k, v, m, **extras[0]))
                del res
        extras.clear()
        leaves = [[t.detach().requires_grad_() for t in s] for s in sets]
        grad = torch.randn(B, H, n, Dv, dtype=q.dtype, device=q.device)

        def fwd_bwd(i):
            inputs = leaves[i % len(leaves)]
            fn(*inputs, m).backward(grad)
            for t in inputs:
                t.grad = None

        t_fb = cuda_median_time(fwd_bwd, repeats=args.repeats)
        mem_fb = None
        if not args.no_memory:
            def fwd_bwd_kept():
                o = fn(*leaves[0], m)
                o.backward(grad)
                return [o.detach()] + [t.grad for t in leaves[0]]

            mem_fb, res = cuda_peak_memory(fwd_bwd_kept)
            res_bytes = _nbytes(res)
            del res
            for t in leaves[0]:
                t.grad = None
    except RuntimeError as exc:  # a peer that cannot run this configuration, or out of memory
        print(f"\n{LABEL[name]} fails at n={n} {str(q.dtype).replace('torch.', '')}: {str(exc).splitlines()[0]}")
        return None
    finally:
        extras.clear()
    floor_s, floor_fb_s = floors(q, k, v, bandwidth)
    mib = 2.0 ** 20
    return dict(
        impl=LABEL[name], n=n, dtype=str(q.dtype).replace("torch.", ""), B=B, H=H, D=D, m=m,
        fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_fb * 1e3,
        fwd_mib=None if mem_f is None else mem_f / mib,
        fwd_bwd_mib=None if mem_fb is None else mem_fb / mib,
        fwd_extra_mib=None if mem_f is None else (mem_f - out_bytes) / mib,
        fwd_bwd_extra_mib=None if mem_fb is None else (mem_fb - res_bytes) / mib,
        err_vs_exact=err_exact, err_vs_ref64=err_ref,
        floor_ms=floor_s * 1e3, bw_frac=floor_s / t_fwd,
        floor_fb_ms=floor_fb_s * 1e3, fwd_floor_x=t_fwd / floor_s, fb_floor_x=t_fb / floor_fb_s,
    )


def floors(q, k, v, bandwidth):
    """Seconds of the memory-bandwidth floors of issue 13 at `bandwidth` (bytes/s, read + write): forward, q, k,
    v read once and the output written once (8·n·d bytes per head in half precision at D = Dv, L = S); forward
    and backward, that plus q, k, v and the output gradient read again and dq, dk, dv written once (22·n·d)."""
    e = q.element_size()
    B, H, L, D = q.shape
    S, Dv = k.shape[-2], v.shape[-1]
    io = B * H * (L * D + S * D + S * Dv + L * Dv) * e  # q, k, v, out (or dO)
    grads = B * H * (L * D + S * D + S * Dv) * e          # dq, dk, dv
    return io / bandwidth, (2 * io + grads) / bandwidth


def gpu_report(records, args, machine):
    """The full table of one dtype's GPU sweep, as text."""
    by = {(r["impl"], r["n"]): r for r in records}
    r0 = records[0]
    lines = [f"B={r0['B']:g} H={r0['H']:g} D={r0['D']:g} m={r0['m']:g} {r0['dtype']}; {machine}", "",
             f"{'n':>7} {'impl':<14}{'fwd ms':>9}{'f+b ms':>9}{'fwd MiB':>9}{'f+b MiB':>9}{'err exact':>10}"
             f"{'err ref64':>10}{'%floor':>7}{'fwd x':>7}{'f+b x':>7}{'mem x':>7}"]
    for r in records:
        rt, rb, rm = ratios(r, by)
        lines.append(
            f"{r['n']:>7} {r['impl']:<14}{r['fwd_ms']:>9.2f}{r['fwd_bwd_ms']:>9.2f}{fmt(r['fwd_mib'], '9.1f'):>9}"
            f"{fmt(r['fwd_bwd_mib'], '9.1f'):>9}{r['err_vs_exact']:>10.2e}{fmt(r['err_vs_ref64'], '10.2e'):>10}"
            f"{100 * r['bw_frac']:>6.1f}%{fmt(rt, '7.2f'):>7}{fmt(rb, '7.2f'):>7}{fmt(rm, '7.2f'):>7}")
    lines.append("(x = peer / torch_nystrom: above 1 means torch_nystrom is faster or smaller; memory = peak during "
                 "the call beyond what was allocated before it, output and gradients included; %floor = time of "
                 "reading q, k, v and writing the output once at copy bandwidth / forward time)")
    return "\n".join(lines)


def gpu_short_table(records_by_dtype, machine, note=None):
    """One line per (dtype, n): this op's times, its fraction of the bandwidth floor, and the peers' ratios."""
    peers = [("composition", "comp"), ("lucidrains", "lucid"), ("sdpa_comp", "sdpac"), ("exact_sdpa", "sdpa")]
    present = [(label, short) for label, short in peers
               if any(r["impl"] == label for recs in records_by_dtype.values() for r in recs)]
    head = f"{'dtype':<9}{'n':>7}{'fwd ms':>9}{'f+b ms':>9}{'%floor':>7}{'f+b/fl':>7}"
    for _, short in present:
        head += f"{short + ' fwd x':>13}{short + ' f+b x':>13}{short + ' mem x':>13}"
    lines = [f"GPU benchmark, torch_nystrom vs peers ({machine})", head]
    for dtype, records in records_by_dtype.items():
        by = {(r["impl"], r["n"]): r for r in records}
        for n in sorted({r["n"] for r in records}):
            o = by.get(("torch_nystrom", n))
            if o is None:
                continue
            line = (f"{dtype:<9}{n:>7}{o['fwd_ms']:>9.2f}{o['fwd_bwd_ms']:>9.2f}{100 * o['bw_frac']:>6.1f}%"
                    f"{fmt(o.get('fb_floor_x'), '7.2f'):>7}")
            for label, _ in present:
                r = by.get((label, n))
                rt, rb, rm = ratios(r, by, mem="fwd_bwd_mib") if r is not None else (None, None, None)
                line += f"{fmt(rt, '13.2f'):>13}{fmt(rb, '13.2f'):>13}{fmt(rm, '13.2f'):>13}"
            lines.append(line)
    lines.append("(x = peer / torch_nystrom, above 1: torch_nystrom faster or smaller; mem x: fwd+bwd peak memory; "
                 "f+b/fl: forward+backward time / its bandwidth floor)")
    if note:
        lines.append(note)
    return "\n".join(lines)


def _predicted_seconds(cost, n, args):
    """Seconds the points at length n should take, from each (dtype, impl)'s last point: linear in n,
    quadratic for exact attention."""
    total = 0.0
    for (_, name), (n0, seconds) in cost.items():
        if name == "sdpa" and n > args.sdpa_max_n:
            continue
        total += seconds * (n / n0) ** (2 if name == "sdpa" else 1)
    return total


def run_cuda(args, deadline=None):
    if GPU == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.py --device cuda: torch sees no CUDA device")
    import torch_nystrom  # noqa: F401

    card = torch.cuda.get_device_name()
    tag = card_tag(card)
    machine = f"{card}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    os.makedirs(args.out, exist_ok=True)
    B, H, D, m = args.batch, args.heads, args.dim, args.landmarks
    names = available_impls(args.impls)
    bandwidth = cuda_copy_bandwidth(device=GPU)
    print(f"B={B} H={H} D={D} m={m} {' '.join(args.dtype)}; {machine}; "
          f"device-to-device copy {bandwidth / 1e9:.0f} GB/s (read + write)")

    records = {dtype: [] for dtype in args.dtype}
    cost = {}
    note = None

    def write_files(final=False):
        for dtype, recs in records.items():
            if not recs:
                continue
            csv_path, txt_path, png_path = gpu_paths(args.out, tag, dtype)
            write_csv(csv_path, recs)
            if final:
                table = gpu_report(recs, args, machine)
                with open(txt_path, "w") as f:
                    f.write(table + ("\n" + note if note else "") + "\n")
                print("\n" + table)
                plot(recs, argparse.Namespace(**{**vars(args), "dtype": dtype}), machine, path=png_path, gpu=True)
                print(f"wrote {csv_path}\nwrote {txt_path}")
        short = gpu_short_table(records, machine, note)
        with open(os.path.join(args.out, f"gpu_{tag}_short.txt"), "w") as f:
            f.write(short + "\n")
        return short

    try:
        for n in args.n:
            if deadline is not None and time.monotonic() + _predicted_seconds(cost, n, args) > deadline:
                note = f"time budget ({args.max_seconds:g} s) spent: stopped before n={n}"
                break
            for dtype in args.dtype:
                dt = getattr(torch, dtype)
                set_bytes = 3 * B * H * n * D * dt.itemsize
                free, _ = torch.cuda.mem_get_info()
                n_sets = max(1, min(args.input_sets, int(0.25 * free) // set_bytes))
                if n_sets < args.input_sets:
                    print(f"n={n} {dtype}: {n_sets} input set(s), not {args.input_sets}: device memory")
                sets = [workload.make_inputs(B, H, n, D, dt, seed=i, device=GPU) for i in range(n_sets)]
                for name in names:
                    if name == "sdpa" and n > args.sdpa_max_n:
                        continue
                    if deadline is not None and time.monotonic() > deadline:
                        note = f"time budget ({args.max_seconds:g} s) spent: stopped at n={n} {dtype} {LABEL[name]}"
                        break
                    t0 = time.monotonic()
                    rec = gpu_point(name, sets, m, args, bandwidth)
                    torch.cuda.empty_cache()
                    cost[(dtype, name)] = (n, time.monotonic() - t0)
                    if rec is not None:
                        records[dtype].append(rec)
                        print(f"n={n:>6} {dtype:<8} {rec['impl']:<14} fwd {rec['fwd_ms']:9.2f} ms  "
                              f"f+b {rec['fwd_bwd_ms']:9.2f} ms  {100 * rec['bw_frac']:5.1f}% of floor", flush=True)
                        write_files()
                del sets
                torch.cuda.empty_cache()
                if note:
                    break
            if note:
                break
    finally:
        short = write_files(final=True)
        print("\n" + short)


def variant_child(args):
    """One variant's points (its environment is already set by run_variants): a JSON line per record."""
    import json

    import torch_nystrom  # noqa: F401

    if not torch.cuda.is_available():
        sys.exit("bench.py --variant-child: torch sees no CUDA device")
    env, dtype_override = VARIANTS[args.variant_child]
    bandwidth = cuda_copy_bandwidth(device=GPU)
    args.no_memory, args.no_errors = True, True
    B, H, D, m = args.batch, args.heads, args.dim, args.landmarks
    for n in args.n:
        for dtype in ([dtype_override] if dtype_override else args.dtype):
            dt = getattr(torch, dtype)
            sets = [workload.make_inputs(B, H, n, D, dt, seed=i, device=GPU) for i in range(args.input_sets)]
            for name in args.impls:
                if name == "sdpa" and n > args.sdpa_max_n:
                    continue
                rec = gpu_point(name, sets, m, args, bandwidth)
                torch.cuda.empty_cache()
                if rec is not None:
                    rec.update(variant=args.variant_child, bandwidth_gbs=bandwidth / 1e9)
                    print("RECORD " + json.dumps(rec), flush=True)
            del sets
            torch.cuda.empty_cache()


def profile_point(args):
    """--profile-point N: the op's forward and backward once under the profiler's start/stop (ncu)."""
    import torch_nystrom  # noqa: F401

    dt = getattr(torch, args.dtype[0])
    q, k, v = (t.requires_grad_() for t in workload.make_inputs(args.batch, args.heads, args.profile_point, args.dim,
                                                                 dt, seed=0, device=GPU))
    grad = torch.randn(q.shape[:-1] + (v.shape[-1],), dtype=dt, device=GPU)
    for _ in range(2):
        impls.ours(q, k, v, args.landmarks).backward(grad)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    impls.ours(q, k, v, args.landmarks).backward(grad)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one forward+backward at n={args.profile_point} {args.dtype[0]}")


def variant_table(records):
    """The --variants table: per variant, dtype and n, this op's times and their multiples of the bandwidth
    floors, and the SDPA and SDPA-composition peers' times over this op's (above 1: this op is faster)."""
    peers = {(r["impl"], r["dtype"], r["n"]): r for r in records if r["impl"] != "torch_nystrom"}
    lines = [f"{'variant':<9}{'dtype':<9}{'n':>7}{'fwd ms':>9}{'fwd/fl':>7}{'f+b ms':>9}{'f+b/fl':>7}"
             f"{'sdpa fwd x':>11}{'sdpa f+b x':>11}{'sdpac fwd x':>12}{'sdpac f+b x':>12}"]
    for r in records:
        if r["impl"] != "torch_nystrom":
            continue
        line = (f"{r['variant']:<9}{r['dtype']:<9}{r['n']:>7}{r['fwd_ms']:>9.3f}{r['fwd_floor_x']:>7.2f}"
                f"{r['fwd_bwd_ms']:>9.3f}{r['fb_floor_x']:>7.2f}")
        for peer in ("exact_sdpa", "sdpa_comp"):
            p = peers.get((peer, r["dtype"], r["n"]))
            width = 11 if peer == "exact_sdpa" else 12
            for key in ("fwd_ms", "fwd_bwd_ms"):
                line += f"{fmt(None if p is None else p[key] / r[key], f'{width}.2f'):>{width}}"
        lines.append(line)
    bw = records[0].get("bandwidth_gbs") if records else None
    lines.append(f"(fwd/fl, f+b/fl: time / the bandwidth floor of issue 13 (forward 8·n·d bytes per head in half "
                 f"precision, forward+backward 22·n·d) at the measured copy bandwidth"
                 + (f" {bw:.0f} GB/s" if bw else "") + "; x = peer time / this op's time)")
    return "\n".join(lines)


def run_variants(args, argv):
    """--variants: each variant in a child process (its environment set), the peers (SDPA, SDPA composition)
    measured once, in the first variant's process; then one table."""
    import json
    import subprocess

    records = []
    t0 = time.monotonic()
    for i, variant in enumerate(args.variants):
        env, _ = VARIANTS[variant]
        impls_ = ["ours"] + [p for p in ("sdpa", "sdpa_composition") if p in args.impls and i == 0]
        cmd = [sys.executable, os.path.abspath(__file__), "--device", "cuda", "--variant-child", variant,
               "--n", *map(str, args.n), "--dtype", *args.dtype, "--impls", *impls_,
               "--batch", str(args.batch), "--heads", str(args.heads), "--dim", str(args.dim),
               "--landmarks", str(args.landmarks), "--repeats", str(args.repeats),
               "--sdpa-max-n", str(args.sdpa_max_n), "--input-sets", str(args.input_sets)]
        left = None
        if args.max_seconds is not None:
            left = args.max_seconds - (time.monotonic() - t0)
            if left < 15:
                print(f"time budget ({args.max_seconds:g} s) spent: variants from {variant} on not run")
                break
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("NYSTROM_CUDA_TENSOR_CORES", "NYSTROM_CUDA_FUSED_MM")}
        child_env.update(env)
        print(f"== variant {variant} {env or ''}", flush=True)
        try:
            res = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            res = argparse.Namespace(stdout=out, stderr="(time budget spent)", returncode=124)
        got = [json.loads(line[7:]) for line in res.stdout.splitlines() if line.startswith("RECORD ")]
        records.extend(got)
        for r in got:
            print(f"  {r['impl']:<14}{r['dtype']:<9} n={r['n']:>7} fwd {r['fwd_ms']:9.3f} ms "
                  f"({r['fwd_floor_x']:.2f}x floor)  f+b {r['fwd_bwd_ms']:9.3f} ms ({r['fb_floor_x']:.2f}x floor)")
        if res.returncode != 0:
            print(f"variant {variant}: exit {res.returncode}\n{res.stderr[-2000:]}")
    print("\n" + variant_table(records))


if __name__ == "__main__":
    main()
