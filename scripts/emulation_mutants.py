#!/usr/bin/env python3
"""A mutation record of the emulated CUDA suite (issue 12): seeded defects in the real kernels, applied one at
a time to a scratch copy of the sources, each of which the emulated suite must catch.

    python scripts/emulation_mutants.py [--out benchmarks/results/emulation_mutants.txt] [--keep DIR]

The scratch copy holds the committed sources (git HEAD). For every mutant it gets the one edit (the exact text must be found, so a mutant cannot go stale
silently), the emulated library is rebuilt there (incrementally: only the kernel files change), and the
emulated per-device tests run until the first failure (pytest -x) under one schedule. A mutant that passes the
suite is a hole in it, and the script exits non-zero. The unmutated copy must pass first.

Needs what scripts/test_emulated.sh needs (the venv of scripts/env.sh, with torch_nystrom installed). About
20 minutes on 2 cores (a first build of the scratch copy, then about a minute per mutant).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, what it breaks, file, text, replacement)
MUTANTS = [
    ("removed_syncthreads", "the barrier between loading a chunk of k̃/W (or keys/values) and reading it",
     "cuda/forward_kernels.cuh",
     "    __syncthreads();\n    const bool valid = c0 + lane < y1;",
     "    const bool valid = c0 + lane < y1;"),
    ("tile_edge_off_by_one", "the last owner row of a tile: row nx (one past the element's rows) is written too",
     "cuda/forward_kernels.cuh",
     "    if (gr >= nx) continue;\n    if (kLandmarkPass) {",
     "    if (gr > nx) continue;\n    if (kLandmarkPass) {"),
    ("shuffle_in_lane_branch", "the row maximum's warp shuffle taken only by lanes holding a valid landmark",
     "cuda/forward_kernels.cuh",
     "const A mnew = max(mrow[i], warp_max(s));",
     "const A mnew = valid ? max(mrow[i], warp_max(s)) : mrow[i];"),
    ("shared_memory_one_row_short", "the generic forward's staged owner rows sized one row short",
     "cuda/launch_templates.cuh",
     "return sizeof(A) * (BR * D + kChunk * (D + 1) + kChunk * Dv + BR * kChunk);",
     "return sizeof(A) * ((BR - 1) * D + kChunk * (D + 1) + kChunk * Dv + BR * kChunk);"),
    ("wrong_lse_merge", "the merge of the key splits of Bm·V adds their sums without rescaling to the common maximum",
     "cuda/forward_kernels.cuh",
     "l += part_sum[slot] * exp_acc(part_max[slot] - M);",
     "l += part_sum[slot];"),
    ("launch_above_optin_smem", "the generic forward launched with more dynamic shared memory than sm_90 allows",
     "cuda/launch_templates.cuh",
     "NYSTROM_LAUNCH(kernel, dim3(tiles, splits, n), kThreads, smem, stream)(a);",
     "NYSTROM_LAUNCH(kernel, dim3(tiles, splits, n), kThreads, smem + 232448, stream)(a);"),
    # Issue 13: the cp.async pipelines (caught only with the warp skew of the reversed and random schedules, or
    # with the emulator's landing of a copy at its wait).
    ("bmv_keys_prefetched_too_early", "the Bm·V pass's next key rows issued before every warp has its logits",
     "cuda/forward_tc_kernels.cuh",
     "    __syncthreads();  // every warp has its logits and the pooling is done: sK is free",
     "    __syncwarp();"),
    ("backward_rows_not_waited", "the tensor-core backward reads a tile's owner rows without waiting for their copies",
     "cuda/backward_tc_kernels.cuh",
     "    __pipeline_wait_prior(1);\n    return buf;",
     "    return buf;"),
    ("backward_prefetch_into_current_buffer", "the backward's next tile's rows issued into the buffer in use",
     "cuda/backward_tc_kernels.cuh",
     "tc_stage_owner_rows<T, D, DV>(mine + (buf ^ 1) * kStage,",
     "tc_stage_owner_rows<T, D, DV>(mine + buf * kStage,"),
]

TESTS = ["test_ops.py", "test_gradients.py", "test_edge_cases.py", "test_emulated.py", "test_cuda_tc_forward.py",
         "test_cuda_tc_backward.py"]
SCHEDULE = "random:1"


def run(cmd, cwd, env=None, log=None, timeout=None):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write(f"$ {' '.join(cmd)}\n{res.stdout[-4000:]}{res.stderr[-4000:]}\n")
    return res


def first_failure(output: str) -> str:
    lines = output.splitlines()
    fatal = [l.strip() for l in lines if l.startswith("Fatal Python error")]
    if fatal:  # the process died (an out-of-bounds write outside the emulator's guards): where it was
        where = [l.strip() for l in lines if "/tests/python/test_" in l and ", line " in l]
        return f"the test process crashed: {fatal[0]}" + (f" ({where[-1]})" if where else "")
    for i, line in enumerate(lines):
        if line.startswith("FAILED") or line.startswith("ERROR "):
            return line.strip()
    for line in reversed(lines):
        if line.startswith("E  "):
            return line.strip()
    return lines[-1].strip() if lines else "(no output)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "emulation_mutants.txt"))
    ap.add_argument("--keep", help="scratch directory to use and keep (default: a temporary one, removed)")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

    scratch = args.keep or tempfile.mkdtemp(prefix="nystrom-mutants-")
    src, build = os.path.join(scratch, "src"), os.path.join(scratch, "build")
    os.makedirs(src, exist_ok=True)
    # The committed sources (HEAD), not the working tree: what the record is about is reproducible.
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    log = open(os.path.join(scratch, "mutants.log"), "w")
    jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
    t0 = time.time()
    res = run(["cmake", "-S", src, "-B", build, f"-DPython3_EXECUTABLE={args.python}", "-DWITH_CUDA=OFF",
               "-DNYSTROM_BUILD_EMULATION=ON"], scratch, log=log)
    if res.returncode != 0:
        print(res.stdout, res.stderr)
        return 2
    env = dict(os.environ, NYSTROM_TEST_DEVICE="emu", NYSTROM_EMU_SCHEDULE=SCHEDULE,
               NYSTROM_LIBRARY=os.path.join(build, "libnystrom_emulated.so"))
    env.pop("NYSTROM_EMU_KERNEL_LOG", None)
    tests = [os.path.join(src, "tests", "python", t) for t in TESTS]

    def build_and_test():
        b = run(["cmake", "--build", build, "-j", jobs, "--target", "nystrom_emulated"], scratch, log=log)
        if b.returncode != 0:
            return "build failed", b.stdout[-2000:] + b.stderr[-2000:]
        t = run([args.python, "-m", "pytest", *tests, "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
                os.path.join(src, "tests"), env=env, log=log, timeout=3600)
        return ("passed" if t.returncode == 0 else "caught"), t.stdout + t.stderr

    rows = []
    status, output = build_and_test()
    rows.append(("(none: the sources as they are)", "", status, first_failure(output) if status != "passed" else
                 output.strip().splitlines()[-1]))
    ok = status == "passed"
    for name, what, path, old, new in MUTANTS:
        f = os.path.join(src, path)
        text = open(f).read()
        if text.count(old) != 1:
            rows.append((name, what, "STALE", f"the text to mutate occurs {text.count(old)} times in {path}"))
            ok = False
            continue
        open(f, "w").write(text.replace(old, new))
        status, output = build_and_test()
        open(f, "w").write(text)
        rows.append((name, what, status, first_failure(output)))
        ok = ok and status == "caught"
    run(["cmake", "--build", build, "-j", jobs, "--target", "nystrom_emulated"], scratch, log=log)  # restore

    lines = [f"Mutation record of the emulated CUDA suite (scripts/emulation_mutants.py), "
             f"{time.strftime('%Y-%m-%d')}, schedule {SCHEDULE}, tests: {' '.join(TESTS)} (pytest -x), "
             f"{time.time() - t0:.0f} s", ""]
    for name, what, status, detail in rows:
        lines.append(f"{name}: {status}")
        if what:
            lines.append(f"    defect: {what}")
        lines.append(f"    {detail}")
    report = "\n".join(lines) + "\n"
    print(report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as out:
        out.write(report)
    log.close()
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
