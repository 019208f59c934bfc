"""Timing and memory measurement shared by the benchmarks (CPU; CUDA at the end of the file).

Memory: the peak resident set size of the process during the call, minus the
resident size just before it (Linux: the peak is reset through
/proc/self/clear_refs). It is measured in a separate process (memory_probe.py)
in which glibc serves every allocation above 64 KiB with mmap and gives it back
on free (MALLOC_MMAP_THRESHOLD_), so memory freed by an earlier call is not
silently reused; that setting slows small allocations down, so times are taken
in the ordinary process. The same measure is applied to every implementation;
it counts the output and every temporary the call allocates.

CUDA: times from CUDA events around each call (the device idle before it), median
after a warm-up; memory is torch.cuda.max_memory_allocated() during the call
(peak reset just before) minus what was allocated before it, so it counts the
output (and the gradients) and every temporary, the same way for every
implementation; the memory-bandwidth floor uses the bandwidth of a large
device-to-device copy measured in the same process.
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


# ---------------------------------------------------------------------------------------------- CUDA


def cuda_median_time(fn, repeats=10, warmup=2):
    """Median seconds of fn(i), i = 0, 1, ... (the caller rotates input sets by i), timed with CUDA events.

    The device is synchronised before each call, so a call's time includes its launch overhead and never
    overlaps the previous call.
    """
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def cuda_peak_memory(fn):
    """(bytes, result): the peak device memory allocated while fn() runs beyond what was allocated before
    it (its result included), and fn's result."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, result


def cuda_copy_bandwidth(nbytes=1 << 30, repeats=10, device="cuda"):
    """Device memory bandwidth in bytes/s: a device-to-device copy of nbytes, counting its read and its write
    (median of repeats). Uses at most a quarter of the free memory."""
    free, _ = torch.cuda.mem_get_info()
    nbytes = int(max(1 << 24, min(nbytes, free // 4)))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    seconds = cuda_median_time(lambda i: dst.copy_(src), repeats=repeats, warmup=3)
    del src, dst
    return 2 * nbytes / seconds
