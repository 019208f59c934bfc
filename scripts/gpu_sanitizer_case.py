"""A small CUDA workload for compute-sanitizer (memcheck, racecheck): forward + backward of the ops.

    compute-sanitizer --tool memcheck python3 scripts/gpu_sanitizer_case.py [--more]

float32 with key and query padding (trailing and in the middle), uneven landmark segments, cross-attention,
m = 17 and m = 64 (the fused Newton–Schulz kernel), D = 64; one float16 call. --more adds m = 128 in float32
(the fused kernel at its largest shared-memory size) and m = 100 in bfloat16 (the cuBLAS path). Every result
must be finite and close to the CPU backend; exits 1 otherwise. Small on purpose: a sanitizer runs kernels
tens of times slower. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own device
allocation and memcheck sees its bounds (the caching allocator would hide overruns inside its blocks).
"""
import argparse
import sys
import time

import torch

import torch_nystrom

DEVICE = "cuda"


def masks(B, L, S, device):
    """Key padding: trailing on element 0, in the middle on element 1; query padding in the middle of 0."""
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, S - S // 4:] = True
    kpm[1, S // 3:S // 3 + 7] = True
    qpm = torch.zeros(B, L, dtype=torch.bool)
    qpm[0, 5:12] = True
    return kpm.to(device), qpm.to(device)


def run_case(name, B, H, L, S, D, Dv, m, dtype, pinv_init="per_head"):
    g = torch.Generator().manual_seed(L * 1000 + m)
    cpu = [torch.randn(B, H, n, d, generator=g).to(dtype) for n, d in ((L, D), (S, D), (S, Dv))]
    dev = [t.to(DEVICE).requires_grad_(True) for t in cpu]
    kpm, qpm = masks(B, L, S, DEVICE)
    kw = dict(pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm)
    out = torch_nystrom.nystrom_attention(*dev, m, **kw)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(grad.to(DEVICE))
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    results = [out.detach()] + [t.grad for t in dev]
    problems = [f"{what}: non-finite" for what, t in zip(("out", "dq", "dk", "dv"), results)
                if not torch.isfinite(t).all()]

    # The same call on the CPU backend: a kernel that reads memory it never wrote passes memcheck, not this.
    ref = [t.detach().clone().requires_grad_(True) for t in cpu]
    out_cpu = torch_nystrom.nystrom_attention(*ref, m, **{**kw, "key_padding_mask": kpm.cpu(),
                                                          "query_padding_mask": qpm.cpu()})
    out_cpu.backward(grad)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for what, a, e in zip(("out", "dq", "dk", "dv"), results, [out_cpu.detach()] + [t.grad for t in ref]):
        err = (a.cpu().double() - e.double()).abs().max().item() / max(e.double().abs().max().item(), 1e-30)
        if not err <= tol:
            problems.append(f"{what}: relative difference to the CPU backend {err:.2e} > {tol:.0e}")
    print(f"{name}: {'OK' if not problems else 'FAILED ' + '; '.join(problems)}", flush=True)
    return not problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--more", action="store_true", help="also m = 128 float32 and m = 100 bfloat16")
    args = p.parse_args()
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_sanitizer_case.py: torch sees no CUDA device")
    t0 = time.time()
    cases = [
        # name, B, H, L, S, D, Dv, m, dtype
        ("f32_m17_cross_uneven", 2, 2, 150, 133, 64, 48, 17, torch.float32),
        ("f32_m64_uneven_original", 2, 2, 201, 190, 64, 64, 64, torch.float32, "original"),
        ("f16_m64", 2, 2, 160, 170, 64, 64, 64, torch.float16),
    ]
    if args.more:
        cases += [
            ("f32_m128", 2, 1, 300, 290, 64, 64, 128, torch.float32),
            ("bf16_m100_cublas", 2, 1, 230, 250, 64, 32, 100, torch.bfloat16),
        ]
    ok = all([run_case(*c) for c in cases])
    print(f"gpu_sanitizer_case: {'all finite and matching the CPU' if ok else 'FAILED'} "
          f"({len(cases)} cases, {time.time() - t0:.1f} s)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
