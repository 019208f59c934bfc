"""The CPU kernels' two softmax paths agree: vectorised (AVX2/FMA, where the CPU has it) and plain ATen
(what other CPUs and float64 run; forced with NYSTROM_CPU_SIMD=0, read once per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import torch_nystrom
from helpers import rel_err
from reference import nystrom_reference

_SCRIPT = r"""
import sys, torch, torch_nystrom
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(3, 2, n, 24, generator=g).requires_grad_() for n in (301, 277, 277))
kpm = torch.zeros(3, 277, dtype=torch.bool); kpm[1, 40:90] = True; kpm[2, 5:] = True
qpm = torch.zeros(3, 301, dtype=torch.bool); qpm[0, 290:] = True
out = torch_nystrom.nystrom_attention(q, k, v, 19, key_padding_mask=kpm, query_padding_mask=qpm)
out.backward(torch.randn(out.shape, generator=g))
torch.save([out.detach(), q.grad, k.grad, v.grad], sys.argv[1])
"""


def test_vectorised_and_aten_softmax_paths_agree(tmp_path):
    results = []
    for flag in ("1", "0"):
        path = tmp_path / f"r{flag}.pt"
        env = dict(os.environ, NYSTROM_CPU_SIMD=flag, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], check=True, env=env, cwd=str(tmp_path))
        results.append(torch.load(path))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, n, 24, generator=g).double() for n in (301, 277, 277))
    kpm = torch.zeros(3, 277, dtype=torch.bool)
    kpm[1, 40:90] = True
    kpm[2, 5:] = True
    qpm = torch.zeros(3, 301, dtype=torch.bool)
    qpm[0, 290:] = True
    ref = nystrom_reference(q, k, v, 19, key_padding_mask=kpm, query_padding_mask=qpm)
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        assert rel_err(a, b) < 2e-5, (name, rel_err(a, b))
    assert rel_err(results[0][0], ref) < 2e-5
    assert rel_err(results[1][0], ref) < 2e-5
