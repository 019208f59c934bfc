#!/usr/bin/env python3
"""Modelled shared-memory bank traffic of the tensor-core kernels, from the emulated CUDA backend (no GPU needed).

    NYSTROM_LIBRARY=build/libnystrom_emulated.so python scripts/emu_bank_traffic.py [--n 200] [--m 64]

Runs one forward+backward per head dim (D = Dv = 64 and 128; bfloat16, B=1, H=2, n queries and keys, m
landmarks) and prints, per kernel, the WMMA shared-memory instructions, the wavefronts they take under the
emulator's model of the fragment accesses (cuda/emu/wmma.h) and the conflict-free count, with their ratio
(torch.ops.nystrom._emulator("banks")). A model, not a measurement: on a GPU, gpu_check.sh's ncu step prints
the real bank-conflict counters. The counts do not depend on the machine or the thread count.
"""
import argparse
import sys

import torch

import torch_nystrom  # noqa: F401  (loads the library NYSTROM_LIBRARY names)


def banks():
    out = {}
    for line in torch.ops.nystrom._emulator("banks").splitlines():
        name, _, values = line.rpartition("=")
        out[name] = tuple(int(x) for x in values.split(","))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--m", type=int, default=64)
    args = p.parse_args()
    if not hasattr(torch.ops.nystrom, "_emulator"):
        sys.exit("emu_bank_traffic: needs the emulated library (NYSTROM_LIBRARY=.../libnystrom_emulated.so)")
    print(f"bfloat16, B=1 H=2 n={args.n} m={args.m}, one forward+backward; WMMA shared-memory traffic (model)")
    print(f"{'D':>4} {'kernel':<58} {'instr':>8} {'wavefronts':>11} {'ideal':>8} {'ratio':>6}")
    for d in (64, 128):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, args.n, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        before = banks()
        torch_nystrom.nystrom_attention(q, k, v, num_landmarks=args.m).sum().backward()
        for name, (instr, waves, ideal) in sorted(banks().items()):
            i0, w0, d0 = before.get(name, (0, 0, 0))
            if instr > i0:
                short = name.split("(")[0].replace("nystrom::cuda::kern::", "")
                print(f"{d:>4} {short:<58} {instr - i0:>8} {waves - w0:>11} {ideal - d0:>8} "
                      f"{(waves - w0) / (ideal - d0):>6.2f}")


if __name__ == "__main__":
    main()
