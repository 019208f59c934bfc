"""Sequence-parallel Nyström attention (torch_nystrom.distributed, docs/DESIGN.md §12).

For each world size (2 and 3) one set of gloo processes on 127.0.0.1 runs the whole case table of
distributed_worker.py (forward and gradients of q, k, v against the one-process op on the concatenated
sequence, float64 within 1e-10, float32 / bfloat16 within their rounding bounds; masks anywhere, uneven and
empty shards, shards of padding only, segments across shard edges, exact and Nyström elements in one batch,
cross-attention with differently cut query and key shards, both pinv_init values, an error every rank
raises); each case is then one test here. The processes are bounded in time and destroy their process group.

In this process: the stage ops' schemas and shape functions (torch.library.opcheck on a one-rank pipeline),
and the argument errors of the Python entry point.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

import distributed_worker as worker
import torch_nystrom
import torch_nystrom.distributed as tnd

WORLD_SIZES = (2, 3)
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, device: str) -> list:
    """Runs distributed_worker.py in `world` processes (CPU tensors and gloo, or CUDA tensors and NCCL);
    returns each rank's results (dict per case)."""
    env = dict(os.environ)
    env["NYSTROM_LIBRARY"] = torch_nystrom.library_path()
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(torch_nystrom.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(2):  # a port taken between _free_port and the bind: once more on another
            port = _free_port()
            outs = [os.path.join(tmp, f"rank{r}_{attempt}.json") for r in range(world)]
            procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(port), outs[r], device], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                     for r in range(world)]
            logs = []
            try:
                for p in procs:
                    logs.append(p.communicate(timeout=TIMEOUT_S)[0])
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                pytest.fail(f"the {world} gloo processes did not finish within {TIMEOUT_S} s")
            finally:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
            if all(os.path.exists(o) for o in outs):
                results = []
                for o in outs:
                    with open(o) as f:
                        results.append(json.load(f))
                return results
            if attempt == 0 and any("address already in use" in (log or "").lower() for log in logs):
                continue
            pytest.fail(f"world {world}: a rank wrote no results; its output:\n" + "\n".join(logs))
    raise AssertionError("unreachable")


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"world{w}" for w in WORLD_SIZES])
def world_results(request, device):
    """Per device of the suite (helpers.devices()): "cpu" and the emulated CUDA backend "emu" run gloo on CPU
    tensors (the stage ops of the library this process loaded); "cuda" runs NCCL, one GPU per rank."""
    world = request.param
    schedule = os.environ.get("NYSTROM_EMU_SCHEDULE", "inorder")
    if device.name == "emu" and schedule != "inorder":
        # The stage ops are ATen calls on both backends (csrc/stages.h): the emulated library runs no emulated
        # kernel for them, so the thread schedule cannot change what the ranks compute. One schedule suffices
        # (scripts/test_emulated.sh runs the suite once per schedule; this spares two spawns of ~75 s).
        pytest.skip(f"the stage ops launch no emulated kernel: run under schedule inorder only (now {schedule})")
    if device.type == "cuda" and torch.cuda.device_count() < world:
        pytest.skip(f"NCCL with {world} ranks needs {world} GPUs; this host has {torch.cuda.device_count()}")
    return world, _spawn(world, device.type)


CASE_NAMES = [c.name for c in worker.cases(2)] + [lc[0] for lc in worker.LAYER_CASES] + ["torch_compile_aot_eager"]
assert CASE_NAMES[:len(worker.cases(3))] == [c.name for c in worker.cases(3)]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_matches_one_process_op(world_results, case):
    world, results = world_results
    for rank, res in enumerate(results):
        r = res[case]
        assert r["ok"], f"world {world}, rank {rank}, case {case}: {r}"


def test_communication_does_not_depend_on_shard_lengths(world_results):
    """Every rank sends the same bytes whatever its shard's length (the shards of a case differ), and two
    cases that differ only in L (same B, H, D, Dv, m) send the same bytes."""
    world, results = world_results
    for case in ("uneven_random_masks", "empty_shard", "float32"):
        sent = {res[case]["bytes"] for res in results}
        assert len(sent) == 1, (case, sent)
    assert results[0]["uneven_random_masks"]["bytes"] - results[0]["empty_shard"]["bytes"] == 0


# ----------------------------------------------------------------------------------------------------------
# In this process: the stage ops on their own (no process group).


def _one_rank_pipeline(q, k, v, m, kpm, qpm, iterations=3, init="per_head", scale=None):
    """The stage ops of one rank holding the whole sequence (every collective is the identity), recording
    each op's arguments."""
    ops = torch.ops.nystrom
    calls = []

    def call(name, *args):
        calls.append((getattr(ops, name).default, args))
        return getattr(ops, name)(*args)

    B = q.size(0)
    lq = (~qpm).sum(1).cpu() if qpm is not None else torch.full((B,), q.size(2))
    lk = (~kpm).sum(1).cpu() if kpm is not None else torch.full((B,), k.size(2))
    z = torch.zeros(B, dtype=torch.long)
    geometry = torch.stack([z, lq.long(), z, lk.long()], 1).contiguous()
    rows = min(m, max(q.size(2), k.size(2)))
    qs, ks, vs = call("nystrom_sp_segment_sums", q, k, v, geometry, m, rows, kpm, qpm)
    ql, pmax, psum, ppv = call("nystrom_sp_landmark_values", qs, k, v, geometry, m, kpm, scale)
    s, pv = call("nystrom_sp_merge_landmark_values", pmax, psum, ppv, pmax)
    kl, bv, zbv, lse_l, c = call("nystrom_sp_pseudoinverse", ql, ks, vs, s, pv, pmax, geometry, m, iterations, init,
                                 scale)
    out, lse_q = call("nystrom_sp_query_forward", q, kl, zbv, geometry, m, qpm, scale)
    g = torch.randn(out.shape, dtype=out.dtype).to(out.device)
    dq, dkl, dw = call("nystrom_sp_query_backward", g, q, kl, zbv, lse_q, geometry, m, qpm, scale)
    dql, kshare, dbv, vshare = call("nystrom_sp_pseudoinverse_backward", dkl, dw, ql, kl, bv, c, geometry, m,
                                    iterations, init, scale)
    dk, dv, dqlk = call("nystrom_sp_key_backward", k, v, ql, bv, lse_l, dbv, kshare, vshare, geometry, m, kpm, scale)
    dq = call("nystrom_sp_query_spread", dq, dqlk, dql, geometry, m, q.dtype, qpm)
    return out, (dq, dk, dv), g, calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_rank_stages_equal_the_op(device, dtype):
    torch.manual_seed(0)
    B, H, L, S, D, Dv, m = 3, 2, 19, 23, 5, 4, 6
    q, k, v = (torch.randn(B, H, n, d, dtype=dtype).to(device.torch) for n, d in ((L, D), (S, D), (S, Dv)))
    kpm = torch.rand(B, S) < 0.3
    qpm = torch.rand(B, L) < 0.3
    kpm[0, 5:] = True  # element 0: exact path (at most m real keys and queries)
    qpm[0, 4:] = True
    kpm, qpm = kpm.to(device.torch), qpm.to(device.torch)
    out, grads, g, _ = _one_rank_pipeline(q, k, v, m, kpm, qpm)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.ops.nystrom.nystrom_attention(qq, kk, vv, m, 3, "per_head", kpm, qpm, None)
    ref.backward(g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip((out,) + grads, (ref, qq.grad, kk.grad, vv.grad)):
        assert (a - b).abs().max() <= tol * b.abs().max()


def test_stage_ops_opcheck(device):
    """Schemas, fake-tensor (Meta) kernels against the real ones, and the dispatcher's checks, per stage op."""
    torch.manual_seed(1)
    B, H, L, S, D, Dv, m = 2, 2, 9, 11, 3, 4, 4
    q, k, v = (torch.randn(B, H, n, d, dtype=torch.float64).to(device.torch) for n, d in ((L, D), (S, D), (S, Dv)))
    kpm = (torch.rand(B, S) < 0.3).to(device.torch)
    for init in ("per_head", "original"):
        _, _, _, calls = _one_rank_pipeline(q, k, v, m, kpm, None, init=init, scale=0.6)
        assert len(calls) == 9
        for op, args in calls:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


def test_stage_ops_on_meta_tensors():
    B, H, L, S, D, Dv, m = 2, 3, 7, 8, 4, 5, 3
    q = torch.empty(B, H, L, D, device="meta")
    k = torch.empty(B, H, S, D, device="meta")
    v = torch.empty(B, H, S, Dv, device="meta")
    geometry = torch.zeros(B, 4, dtype=torch.long, device="meta")
    qs, ks, vs = torch.ops.nystrom.nystrom_sp_segment_sums(q, k, v, geometry, m, m)
    assert qs.shape == (B, H, m, D) and ks.shape == (B, H, m, D) and vs.shape == (B, H, m, Dv)
    out, lse = torch.ops.nystrom.nystrom_sp_query_forward(q, ks, vs, geometry, m)
    assert out.shape == (B, H, L, Dv) and lse.shape == (B, H, L)


def test_errors_name_the_argument():
    q = torch.randn(1, 2, 5, 3)
    k = torch.randn(1, 2, 6, 3)
    v = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool tensor of shape \\(B, 6\\)"):
        tnd.nystrom_attention(q, k, v, 4, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="value must have key's length"):
        tnd.nystrom_attention(q, k, v[:, :, :5], 4)
    with pytest.raises(ValueError, match="pinv_init"):
        tnd.nystrom_attention(q, k, v, 4, pinv_init="paper")
    with pytest.raises(ValueError, match="key must have query's dtype"):
        tnd.nystrom_attention(q, k.double(), v, 4)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
            tnd.nystrom_attention(q, k, v, 4)
    with pytest.raises(RuntimeError, match="geometry must be an int64 tensor"):
        torch.ops.nystrom.nystrom_sp_segment_sums(q, k, v, torch.zeros(1, 3, dtype=torch.long), 4, 4)
