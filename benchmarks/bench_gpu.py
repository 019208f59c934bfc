"""The CUDA side of bench.py: the GPU sweep (--device cuda), the variants table (--variants) and the profiling
point for ncu (--profile-point). Run through bench.py, which imports this module only for those modes; the
docstring of bench.py describes what is measured.
"""
import argparse
import math
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import impls  # noqa: E402
import workload  # noqa: E402
from bench import GPU, LABEL, VARIANTS, available_impls, fmt, plot, ratios, write_csv  # noqa: E402
from measure import cuda_copy_bandwidth, cuda_median_time, cuda_peak_memory  # noqa: E402


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
        cmd = [sys.executable, os.path.join(HERE, "bench.py"), "--device", "cuda", "--variant-child", variant,
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
                     if k not in ("NYSTROM_CUDA_TENSOR_CORES", "NYSTROM_CUDA_TC_BACKWARD", "NYSTROM_CUDA_FUSED_MM",
                                  "NYSTROM_CUDA_TC_STAGES")}
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

