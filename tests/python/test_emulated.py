"""What only the emulated CUDA backend can check (scripts/test_emulated.sh; docs/DESIGN.md §11): the same call
under every schedule of a block's threads (a race shows as a difference), the launch limits of another target
(sm_86's 99 KiB of shared memory), the glue's handling of an error left pending by earlier code, and the modelled
shared-memory bank traffic of the tensor-core kernels' WMMA loads and stores (cuda/emu/wmma.h).

Skipped unless this process loaded the emulated backend (NYSTROM_LIBRARY=.../libnystrom_emulated.so). The
suite as a whole also runs once per schedule there; these tests switch schedules within one process to compare
results bitwise.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from cases import CASE
from helpers import Case, cotangent, emulated_library, expected_output, assert_rel_close, trailing

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

pytestmark = pytest.mark.skipif(not emulated_library(), reason="needs the emulated CUDA backend (scripts/test_emulated.sh)")

SCHEDULES = ["inorder", "reversed", "random:7", "random:12345"]


def emulator(command, argument=""):
    return torch.ops.nystrom._emulator(command, argument)


@contextlib.contextmanager
def emulator_setting(command, value):
    before = emulator(command)
    emulator(command, value)
    try:
        yield
    finally:
        emulator(command, before)


def per_kernel(command):
    """The emulator's per-kernel report `command` ("kernels", "smem", "banks": one "name=v[,v...]" line per
    kernel) as name -> tuple of ints."""
    out = {}
    for line in emulator(command).splitlines():
        name, _, values = line.rpartition("=")
        out[name] = tuple(int(x) for x in values.split(","))
    return out


def kernels_launched():
    return {name: n for name, (n,) in per_kernel("kernels").items()}


def launched_during(fn):
    """fn()'s result and the kernels (name -> launches) it launched."""
    before = kernels_launched()
    result = fn()
    after = kernels_launched()
    return result, {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}


def fwd_bwd(case_id, dtype, device):
    q, k, v, kw = CASE[case_id].build(dtype, device, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), cotangent(out.shape, dtype, device))
    return [out.detach(), *grads]


# Every kernel family: generic forward and backward (several rows per warp, masks, exact elements, splits of
# Bm·V), both Newton–Schulz sizes, the tensor-core forward, float64's one-row-per-warp kernels.
RACE_CASES = [("mixed_exact_and_nystrom", torch.float32), ("d64_m64_cross", torch.float32),
              ("d96_m100_middle_original", torch.float64), ("tc_d64_m64", torch.float16),
              ("tc_d128_m17_cross", torch.bfloat16), ("long_tiles", torch.float32)]


@pytest.mark.parametrize("case_id,dtype", RACE_CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in RACE_CASES])
def test_schedules_agree_bitwise(case_id, dtype, cuda_device):
    """Forward and backward under four schedules of the threads between barriers: no race, so the same bits."""
    results = {}
    for schedule in SCHEDULES:
        with emulator_setting("schedule", schedule):
            results[schedule] = fwd_bwd(case_id, dtype, cuda_device)
    first = results[SCHEDULES[0]]
    for schedule in SCHEDULES[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), first, results[schedule]):
            assert torch.equal(a, b), f"{case_id}: {name} differs between {SCHEDULES[0]} and {schedule}"


def bank_traffic():
    """kernel -> (instructions, wavefronts, conflict-free wavefronts) of its WMMA shared-memory loads and stores."""
    return per_kernel("banks")


@pytest.mark.parametrize("D,Dv,dtype", [(64, 64, torch.float16), (128, 128, torch.bfloat16), (128, 64, torch.bfloat16)])
def test_tensor_core_tiles_are_free_of_bank_conflicts(D, Dv, dtype, cuda_device):
    """Every WMMA load and store of the tensor-core forward and backward takes the conflict-free number of
    shared-memory wavefronts under the emulator's model of the fragment accesses (lines padded by 8 elements,
    forward_tc_kernels.cuh kTcPad). Unpadded (pitches of 64 or 128 elements, multiples of 128 bytes) the same
    kernels took 6.9-7.4x. A model, not a measurement: gpu_check.sh's ncu profile is the check on a GPU."""
    q, k, v, kw = Case("banks", B=2, H=2, L=150, S=131, D=D, Dv=Dv, m=48).build(dtype, cuda_device,
                                                                              requires_grad=True)
    before = bank_traffic()
    out = nystrom_attention(q, k, v, **kw)
    torch.autograd.grad(out, (q, k, v), cotangent(out.shape, dtype, cuda_device))
    seen = set()
    for name, (instr, waves, ideal) in bank_traffic().items():
        i0, w0, d0 = before.get(name, (0, 0, 0))
        if instr > i0 and "::tc_" in name:
            seen.add(name.split("::tc_")[1].split("<")[0])
            assert waves - w0 == ideal - d0, f"{name}: {waves - w0} wavefronts for {ideal - d0} conflict-free"
    assert seen >= {"query_kernel", "landmark_kernel", "backward_query_kernel", "backward_key_kernel",
                    "backward_dq_kernel"}, sorted(seen)


def test_sm86_takes_the_generic_kernels_for_d128_half(cuda_device):
    """D = Dv = 128 on the tensor cores needs 112 KiB of shared memory per block: more than sm_86's opt-in
    limit (101376 bytes). There the generic kernels serve the call, with the same accuracy; on sm_90 the
    tensor-core kernels do."""
    case = Case("tc128", B=1, H=2, L=200, S=230, D=128, Dv=128, m=32, key_mask=trailing(230))
    q, k, v, kw = case.build(torch.float16, cuda_device)
    ref, _ = expected_output(q, k, v, kw, torch.float32)
    for arch, tensor_cores in (("sm90", True), ("sm86", False)):
        with emulator_setting("arch", arch):
            out, launched = launched_during(lambda: nystrom_attention(q, k, v, **kw))
        tc = [name for name in launched if "tc_" in name]
        assert bool(tc) == tensor_cores, f"{arch}: tensor-core kernels launched: {tc}"
        assert_rel_close(out.double(), ref, 5e-3, f"{arch} output")


def test_sm86_refuses_shared_memory_it_does_not_have(cuda_device):
    """float32 D = Dv = 256 needs about 100 KiB per block in the forward (137 KiB in the backward): on sm_86
    (101376 bytes) a clear error naming the head dims, the need and the limit, not a failed launch; sm_90 runs
    it."""
    q, k, v, kw = Case("d256", B=1, H=1, L=90, S=80, D=256, Dv=256, m=8).build(torch.float32, cuda_device,
                                                                              requires_grad=True)
    with emulator_setting("arch", "sm86"):
        with pytest.raises(RuntimeError, match=r"D = 256, Dv = 256 in Float need \d+ bytes of shared memory per "
                                               r"block; this GPU allows 101376 \(smaller head dims"):
            nystrom_attention(q, k, v, **kw)
    nystrom_attention(q, k, v, **kw).sum().backward()
    assert torch.isfinite(q.grad).all()


def test_an_error_pending_from_earlier_code_is_not_this_ops(cuda_device, capfd):
    """A launch error that unrelated code left in the runtime is cleared with a warning that names it (torch's
    C++ warning, on stderr), and the op's own launches are then checked on their own."""
    q, k, v, kw = CASE["d7_m17_random_masks"].build(torch.float32, cuda_device)
    expected = nystrom_attention(q, k, v, **kw)
    assert "invalid configuration" in emulator("inject_error")
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        out = nystrom_attention(q, k, v, **kw)
        again = nystrom_attention(q, k, v, **kw)
    err = capfd.readouterr().err
    assert err.count("was pending before this call") == 1 and "invalid configuration" in err, err
    assert torch.equal(out, expected) and torch.equal(again, expected)


def test_a_fault_in_a_kernel_is_reported_and_sticky(cuda_device):
    """The emulator's sticky fault state is what the suite's reset fixture clears: a reset leaves no error."""
    emulator("reset")
    assert emulator("last_error") == ""
