"""Prints the peak memory of one attention call beyond its inputs and its results
(the output; for forward+backward also the three gradients), see measure.py.

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
    if impl == "lucidrains":  # build (and cache) the layer outside the measured call
        impls._lucidrains_layer(H, D, m, 6, q.dtype)
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
    # A first call outside the measurement: one-off allocations of the runtime
    # (thread pools, BLAS workspaces) are not the call's.
    warm = call()
    del warm
    for t in (q, k, v):
        t.grad = None
    box = []

    def keep():
        box.append(call())
        return box[-1]

    peak = peak_memory_bytes(keep)
    if peak is None:
        print(None)
        return
    results = box[0] if isinstance(box[0], list) else [box[0]]
    print(max(0, peak - sum(t.numel() * t.element_size() for t in results)))


if __name__ == "__main__":
    main()
