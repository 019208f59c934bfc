"""Timing and CPU memory measurement shared by the benchmarks.

Memory: the peak resident set size of the process during the call, minus the
resident size just before it (Linux: the peak is reset through
/proc/self/clear_refs). It is measured in a separate process (memory_probe.py)
in which glibc serves every allocation above 64 KiB with mmap and gives it back
on free (MALLOC_MMAP_THRESHOLD_), so memory freed by an earlier call is not
silently reused; that setting slows small allocations down, so times are taken
in the ordinary process. The same measure is applied to every implementation;
it counts the output and every temporary the call allocates.
"""
import os
import statistics
import subprocess
import sys
import time

import torch

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def memory_in_subprocess(impl, B, H, n, D, m, dtype="float32", backward=False, pinv_init="per_head"):
    """Peak memory (bytes) one call of ``impl`` adds beyond its inputs and results, measured by
    memory_probe.py in a fresh process."""
    env = dict(os.environ, **{MMAP_ENV: "65536"})
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_probe.py"),
           impl, str(B), str(H), str(n), str(D), str(m), dtype, "1" if backward else "0", pinv_init]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe failed: {' '.join(cmd)}\n{res.stderr}")
    value = res.stdout.strip().splitlines()[-1]
    return None if value == "None" else int(value)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_bytes(fn):
    """Bytes of resident memory the call adds at its peak (None if unmeasurable)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    del result
    return max(0, peak - before) * 1024


def median_time(fn, repeats=5, warmup=1, min_time=0.0):
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_error(x, ref):
    x = x.double()
    ref = ref.double()
    return (torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref)).item()
