"""Prints the peak memory of one attention call (see measure.py); run by the benchmarks.

    memory_probe.py IMPL B H N D M DTYPE BACKWARD(0|1) PINV_INIT
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import impls  # noqa: E402
import workload  # noqa: E402
from measure import peak_memory_bytes  # noqa: E402


def main():
    impl, B, H, n, D, m, dtype, backward, pinv_init = sys.argv[1:10]
    B, H, n, D, m = map(int, (B, H, n, D, m))
    import torch_nystrom  # noqa: F401

    fn = getattr(impls, impl)
    q, k, v = workload.make_inputs(B, H, n, D, getattr(torch, dtype))
    if backward == "1":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad = torch.randn(B, H, n, D, dtype=q.dtype)

        def call():
            out = fn(q, k, v, m, pinv_init)
            out.backward(grad)
            return [q.grad, k.grad, v.grad]
    else:
        def call():
            with torch.no_grad():
                return fn(q, k, v, m, pinv_init)
    print(peak_memory_bytes(call))


if __name__ == "__main__":
    main()
