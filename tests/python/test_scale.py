"""Scale: one head of n = 262144 tokens, D = 64, m = 64, float32, forward and backward; time and accuracy on
every test device, memory on the CPU (test_cuda.py measures the peak device memory of a long sequence).

Linear memory is the point of the method: beyond its inputs and outputs a call may use < 1 GiB (an
n x n attention matrix alone would be 256 GiB). Memory is the peak resident set size of a separate
process, measured as benchmarks/measure.py does: the peak is reset through /proc/self/clear_refs,
VmHWM read after the call, and glibc is told (MALLOC_MMAP_THRESHOLD_=65536) to serve large blocks with
mmap so that memory freed by earlier work is given back instead of silently reused. Times are taken in
this process (that malloc setting slows small allocations down). The result is checked against the
same math in float64 (the forward on a random subset of rows, the gradients in full).

Marked slow: it runs only when asked for (`pytest -m slow tests/python/test_scale.py -s`, or
NYSTROM_RUN_SLOW=1); `-s` shows the measured numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import rel_err, run_slow, to_device
from reference import landmarks, max_column_sum, newton_schulz, nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")

pytestmark = pytest.mark.slow

N, D, M = 262144, 64, 64
MEMORY_LIMIT = 1 << 30  # bytes beyond inputs and outputs
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _only_when_asked(request):
    if not run_slow(request):
        pytest.skip("slow (about 30 s on idle cores): run with -m slow or NYSTROM_RUN_SLOW=1")


def smooth_inputs(n, d, seed=0, dtype=torch.float32):
    """(1, 1, n, d) q, k, v: a few slow waves along the sequence (q and k share some) plus noise, like
    projections of real tokens."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n, dtype=torch.float64) / n
    waves = torch.stack([torch.sin(2 * math.pi * f * t + 2 * math.pi * torch.rand(1, generator=g, dtype=torch.float64))
                         for f in range(1, 7)], 1)  # (n, 6)

    def part():
        return waves @ (torch.randn(6, d, generator=g, dtype=torch.float64) / math.sqrt(6))

    shared = part()
    q = shared + 0.5 * part() + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    k = shared + 0.5 * part() + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    v = part() + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype).reshape(1, 1, n, d).contiguous() for x in (q, k, v))


# Runs in a fresh process: prints one JSON line with the resident sizes (KiB) before the call and at its
# peak, and the bytes of the call's outputs.
_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, torch_nystrom
from test_scale import smooth_inputs, N, D, M

def kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

backward = sys.argv[2] == "1"
q, k, v = smooth_inputs(N, D)
grad = torch.randn(1, 1, N, D) if backward else None
# One tiny call first: one-time set-up (thread pools, BLAS buffers) is not the call's memory.
x = torch.randn(1, 1, 700, D, requires_grad=True)
torch.ops.nystrom.nystrom_attention(x, x, x, M, 6, "per_head", None, None, None).sum().backward()
del x
if backward:
    for t in (q, k, v):
        t.requires_grad_(True)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
if backward:
    out = torch.ops.nystrom.nystrom_attention(q, k, v, M, 6, "per_head", None, None, None)
    out.backward(grad)
    outputs = [out, q.grad, k.grad, v.grad]
else:
    with torch.no_grad():
        out = torch.ops.nystrom.nystrom_attention(q, k, v, M, 6, "per_head", None, None, None)
    outputs = [out]
peak = kib("VmHWM")
print(json.dumps({"before_kib": before, "peak_kib": peak,
                  "output_bytes": sum(t.numel() * t.element_size() for t in outputs)}))
"""


def _measure_memory(backward: bool) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _PROBE, here, "1" if backward else "0"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["extra_bytes"] = (r["peak_kib"] - r["before_kib"]) * 1024 - r["output_bytes"]
    return r


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_memory_beyond_inputs_and_outputs(backward):
    if not sys.platform.startswith("linux") or not _clear_refs_works():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident size")
    r = _measure_memory(backward)
    print(f"\n[scale] n={N} D={D} m={M} float32 {'forward+backward' if backward else 'forward'}: "
          f"peak - before = {(r['peak_kib'] - r['before_kib']) / 1024:.0f} MiB, outputs "
          f"{r['output_bytes'] / MIB:.0f} MiB, beyond inputs and outputs {r['extra_bytes'] / MIB:.0f} MiB "
          f"(limit {MEMORY_LIMIT / MIB:.0f} MiB)")
    assert r["extra_bytes"] < MEMORY_LIMIT


def _float64_same_math(q, k, v, rows):
    """The op's math in float64 for the given query rows (no masks, per_head, 6 iterations)."""
    scale = D ** -0.5
    q64, k64, v64 = q[0].double(), k[0].double(), v[0].double()  # (1, n, D)
    ql, kl = landmarks(q64, M), landmarks(k64, M)  # (1, M, D)
    a = torch.softmax(scale * ql @ kl.transpose(-1, -2), -1)
    bm = torch.softmax(scale * ql @ k64.transpose(-1, -2), -1)  # (1, M, n)
    w = newton_schulz(a, max_column_sum(a), 6) @ (bm @ v64)  # (1, M, D)
    return (torch.softmax(scale * q64[:, rows] @ kl.transpose(-1, -2), -1) @ w)[0]


def test_time_and_accuracy(device):
    q, k, v = smooth_inputs(N, D)
    qd, kd, vd = to_device((q, k, v), device)
    op = torch.ops.nystrom.nystrom_attention
    with torch.no_grad():
        op(qd, kd, vd, M, 6, "per_head", None, None, None)  # warm-up
        device.synchronize()
        t0 = time.perf_counter()
        out = op(qd, kd, vd, M, 6, "per_head", None, None, None)
        device.synchronize()
        t_fwd = time.perf_counter() - t0
        out = out.cpu()
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (qd, kd, vd))
    grad = torch.randn(1, 1, N, D, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    out_g = op(qg, kg, vg, M, 6, "per_head", None, None, None)
    out_g.backward(grad.to(device.torch))
    device.synchronize()
    t_fb = time.perf_counter() - t0

    assert torch.isfinite(out).all() and torch.equal(out, out_g.detach().cpu())
    for t in (qg, kg, vg):
        assert torch.isfinite(t.grad).all()

    rows = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:512]
    err_out = rel_err(out[0, 0, rows], _float64_same_math(q, k, v, rows))

    # Gradients in full against the float64 reference's autograd (about 3 GiB peak for this process).
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = nystrom_reference(q64, k64, v64, M)
    err_ref_out = rel_err(out, ref)
    ref.backward(grad.double())
    err_grads = [rel_err(a.grad, b.grad) for a, b in ((qg, q64), (kg, k64), (vg, v64))]
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else device.name
    print(f"\n[scale] n={N} D={D} m={M} float32, {where}: forward {t_fwd:.2f} s, "
          f"forward+backward {t_fb:.2f} s; relative error vs float64: output (512 rows) {err_out:.1e}, "
          f"output (all) {err_ref_out:.1e}, grads q/k/v {err_grads[0]:.1e}/{err_grads[1]:.1e}/{err_grads[2]:.1e}")
    assert err_out <= 1e-4 and err_ref_out <= 1e-4
    assert max(err_grads) <= 1e-3
