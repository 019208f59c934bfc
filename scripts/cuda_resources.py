#!/usr/bin/env python3
"""Resource report of every CUDA kernel, from the compiler (no GPU needed).

Compiles each file of cuda/ with ``nvcc -Xptxas -v`` for each architecture
the library ships (sm_80, sm_90) and tabulates, per kernel: registers per
thread, static shared memory, stack frame and local-memory spills. Dynamic
shared memory (sized at launch from the head dims) is listed from the same
formulas the launchers use.

    python3 scripts/cuda_resources.py [--out benchmarks/results/cuda_resources.txt]

Exits non-zero when a kernel of a fast path (float32, float16, bfloat16
inputs) spills to local memory on sm_90. float64 kernels are reported but
not held to that (they exist for gradcheck).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ["sm_80", "sm_90"]


def nvcc_path() -> str:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.exists(cand):
            return cand
    sys.exit("cuda_resources: nvcc not found (set NVCC or put it on PATH)")


def demangle(names):
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """nystrom::cuda::kern::softmax_matmul_kernel<float, ...>(ForwardArgs) -> softmax_matmul_kernel<float, ...>"""
    name = name.replace("nystrom::cuda::kern::", "").replace("nystrom::cuda::", "")
    name = re.sub(r"\(.*\)$", "", name)
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "half")


def compile_report(nvcc: str, src: str, arch: str):
    with tempfile.TemporaryDirectory() as tmp:
        # The flags of the CMake build (torch's CMake package adds the --expt ones).
        cmd = [nvcc, "-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda",
               f"-arch={arch}", "-I", os.path.join(ROOT, "csrc"), "-Xptxas", "-v", "-c", src, "-o", os.path.join(tmp, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"cuda_resources: {' '.join(cmd)} failed:\n{res.stderr}")
    rows, cur = {}, None
    for line in res.stderr.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = m.group(1)
            rows[cur] = {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            rows[cur]["stack"], rows[cur]["spill_st"], rows[cur]["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[cur]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            rows[cur]["smem"] = int(s.group(1)) if s else 0
    return rows


def dynamic_smem_table() -> list:
    """Dynamic shared memory per block (bytes), the launchers' formulas (cuda/launch_templates.cuh)."""
    lines = ["dynamic shared memory per block (bytes), from cuda/launch_templates.cuh:",
             f"  {'kernel':<28}{'dtype':<10}{'D=Dv=64':>10}{'128':>10}{'256':>10}"]
    for dtype, acc, rows_per_block in (("fp32/16", 4, 32), ("fp64", 8, 8)):
        for name, f in (
            ("softmax_matmul (forward)", lambda d: acc * (rows_per_block * d + 32 * (d + 1) + 32 * d + rows_per_block * 32)),
            ("backward_query/key", lambda d: acc * (2 * rows_per_block * d + 2 * 32 * (d + 1) + 2 * rows_per_block * 32 + 64)),
        ):
            lines.append(f"  {name:<28}{dtype:<10}{f(64):>10}{f(128):>10}{f(256):>10}")
    lines.append(f"  {'newton_schulz (m<=32/64/128)':<28}{'fp32':<10}{3*32*32*4:>10}{3*64*64*4:>10}{3*128*128*4:>10}")
    lines.append(f"  {'newton_schulz (m<=32/64)':<28}{'fp64':<10}{3*32*32*8:>10}{3*64*64*8:>10}{'cuBLAS':>10}")
    # mm_backward_kernel.cuh: eight MP x (MP + 1) matrices and (MP/4)^2 + MP + 2 scalars
    mm = lambda mp, a: a * (8 * mp * (mp + 1) + (mp // 4) ** 2 + mp + 2)
    lines.append(f"  {'mm_backward (m<=32/64/128)':<28}{'fp32':<10}{mm(32, 4):>10}{mm(64, 4):>10}{'ATen':>10}")
    lines.append(f"  {'mm_backward (m<=32/64)':<28}{'fp64':<10}{mm(32, 8):>10}{'ATen':>10}{'ATen':>10}")
    # Tensor cores, float16/bfloat16 (forward_tc_kernels.cuh, backward_tc_kernels.cuh): 4 warps x 16 rows,
    # 64 landmark slots; D = Dv = 64 / 128 (the mixed pairs lie between).
    # Every line of a tile has 8 elements of padding (kTcPad: no bank conflicts): width w takes w + 8.
    p = lambda w: w + 8
    tc_q = lambda d: 2 * 64 * 2 * p(d) + 4 * (2 * 16 * p(d) + 4 * 16 * p(64) + 2 * 16 * p(64) + 4 * 16 * p(d))
    tc_l = lambda d: 2 * 64 * 3 * p(d) + 4 * (4 * 16 * p(64) + 2 * 16 * p(64) + 4 * 16 * p(d) + 4 * 16)
    # The backward sides: per warp 13.5 KiB of scratch and, per stage (NYSTROM_CUDA_TC_STAGES), the owner rows.
    warp_b = lambda d, st: st * 2 * 16 * 2 * p(d) + 2 * 4 * 16 * p(64) + 2 * 2 * 16 * p(64)
    tc_bq = lambda st: lambda d: 2 * 64 * 2 * p(d) + 4 * 64 * 2 * p(d) + 4 * warp_b(d, st)
    tc_bk = lambda st: lambda d: 2 * 64 * 2 * p(d) + 4 * 64 * p(d) + 2 * 4 * 64 + 4 * warp_b(d, st)
    tc_dq = lambda d: 2 * 64 * p(d) + 4 * (2 * 16 * p(64) + 4 * 16 * p(d))
    for name, f in (("tc_query (forward)", tc_q), ("tc_landmark (forward)", tc_l),
                    ("tc_backward_query, 2 stages", tc_bq(2)), ("tc_backward_query, 1 stage", tc_bq(1)),
                    ("tc_backward_key, 2 stages", tc_bk(2)), ("tc_backward_key, 1 stage", tc_bk(1)),
                    ("tc_backward_dq (D)", tc_dq)):
        lines.append(f"  {name:<28}{'fp16/bf16':<10}{f(64):>10}{f(128):>10}{'-':>10}")
    lines.append("  (sm_80 allows 163 KiB per block, sm_90 227 KiB; above that the launcher refuses with a clear")
    lines.append("   error, Newton-Schulz takes the batched cuBLAS path, or a tensor-core backward side runs with")
    lines.append("   one stage, or on CUDA cores where one stage does not fit either)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cuda_resources.txt"))
    args = ap.parse_args()
    nvcc = nvcc_path()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    sources = sorted(f for f in os.listdir(os.path.join(ROOT, "cuda")) if f.startswith("inst_") and f.endswith(".cu"))
    lines = [f"# CUDA kernel resources (nvcc -Xptxas -v), {version}", ""]
    failures = []
    for arch in ARCHS:
        lines.append(f"## {arch}")
        lines.append(f"{'kernel':<72}{'regs':>6}{'smem':>7}{'stack':>7}{'spill st/ld':>13}")
        for src in sources:
            rows = compile_report(nvcc, os.path.join(ROOT, "cuda", src), arch)
            names = demangle(list(rows))
            fast = "double" not in src
            for mangled in sorted(rows, key=lambda n: short(names[n])):
                r = rows[mangled]
                label = short(names[mangled])
                spill = f"{r['spill_st']}/{r['spill_ld']}"
                lines.append(f"{label[:71]:<72}{r['regs']:>6}{r['smem']:>7}{r['stack']:>7}{spill:>13}")
                if fast and arch == "sm_90" and (r["spill_st"] or r["spill_ld"]):
                    failures.append(f"{arch} {label}: {spill} bytes spilled")
        lines.append("")
    lines += dynamic_smem_table()
    lines.append("")
    lines.append("fast-path spills on sm_90: " + ("; ".join(failures) if failures else "none"))
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text, end="")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
