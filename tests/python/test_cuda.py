"""The ops on a CUDA device, against the float64 reference (tests/python/reference.py) run on the CPU.

Skipped when torch sees no CUDA device. ``NYSTROM_TEST_DEVICE=cpu`` runs every test on the CPU instead,
which checks the test logic itself on a machine without a GPU (device-only parts, such as peak CUDA memory
or a second CUDA stream, fall back to their CPU meaning or are skipped where they have none).
``NYSTROM_TEST_DEVICE=cuda`` makes a missing CUDA device an error instead of a skip (scripts/gpu_check.sh
sets it, so that a host whose torch cannot see the GPU does not pass silently).

What the suite covers on the device: odd sizes (B, H, L, S, D, Dv; D from 1 to 256) and landmark counts on
both sides of the CUDA Newton–Schulz paths (fused shared-memory kernel for m <= 64, or m <= 128 in float32;
cuBLAS batched otherwise: m = 17, 64, 100, 128, 129, 200, 256, 300), the tensor-core forward of half inputs
(head dims 64 / 128, m <= 64), exact attention when m covers the lengths, masks (trailing, middle, random,
on keys and queries), cross-attention, uneven segments, both ``pinv_init``, padding invariance, gradients
(gradcheck in float64, and against the reference's autograd), ``torch.library.opcheck``, float16 / bfloat16
against the same algorithm written in plain PyTorch at that precision, agreement with the CPU backend,
strides, streams, bad inputs, the nn layer, autocast, torch.compile, and one long sequence (n = 65536) with
its peak device memory.

The references run on the CPU from the very same input values (inputs are drawn on the CPU, rounded to the
test dtype there, then copied to the device).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from helpers import assert_rel_close, make_qkv, middle_mask, random_mask, rel_err, trailing_mask
from reference import masked_dense_reference, nystrom_reference

_REQUESTED = os.environ.get("NYSTROM_TEST_DEVICE", "").strip().lower()
FORCE_CPU = _REQUESTED == "cpu"
DEVICE = torch.device("cpu" if FORCE_CPU else "cuda")
ON_CUDA = DEVICE.type == "cuda"

pytestmark = [pytest.mark.skipif(
    ON_CUDA and _REQUESTED != "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device (NYSTROM_TEST_DEVICE=cpu runs this suite on the CPU)",
)]
if not ON_CUDA:
    # Small problems on a possibly busy machine: one intra-op thread is fastest (see conftest.py).
    pytestmark.append(pytest.mark.usefixtures("one_intra_op_thread"))

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

FLOAT_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}  # float64: Newton–Schulz amplifies rounding on large m
GRAD_TOL = {torch.float64: 1e-7, torch.float32: 2e-4}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _mask(kind, B, n, seed):
    """A (B, n) padding mask on the CPU from ("trailing", real_lengths) | ("middle", holes) | ("random", p)."""
    if kind is None:
        return None
    name, arg = kind
    if name == "trailing":
        return trailing_mask(B, n, arg)
    if name == "middle":
        return middle_mask(B, n, arg)
    if name == "random":
        return random_mask(B, n, arg, torch.Generator().manual_seed(seed))  # keeps token 0 of each row
    raise ValueError(name)


@dataclass
class Spec:
    id: str
    B: int
    H: int
    L: int
    S: int
    D: int
    Dv: int
    m: int
    key_mask: Optional[tuple] = None
    query_mask: Optional[tuple] = None
    std: float = 1.0
    extra: dict = field(default_factory=dict)

    def build(self, dtype, requires_grad=False, seed=0):
        """q, k, v and the keyword arguments (masks included), on DEVICE."""
        q, k, v = make_qkv(self.B, self.H, self.L, self.S, self.D, self.Dv, dtype=dtype, std=self.std, seed=seed)
        kw = {"num_landmarks": self.m, **self.extra}
        kpm = _mask(self.key_mask, self.B, self.S, seed + 1)
        qpm = _mask(self.query_mask, self.B, self.L, seed + 2)
        if kpm is not None:
            kw["key_padding_mask"] = kpm
        if qpm is not None:
            kw["query_padding_mask"] = qpm
        q, k, v = (t.to(DEVICE).requires_grad_(requires_grad) for t in (q, k, v))
        return q, k, v, on_device(kw)


def on_device(kw, device=DEVICE):
    return {n: (x.to(device) if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}


def on_cpu(kw):
    return on_device(kw, torch.device("cpu"))


def reference(q, k, v, kw, grad_out=None, compute_dtype=torch.float64):
    """The reference on the CPU at the values of (device) tensors q, k, v; with grad_out also its gradients
    with respect to q, k, v. Returns (out, grads or None), on the CPU, in compute_dtype."""
    leaves = [t.detach().cpu().to(compute_dtype).requires_grad_(grad_out is not None) for t in (q, k, v)]
    out = nystrom_reference(*leaves, compute_dtype=compute_dtype, **on_cpu(kw))
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, leaves, grad_out.detach().cpu().to(compute_dtype))
    return out.detach(), grads


def cotangent(shape, dtype, seed=0):
    """A random output gradient, drawn on the CPU (reproducible whatever the device), on DEVICE."""
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    return g.to(dtype).to(DEVICE)


def float32_tolerance(base, ref32, ref64):
    """Tolerance of a float32 result: the larger of `base` and 20x the error of the same math done in float32
    (the reference with compute_dtype=float32), which Newton–Schulz amplifies on large, ill-conditioned A."""
    return max(base, 20 * rel_err(ref32, ref64))


def check_padded_rows_zero(out, kw):
    qpm = kw.get("query_padding_mask")
    if qpm is not None:
        rows = out.detach()[qpm[:, None, :, None].expand_as(out)]
        assert torch.count_nonzero(rows) == 0, "rows of padded queries must be exactly 0"


def ops_args(q, k, v, kw):
    """The 9 positional arguments of torch.ops.nystrom.nystrom_attention(_forward)."""
    return (q, k, v, kw.get("num_landmarks", 64), kw.get("pinv_iterations", 6), kw.get("pinv_init", "per_head"),
            kw.get("key_padding_mask"), kw.get("query_padding_mask"), kw.get("scale"))


SAVED_NAMES = ("out", "q_landmarks", "k_landmarks", "bv", "zbv", "lse_query", "lse_landmark", "pinv_scale")
ARG_NAMES = ("query", "key", "value", "num_landmarks", "pinv_iterations", "pinv_init",
             "key_padding_mask", "query_padding_mask", "scale")


def backward_args(grad_out, args, saved):
    """Arguments of nystrom_attention_backward, matched to its schema by name."""
    values = {"grad_out": grad_out, **dict(zip(ARG_NAMES, args)), **dict(zip(SAVED_NAMES, saved))}
    schema = torch.ops.nystrom.nystrom_attention_backward.default._schema
    return tuple(values[a.name] for a in schema.arguments)


def synchronize():
    if ON_CUDA:
        torch.cuda.synchronize()


# Landmark counts straddle the CUDA Newton–Schulz paths: fused shared-memory kernel (m <= 64 any dtype,
# m <= 128 float32), cuBLAS batched (float64 / half above 64, everything above 128). The lengths exceed m so
# that the Nyström path really uses m landmarks (on at least one batch element), segments are uneven.
SPECS = [
    Spec("d1_m17_key_trailing", B=2, H=3, L=37, S=53, D=1, Dv=3, m=17, key_mask=("trailing", [53, 30])),
    Spec("d7_m17_random_masks", B=3, H=2, L=61, S=45, D=7, Dv=5, m=17,
         key_mask=("random", 0.3), query_mask=("random", 0.3)),
    Spec("d64_m64_cross", B=2, H=3, L=150, S=201, D=64, Dv=33, m=64,
         key_mask=("trailing", [201, 120]), query_mask=("trailing", [90, 150])),
    Spec("d64_m100_nonsquare_A", B=2, H=2, L=150, S=90, D=64, Dv=64, m=100, key_mask=("trailing", [90, 70])),
    Spec("d96_m100_middle_original", B=2, H=2, L=233, S=177, D=96, Dv=95, m=100,
         key_mask=("middle", [(10, 40), (0, 3)]), query_mask=("middle", [(200, 233), (50, 51)]),
         extra={"pinv_init": "original"}),
    Spec("d128_m128_random_key", B=1, H=3, L=257, S=300, D=128, Dv=127, m=128, key_mask=("random", 0.2)),
    Spec("d200_m129_query_original", B=2, H=1, L=300, S=280, D=200, Dv=77, m=129,
         query_mask=("random", 0.25), extra={"pinv_init": "original"}),
    Spec("d256_m200", B=1, H=2, L=411, S=390, D=256, Dv=256, m=200),
    Spec("d256_m256_masks", B=2, H=1, L=301, S=517, D=256, Dv=129, m=256,
         key_mask=("trailing", [517, 400]), query_mask=("middle", [(0, 5), (290, 301)])),
    Spec("m300_beyond_256", B=1, H=2, L=700, S=650, D=32, Dv=16, m=300, key_mask=("random", 0.1)),
    Spec("m1", B=2, H=2, L=40, S=33, D=5, Dv=3, m=1, key_mask=("trailing", [33, 12])),
    # element 0: 5 real queries, 7 real keys -> exact; element 1: L_b = m < S_b; element 2: S_b < m < L_b
    Spec("mixed_exact_and_nystrom", B=3, H=2, L=29, S=29, D=19, Dv=11, m=7,
         key_mask=("trailing", [7, 20, 3]), query_mask=("trailing", [5, 7, 29])),
    # Several thousand rows, padding straddling power-of-two boundaries, a sharp softmax: tiling and
    # online-softmax merging across many blocks.
    Spec("long_tiles", B=2, H=2, L=2500, S=3100, D=64, Dv=48, m=64, std=2.0,
         key_mask=("middle", [(1000, 1300), (3000, 3100)]), query_mask=("middle", [(0, 0), (1023, 1100)])),
    Spec("custom_scale_sharp", B=2, H=2, L=97, S=97, D=24, Dv=24, m=33, std=2.0,
         key_mask=("trailing", [97, 60]), query_mask=("trailing", [97, 60]), extra={"scale": 0.3}),
    # Head dims 64 / 128 with m <= 64: in float16 / bfloat16 the forward products take the tensor cores.
    Spec("tc_d64_m64", B=2, H=2, L=300, S=270, D=64, Dv=64, m=64,
         key_mask=("random", 0.2), query_mask=("middle", [(40, 90), (0, 0)])),
    Spec("tc_d128_m17_cross", B=1, H=3, L=257, S=411, D=128, Dv=128, m=17, key_mask=("trailing", [350])),
]
SPEC = {s.id: s for s in SPECS}


# ---------------------------------------------------------------------------------------------
# Forward against the float64 reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_matches_reference(spec, dtype):
    q, k, v, kw = spec.build(dtype)
    before = [t.clone() for t in (q, k, v)]
    out = nystrom_attention(q, k, v, **kw)
    assert out.device.type == DEVICE.type and out.dtype == dtype
    assert out.shape == (spec.B, spec.H, spec.L, spec.Dv)
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0), "inputs must not be modified"
    ref, _ = reference(q, k, v, kw)
    tol = TOL[dtype]
    if dtype == torch.float32:
        tol = float32_tolerance(tol, reference(q, k, v, kw, compute_dtype=torch.float32)[0], ref)
    assert_rel_close(out.cpu(), ref, tol)
    check_padded_rows_zero(out, kw)


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
@pytest.mark.parametrize("iterations", [0, 1, 13])
@pytest.mark.parametrize("spec_id", ["d7_m17_random_masks", "d200_m129_query_original"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
def test_pinv_iterations_and_init(dtype, spec_id, iterations, pinv_init):
    q, k, v, kw = SPEC[spec_id].build(dtype)
    kw.update(pinv_iterations=iterations, pinv_init=pinv_init)
    out = nystrom_attention(q, k, v, **kw)
    ref, _ = reference(q, k, v, kw)
    tol = TOL[dtype]
    if dtype == torch.float32:
        tol = float32_tolerance(tol, reference(q, k, v, kw, compute_dtype=torch.float32)[0], ref)
    assert_rel_close(out.cpu(), ref, tol)


def test_pinv_init_changes_the_result():
    # Negative control: the two inits really differ on this batch.
    q, k, v, kw = SPEC["d96_m100_middle_original"].build(torch.float64)
    kw.pop("pinv_init")
    a = nystrom_attention(q, k, v, **kw, pinv_init="original")
    b = nystrom_attention(q, k, v, **kw, pinv_init="per_head")
    assert rel_err(a, b) > 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
@pytest.mark.parametrize(
    "B,H,L,S,D,Dv,m,key_real,query_real",
    [
        (2, 3, 16, 16, 8, 8, 16, None, None),
        (2, 3, 11, 17, 5, 7, 17, None, None),
        (2, 2, 30, 30, 6, 5, 12, [12, 9], [12, 4]),  # masks bring every element down to <= m
        (1, 2, 100, 120, 256, 255, 128, None, None),  # largest head dims
        (2, 1, 530, 610, 4, 3, 610, [610, 515], [530, 520]),  # long exact rows
    ],
    ids=["m_equals_n", "cross_m_equals_S", "masked_down_to_m", "d256", "long"],
)
def test_exact_when_m_covers_lengths(B, H, L, S, D, Dv, m, key_real, query_real, dtype):
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype)
    kpm = trailing_mask(B, S, key_real) if key_real else None
    qpm = trailing_mask(B, L, query_real) if query_real else None
    expected = masked_dense_reference(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
    qd, kd, vd = (t.to(DEVICE) for t in (q, k, v))
    kw = on_device(dict(key_padding_mask=kpm, query_padding_mask=qpm))
    for init in ("per_head", "original"):
        out = nystrom_attention(qd, kd, vd, m, pinv_init=init, **kw)
        assert_rel_close(out.cpu(), expected, TOL[dtype] if dtype == torch.float32 else 1e-10)
    if kpm is None and qpm is None:
        sdpa = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd)
        assert_rel_close(out, sdpa, TOL[dtype])


def test_not_exact_when_m_is_small():
    # Negative control for the test above.
    q, k, v = (t.to(DEVICE) for t in make_qkv(2, 3, 16, 16, 8, 8))
    out = nystrom_attention(q, k, v, 15)
    assert rel_err(out, torch.nn.functional.scaled_dot_product_attention(q, k, v)) > 1e-6


@pytest.mark.parametrize("m", [17, 129])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
def test_padding_is_invisible(dtype, m):
    """per_head: each element's output at real tokens equals the call on its real tokens alone."""
    B, H, L, S, D, Dv = 3, 2, 301, 333, 40, 23
    q, k, v = (t.to(DEVICE) for t in make_qkv(B, H, L, S, D, Dv, dtype=dtype))
    kpm = torch.stack([trailing_mask(1, S, [290])[0], middle_mask(1, S, [(5, 30)])[0],
                       random_mask(1, S, 0.2, torch.Generator().manual_seed(1))[0]]).to(DEVICE)
    qpm = torch.stack([middle_mask(1, L, [(0, 6)])[0], trailing_mask(1, L, [L])[0],
                       random_mask(1, L, 0.2, torch.Generator().manual_seed(2))[0]]).to(DEVICE)
    kw = dict(key_padding_mask=kpm, query_padding_mask=qpm)
    out = nystrom_attention(q, k, v, m, **kw)
    tol = 1e-10
    if dtype == torch.float32:
        ref64, _ = reference(q, k, v, dict(num_landmarks=m, **kw))
        tol = float32_tolerance(1e-5, reference(q, k, v, dict(num_landmarks=m, **kw), compute_dtype=dtype)[0], ref64)
    for b in range(B):
        qi, ki = ~qpm[b], ~kpm[b]
        alone = nystrom_attention(q[b:b + 1][:, :, qi], k[b:b + 1][:, :, ki], v[b:b + 1][:, :, ki], m)
        assert_rel_close(out[b:b + 1][:, :, qi], alone, tol, f"batch element {b}")


def test_per_head_does_not_depend_on_the_rest_of_the_batch():
    q, k, v = make_qkv(3, 2, 150, 170, 19, 23)
    q[2] *= 4  # a very different batch element
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    for m in (17, 100):
        out = nystrom_attention(q, k, v, m)
        # (the device may split the work differently for 2 elements than for 3: rounding only)
        assert_rel_close(out[:2], nystrom_attention(q[:2], k[:2], v[:2], m), 1e-9)
        orig = nystrom_attention(q, k, v, m, pinv_init="original")
        assert rel_err(orig[:2], nystrom_attention(q[:2], k[:2], v[:2], m, pinv_init="original")) > 1e-8


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

GRADCHECK_SPECS = [
    Spec("masks_uneven", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3,
         key_mask=("trailing", [9, 5]), query_mask=("trailing", [7, 5])),
    Spec("masks_uneven_original", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3,
         key_mask=("trailing", [9, 5]), query_mask=("trailing", [7, 5]), extra={"pinv_init": "original"}),
    Spec("cross_short_keys", B=1, H=2, L=9, S=4, D=3, Dv=2, m=3, std=1.5),
    Spec("mixed_exact", B=2, H=1, L=8, S=7, D=3, Dv=3, m=4,
         key_mask=("trailing", [4, 7]), query_mask=("trailing", [3, 8]), extra={"pinv_init": "original"}),
    Spec("middle_padding_scale", B=2, H=1, L=8, S=9, D=2, Dv=3, m=3,
         key_mask=("middle", [(2, 5), (0, 1)]), query_mask=("middle", [(6, 8), (1, 2)]), extra={"scale": 0.7}),
    Spec("one_iteration", B=1, H=2, L=7, S=8, D=3, Dv=2, m=3, extra={"pinv_iterations": 1}),
    # m = 66 > 64: the cuBLAS Newton–Schulz path for float64 (gradcheck's fast mode: one random direction).
    Spec("m66_cublas_path", B=1, H=1, L=70, S=75, D=2, Dv=2, m=66,
         key_mask=("middle", [(10, 12)]), query_mask=("middle", [(60, 61)]), std=0.5),
]


@pytest.mark.parametrize("spec", GRADCHECK_SPECS, ids=lambda s: s.id)
def test_gradcheck(spec):
    q, k, v, kw = spec.build(torch.float64, requires_grad=True)

    def f(q, k, v):
        return nystrom_attention(q, k, v, **kw)

    fast = spec.m > 64
    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast)


GRAD_SPECS = ["d7_m17_random_masks", "d64_m64_cross", "d96_m100_middle_original", "d128_m128_random_key",
              "d256_m256_masks", "mixed_exact_and_nystrom", "long_tiles", "m1"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("spec_id", GRAD_SPECS)
def test_gradients_match_reference(spec_id, dtype):
    q, k, v, kw = SPEC[spec_id].build(dtype, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    _, ref_grads = reference(q, k, v, kw, grad_out=g)
    if dtype == torch.float32:
        _, ref32_grads = reference(q, k, v, kw, grad_out=g, compute_dtype=torch.float32)
    for i, (name, a, e) in enumerate(zip(("dq", "dk", "dv"), grads, ref_grads)):
        assert a.dtype == dtype and a.device.type == DEVICE.type
        tol = GRAD_TOL[dtype]
        if dtype == torch.float32:
            tol = float32_tolerance(tol, ref32_grads[i], e)
        assert_rel_close(a.cpu(), e, tol, name)
    # padded tokens do not influence the output: their gradients are exactly zero
    kpm, qpm = kw.get("key_padding_mask"), kw.get("query_padding_mask")
    if kpm is not None:
        sel = kpm[:, None, :, None]
        assert torch.count_nonzero(grads[1].masked_select(sel)) == 0
        assert torch.count_nonzero(grads[2].masked_select(sel)) == 0
    if qpm is not None:
        assert torch.count_nonzero(grads[0].masked_select(qpm[:, None, :, None])) == 0


def test_backward_op_matches_autograd():
    q, k, v, kw = SPEC["d96_m100_middle_original"].build(torch.float64)
    args = ops_args(q, k, v, kw)
    saved = torch.ops.nystrom.nystrom_attention_forward(*args)
    g = cotangent(saved[0].shape, torch.float64)
    grads = torch.ops.nystrom.nystrom_attention_backward(*backward_args(g, args, saved))
    _, ref_grads = reference(q, k, v, kw, grad_out=g)
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(a.cpu(), e, GRAD_TOL[torch.float64], name)


@pytest.mark.parametrize(
    "wants", [("value",), ("query",), ("key",), ("query", "key", "value")], ids=lambda w: "+".join(w))
def test_only_some_inputs_require_grad(wants):
    q, k, v, kw = SPEC["d64_m100_nonsquare_A"].build(torch.float32)
    inputs = dict(query=q, key=k, value=v)
    for name in wants:
        inputs[name].requires_grad_(True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, torch.float32)
    out.backward(g)
    _, ref_grads = reference(q, k, v, kw, grad_out=g)
    for (name, t), e in zip(inputs.items(), ref_grads):
        if name in wants:
            assert_rel_close(t.grad.cpu(), e, 1e-3, f"gradient of {name}")
        else:
            assert t.grad is None


def test_double_backward_is_refused():
    q, k, v, kw = GRADCHECK_SPECS[0].build(torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"(?i)double backward|second.order|twice|higher.order|not (implemented|supported)"):
        out = nystrom_attention(q, k, v, **kw)
        (dq,) = torch.autograd.grad(out.sum(), (q,), create_graph=True)
        dq.sum().backward()


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck
# ---------------------------------------------------------------------------------------------


def _opcheck_samples(requires_grad):
    """Small calls on both Newton–Schulz paths, all four dtypes, with and without masks."""
    samples = []
    for spec, dtype, extra in [
        (GRADCHECK_SPECS[0], torch.float64, {}),
        (Spec("nomask", B=1, H=2, L=5, S=6, D=3, Dv=2, m=2), torch.float32,
         dict(pinv_init="original", scale=0.5, pinv_iterations=2)),
        (Spec("half_m80", B=2, H=1, L=100, S=90, D=8, Dv=5, m=80, key_mask=("trailing", [90, 85]),
              query_mask=("middle", [(3, 5), (0, 0)])), torch.float16, {}),
        (Spec("bf16_m20", B=1, H=2, L=40, S=30, D=64, Dv=64, m=20, key_mask=("random", 0.2)), torch.bfloat16, {}),
        (Spec("f32_m130", B=1, H=1, L=140, S=150, D=8, Dv=4, m=130), torch.float32, {}),
    ]:
        q, k, v, kw = spec.build(dtype, requires_grad=requires_grad)
        kw.update(extra)
        samples.append(ops_args(q, k, v, kw))
    return samples


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_nystrom_attention(requires_grad):
    for args in _opcheck_samples(requires_grad):
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention.default, args)


def test_opcheck_forward_and_backward_ops():
    for args in _opcheck_samples(False):
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention_forward.default, args)
        saved = torch.ops.nystrom.nystrom_attention_forward(*args)
        g = torch.randn_like(saved[0])
        torch.library.opcheck(torch.ops.nystrom.nystrom_attention_backward.default, backward_args(g, args, saved))


# ---------------------------------------------------------------------------------------------
# float16 / bfloat16
# ---------------------------------------------------------------------------------------------

HALF_SPECS = ["d7_m17_random_masks", "d64_m64_cross", "d96_m100_middle_original", "d128_m128_random_key",
              "d256_m256_masks", "mixed_exact_and_nystrom", "long_tiles", "tc_d64_m64", "tc_d128_m17_cross"]


def _half_bound(comp_err):
    """What the op may lose against the float64 reference: twice the error of the same algorithm written in
    plain PyTorch at the half precision, plus 1e-3 (a composition that breaks down, non-finite, allows 1)."""
    if not math.isfinite(comp_err):
        comp_err = 0.5
    return 2 * comp_err + 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("spec_id", HALF_SPECS)
def test_low_precision(spec_id, dtype):
    """Half inputs, float32 statistics: error against the float64 reference (on the same half inputs) within
    twice that of the plain half-precision composition (tests/python/reference.py at compute_dtype=dtype)."""
    q, k, v, kw = SPEC[spec_id].build(dtype)
    out = nystrom_attention(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert torch.isfinite(out).all()
    ref, _ = reference(q, k, v, kw)
    comp, _ = reference(q, k, v, kw, compute_dtype=dtype)
    err, comp_err = rel_err(out.cpu(), ref), rel_err(comp, ref)
    rounding = rel_err(ref.to(dtype), ref)
    assert err <= _half_bound(comp_err), (
        f"{dtype}: error {err:.3e}, plain composition {comp_err:.3e}, rounding the exact result {rounding:.3e}")
    check_padded_rows_zero(out, kw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("spec_id", ["d7_m17_random_masks", "d64_m64_cross", "d96_m100_middle_original",
                                     "d256_m256_masks", "tc_d64_m64", "tc_d128_m17_cross"])
def test_low_precision_backward(spec_id, dtype):
    q, k, v, kw = SPEC[spec_id].build(dtype, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    _, ref_grads = reference(q, k, v, kw, grad_out=g)
    _, comp_grads = reference(q, k, v, kw, grad_out=g, compute_dtype=dtype)
    for name, a, e, c in zip(("dq", "dk", "dv"), grads, ref_grads, comp_grads):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}: dtype {a.dtype} or non-finite values"
        err, comp_err = rel_err(a.cpu(), e), rel_err(c, e)
        assert err <= _half_bound(comp_err), f"{name}: error {err:.3e}, plain composition {comp_err:.3e}"


# ---------------------------------------------------------------------------------------------
# Device against the CPU backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_id", ["d7_m17_random_masks", "d64_m64_cross", "d96_m100_middle_original",
                                     "d128_m128_random_key", "d256_m200", "long_tiles"])
def test_matches_cpu_backend_float32(spec_id):
    q, k, v, kw = SPEC[spec_id].build(torch.float32, requires_grad=True)
    out = nystrom_attention(q, k, v, **kw)
    g = cotangent(out.shape, torch.float32)
    grads = torch.autograd.grad(out, (q, k, v), g)
    qc, kc, vc = (t.detach().cpu().requires_grad_(True) for t in (q, k, v))
    out_cpu = nystrom_attention(qc, kc, vc, **on_cpu(kw))
    grads_cpu = torch.autograd.grad(out_cpu, (qc, kc, vc), g.cpu())
    # Both run float32 math in different orders: allow twice the float32-vs-float64 error of the reference.
    ref64, ref_grads = reference(q, k, v, kw, grad_out=g)
    ref32, ref32_grads = reference(q, k, v, kw, grad_out=g, compute_dtype=torch.float32)
    assert_rel_close(out.detach().cpu(), out_cpu.detach(), 2 * float32_tolerance(1e-5, ref32, ref64), "output")
    for i, (name, a, c) in enumerate(zip(("dq", "dk", "dv"), grads, grads_cpu)):
        assert_rel_close(a.cpu(), c, 2 * float32_tolerance(1e-4, ref32_grads[i], ref_grads[i]), name)


# ---------------------------------------------------------------------------------------------
# Strides
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [17, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
def test_non_contiguous_fused_qkv(dtype, m):
    B, L, H, D = 2, 237, 3, 64
    qkv = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D) views, no copy
    assert not q.is_contiguous() and q.data_ptr() == qkv.data_ptr()
    mask = trailing_mask(B, L, [L, 190]).to(DEVICE)
    kw = dict(num_landmarks=m, key_padding_mask=mask, query_padding_mask=mask)
    out = nystrom_attention(q, k, v, **kw)
    contiguous = nystrom_attention(q.contiguous(), k.contiguous(), v.contiguous(), **kw)
    assert_rel_close(out, contiguous, 1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:
        ref, _ = reference(q, k, v, kw)
        assert_rel_close(out.cpu(), ref, 1e-4)


def test_non_contiguous_cross_broadcast_and_masks():
    """Transposed storage, stride-0 expand over heads, every other feature, non-contiguous masks; with grads."""
    B, H, L, S, D = 2, 3, 137, 153, 19
    g = torch.Generator().manual_seed(6)
    q = torch.randn(B, L, H, D, dtype=torch.float64, generator=g).to(DEVICE).transpose(1, 2)
    kb = torch.randn(B, 1, S, D, dtype=torch.float64, generator=g).to(DEVICE).requires_grad_(True)
    k = kb.expand(B, H, S, D)
    v = torch.randn(B, S, H, 2 * D, dtype=torch.float64, generator=g).to(DEVICE)[..., ::2].transpose(1, 2)
    q.requires_grad_(True)
    kpm = trailing_mask(B, 2 * S, [2 * S, 161]).to(DEVICE)[:, ::2]
    qpm = torch.zeros(1, L, dtype=torch.bool, device=DEVICE).expand(B, L)
    assert not (kpm.is_contiguous() or q.is_contiguous() or v.is_contiguous())
    kw = dict(num_landmarks=70, key_padding_mask=kpm, query_padding_mask=qpm)
    out = nystrom_attention(q, k, v, **kw)
    ref, _ = reference(q, k, v, kw)
    assert_rel_close(out.detach().cpu(), ref, TOL[torch.float64])
    gout = cotangent(out.shape, torch.float64)
    dq, dkb = torch.autograd.grad(out, (q, kb), gout)
    q64, kb64 = (t.detach().cpu().requires_grad_(True) for t in (q, kb))
    ref = nystrom_reference(q64, kb64.expand(B, H, S, D), v.cpu(), **on_cpu(kw))
    eq, ekb = torch.autograd.grad(ref, (q64, kb64), gout.cpu())
    assert_rel_close(dq.cpu(), eq, GRAD_TOL[torch.float64], "dq")
    assert_rel_close(dkb.cpu(), ekb, GRAD_TOL[torch.float64], "dk (summed over the expanded heads)")


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


def _stream_work(seed, m):
    q, k, v, kw = Spec("stream", B=2, H=4, L=1000, S=1200, D=64, Dv=64, m=m,
                       key_mask=("middle", [(100, 300), (0, 0)])).build(torch.float32, seed=seed)
    return q, k, v, kw


def _fwd_bwd(q, k, v, kw, g):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = nystrom_attention(*leaves, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, g))


def _assert_same(a, b, what):
    # The same call on another stream must give the same numbers (a tolerance of float32 rounding only, in
    # case a kernel accumulates with atomics).
    for name, x, y in zip(("output", "dq", "dk", "dv"), a, b):
        assert_rel_close(x, y, 1e-6, f"{what}: {name}")


@pytest.mark.parametrize("m", [64, 129])
def test_non_default_stream(m):
    """The op runs on the current stream: inputs made on a side stream right before the call (behind a busy
    wait, so that work issued on another stream would read them too early) give the default-stream results."""
    q, k, v, kw = _stream_work(0, m)
    g = cotangent((2, 4, 1000, 64), torch.float32)
    expected = _fwd_bwd(q, k, v, kw, g)
    if not ON_CUDA:
        _assert_same(expected, _fwd_bwd(q, k, v, kw, g), "CPU, repeated")
        return
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if hasattr(torch.cuda, "_sleep"):
            torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time on this stream
        q2, k2, v2, g2 = (t * 1 for t in (q, k, v, g))  # produced on the side stream
        got = _fwd_bwd(q2, k2, v2, kw, g2)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_same(expected, got, "side stream")


def test_concurrent_streams():
    """Several problems in flight on different streams at once equal the same problems run one by one."""
    works = [_stream_work(seed, m) for seed, m in ((1, 17), (2, 64), (3, 100), (4, 200))]
    grads = [cotangent((2, 4, 1000, 64), torch.float32, seed) for seed in range(len(works))]
    expected = [_fwd_bwd(*w, g) for w, g in zip(works, grads)]
    synchronize()
    streams = [torch.cuda.Stream() if ON_CUDA else None for _ in works]
    results = []
    for s, w, g in zip(streams, works, grads):
        if ON_CUDA:
            s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s) if ON_CUDA else contextlib.nullcontext():
            results.append(_fwd_bwd(*w, g))
    for s in streams:
        if ON_CUDA:
            torch.cuda.current_stream().wait_stream(s)
    synchronize()
    for i, (a, b) in enumerate(zip(expected, results)):
        _assert_same(a, b, f"stream {i}")


# ---------------------------------------------------------------------------------------------
# Bad inputs on the device
# ---------------------------------------------------------------------------------------------

OTHER_DEVICE = "cpu" if ON_CUDA else "meta"  # on the CPU variant the odd tensor is on meta


def _good():
    q, k, v = make_qkv(2, 3, 7, 9, 4, 5, dtype=torch.float32, seed=1)
    return dict(query=q.to(DEVICE), key=k.to(DEVICE), value=v.to(DEVICE), num_landmarks=3, pinv_iterations=6,
                pinv_init="per_head", key_padding_mask=torch.zeros(2, 9, dtype=torch.bool, device=DEVICE),
                query_padding_mask=torch.zeros(2, 7, dtype=torch.bool, device=DEVICE), scale=None)


def _elsewhere(t):
    return t.to(OTHER_DEVICE) if OTHER_DEVICE != "meta" else torch.zeros(t.shape, dtype=t.dtype, device="meta")


def _call_op(a):
    return nystrom_attention(a["query"], a["key"], a["value"], a["num_landmarks"],
                             pinv_iterations=a["pinv_iterations"], pinv_init=a["pinv_init"],
                             key_padding_mask=a["key_padding_mask"], query_padding_mask=a["query_padding_mask"],
                             scale=a["scale"])


DEVICE_WORDS = [r"\b(cuda|cpu)(:\d+)?\b.*\b(cuda|cpu)(:\d+)?\b"] if ON_CUDA else []


@pytest.mark.parametrize(
    "name,words",
    [
        ("key", [r"\bkey\b", r"same device as query"] + DEVICE_WORDS),
        ("value", [r"\bvalue\b", r"same device as query"] + DEVICE_WORDS),
        ("query", [r"\bkey\b", r"same device as query"] + DEVICE_WORDS),  # the others are then the odd ones
        ("key_padding_mask", [r"key_padding_mask", r"same device as query"]),
        ("query_padding_mask", [r"query_padding_mask", r"same device as query"]),
    ],
)
def test_tensor_on_another_device(name, words):
    a = _good()
    a[name] = _elsewhere(a[name])
    with pytest.raises(RuntimeError) as info:
        _call_op(a)
    msg = str(info.value)
    missing = [w for w in words if not re.search(w, msg)]
    assert not missing, f"message {msg!r} lacks {missing}"


def test_good_arguments_of_device_error_tests_are_accepted():
    out = _call_op(_good())
    assert out.shape == (2, 3, 7, 5) and out.device.type == DEVICE.type


@pytest.mark.skipif(not ON_CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensor_on_another_cuda_device():
    a = _good()
    a["key"] = a["key"].to("cuda:1")
    with pytest.raises(RuntimeError, match=r"\bkey\b.*same device as query"):
        _call_op(a)


def test_all_keys_masked_on_device():
    a = _good()
    a["key_padding_mask"][1] = True
    with pytest.raises(RuntimeError, match=r"key_padding_mask.*every key|every key.*key_padding_mask"):
        _call_op(a)


def test_all_keys_masked_is_fine_when_the_element_has_no_query():
    a = _good()
    a["key_padding_mask"][1] = True
    a["query_padding_mask"][1] = True
    out = _call_op(a)
    assert torch.count_nonzero(out[1]) == 0
    ref = nystrom_reference(a["query"][:1].cpu(), a["key"][:1].cpu(), a["value"][:1].cpu(), 3)
    assert_rel_close(out[:1].cpu(), ref, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("B,L,masks", [(0, 5, False), (0, 5, True), (2, 0, False), (2, 0, True)],
                         ids=["B0", "B0_masks", "L0", "L0_masks"])
def test_empty(B, L, masks, dtype):
    H, S, D, Dv = 2, 6, 3, 4
    q, k, v = (t.to(DEVICE).requires_grad_(True) for t in make_qkv(B, H, L, S, D, Dv, dtype=dtype))
    kw = {}
    if masks:
        kw = dict(key_padding_mask=torch.zeros(B, S, dtype=torch.bool, device=DEVICE),
                  query_padding_mask=torch.zeros(B, L, dtype=torch.bool, device=DEVICE))
    out = nystrom_attention(q, k, v, 2, **kw)
    assert out.shape == (B, H, L, Dv) and out.dtype == dtype and out.device.type == DEVICE.type
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    assert torch.count_nonzero(k.grad) == 0 and torch.count_nonzero(v.grad) == 0


def test_every_query_masked():
    q, k, v = (t.to(DEVICE).requires_grad_(True) for t in make_qkv(2, 2, 70, 80, 3, 4))
    qpm = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    out = nystrom_attention(q, k, v, 20, query_padding_mask=qpm)
    assert torch.count_nonzero(out) == 0
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.count_nonzero(t.grad) == 0


def _poison(x, mask, values):
    """x (on the CPU) with the rows of padded positions (mask (B, n), True = padding) set to values (cycled)."""
    y = x.clone()
    for i, (b, r) in enumerate(mask.nonzero().tolist()):
        y[b, :, r] = values[i % len(values)]
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("m,pinv_init", [(4, "per_head"), (4, "original"), (70, "per_head"), (128, "per_head")],
                         ids=["nystrom", "nystrom_original", "nystrom_m70", "exact"])
def test_non_finite_values_in_padding_do_not_leak(m, pinv_init, dtype):
    """NaN and Inf at padded positions reach neither the outputs nor the gradients of real tokens."""
    B, H, L, S, D, Dv = 2, 2, 97, 111, 5, 3
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype, seed=10)
    kpm = middle_mask(B, S, [(3, 9), (90, 111)])
    qpm = middle_mask(B, L, [(0, 2), (17, 25)])
    bad = [math.nan, math.inf, -math.inf]
    dirty = [_poison(t, msk, bad).to(DEVICE).requires_grad_(True) for t, msk in ((q, qpm), (k, kpm), (v, kpm))]
    clean = [t.to(DEVICE).requires_grad_(True) for t in (q, k, v)]
    kw = on_device(dict(num_landmarks=m, pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm))
    g = cotangent((B, H, L, Dv), dtype)
    out_dirty = nystrom_attention(*dirty, **kw)
    out_clean = nystrom_attention(*clean, **kw)
    # Same values in the real positions: equal up to the rounding of kernels that accumulate with atomics.
    same = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.isfinite(out_dirty).all()
    assert_rel_close(out_dirty, out_clean, same, "output changed by values in the padding")
    out_dirty.backward(g)
    out_clean.backward(g)
    for name, d, c, mask in (("query", dirty[0], clean[0], qpm), ("key", dirty[1], clean[1], kpm),
                             ("value", dirty[2], clean[2], kpm)):
        padded = mask.to(DEVICE)[:, None, :, None].expand_as(d.grad)
        assert torch.isfinite(d.grad).all(), f"non-finite gradient of {name}"
        assert torch.count_nonzero(d.grad[padded]) == 0, f"gradient of {name} at padded positions must be 0"
        assert_rel_close(d.grad, c.grad, same, f"gradient of {name} changed by values in the padding")


def test_large_magnitude_inputs_stay_finite():
    """Logits of ~1e4 (sharp softmax) must not overflow: the softmax statistics are shifted."""
    q, k, v = make_qkv(2, 2, 150, 170, 8, 3, std=40.0, seed=11)
    for m in (5, 100):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            args = [t.to(dtype).to(DEVICE).requires_grad_(True) for t in (q, k, v)]
            out = nystrom_attention(*args, m)
            assert torch.isfinite(out).all(), f"m={m} {dtype}: non-finite output"
            out.backward(torch.ones_like(out))
            assert all(torch.isfinite(t.grad).all() for t in args), f"m={m} {dtype}: non-finite gradient"


# ---------------------------------------------------------------------------------------------
# The nn layer, autocast, torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", [None, 5])
def test_module_forward_backward_matches_cpu(conv):
    torch.manual_seed(1234)
    cpu_layer = torch_nystrom.NystromAttention(96, 4, 17, pinv_init="original", conv_kernel_size=conv)
    dev_layer = torch_nystrom.NystromAttention(96, 4, 17, pinv_init="original", conv_kernel_size=conv).to(DEVICE)
    dev_layer.load_state_dict(cpu_layer.state_dict())
    x = torch.randn(3, 203, 96, generator=torch.Generator().manual_seed(2))
    mask = trailing_mask(3, 203, [203, 150, 70])
    results = []
    for layer, dev in ((cpu_layer, "cpu"), (dev_layer, DEVICE)):
        xi = x.to(dev).requires_grad_(True)
        y = layer(xi, key_padding_mask=mask.to(dev))
        w = torch.linspace(-1, 1, y.numel(), device=dev).view_as(y)
        (y * w).sum().backward()
        results.append((y.detach().cpu(), xi.grad.cpu(), {n: p.grad.cpu() for n, p in layer.named_parameters()}))
    (y_c, dx_c, g_c), (y_d, dx_d, g_d) = results
    assert_rel_close(y_d, y_c, 1e-4, "output")
    assert_rel_close(dx_d, dx_c, 1e-4, "input gradient")
    for name in g_c:
        # k_proj.bias' gradient is zero up to rounding (it shifts whole softmax rows): compare to the largest
        scale = max(g.abs().max().item() for g in g_c.values())
        err = (g_d[name] - g_c[name]).abs().max().item() / scale
        assert err <= 1e-4, f"gradient of {name}: {err:.3e}"


def test_scripted_module_on_device():
    layer = torch_nystrom.NystromAttention(32, 2, 9, conv_kernel_size=3).to(DEVICE).eval()
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 77, 32, device=DEVICE)
    torch.testing.assert_close(scripted(x), layer(x))


AUTOCAST_TYPE = DEVICE.type


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=FLOAT_IDS.get)
@pytest.mark.parametrize("m", [17, 100])
def test_autocast(dtype, m):
    q, k, v = (t.to(DEVICE).requires_grad_(True) for t in make_qkv(2, 3, 145, 130, 64, 64, dtype=torch.float32))
    pad = trailing_mask(2, 145, [145, 100]).to(DEVICE)
    kpad = pad[:, :130]
    with torch.autocast(AUTOCAST_TYPE, dtype=dtype):
        out = nystrom_attention(q, k, v, m, key_padding_mask=kpad, query_padding_mask=pad)
    assert out.dtype == dtype
    # autocast only changes the input dtype (a tolerance of one ulp of the largest entry, for atomics)
    manual = nystrom_attention(q.to(dtype), k.to(dtype), v.to(dtype), m, key_padding_mask=kpad,
                               query_padding_mask=pad)
    assert_rel_close(out, manual, torch.finfo(dtype).eps)
    out.float().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    # the forward op of half inputs: output in that dtype, softmax statistics in float32
    res = torch.ops.nystrom.nystrom_attention_forward(q.detach().to(dtype), k.detach().to(dtype),
                                                      v.detach().to(dtype), m, 6, "per_head", kpad, pad, None)
    assert res[0].dtype == dtype
    assert res[5].dtype == torch.float32 and res[6].dtype == torch.float32, (res[5].dtype, res[6].dtype)


def test_autocast_leaves_float64_alone():
    q = torch.randn(1, 1, 90, 4, dtype=torch.float64, device=DEVICE)
    with torch.autocast(AUTOCAST_TYPE, dtype=torch.bfloat16):
        out = nystrom_attention(q, q, q, 70)
    assert out.dtype == torch.float64


def _compile_backends():
    backends = ["aot_eager"]
    if ON_CUDA:
        try:
            from torch.utils._triton import has_triton

            if has_triton():
                backends.append("inductor")
        except ImportError:
            pass
    return backends


@pytest.mark.parametrize("backend", _compile_backends())
def test_torch_compile_fullgraph(backend):
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            pytest.skip("torch.compile is not supported here")
    except ImportError:
        pytest.skip("torch.compile is not available")
    torch._dynamo.reset()
    q, k, v, kw = SPEC["d64_m64_cross"].build(torch.float32, requires_grad=True)
    kpm, qpm = kw["key_padding_mask"], kw["query_padding_mask"]

    def f(q, k, v, kpm, qpm):
        return nystrom_attention(q * 0.5, k, v, 64, key_padding_mask=kpm, query_padding_mask=qpm).relu()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    g = cotangent((2, 3, 150, 33), torch.float32)
    try:
        out = compiled(q, k, v, kpm, qpm)
        got = torch.autograd.grad(out, (q, k, v), g)
    finally:
        torch._dynamo.reset()
    expected_out = f(q, k, v, kpm, qpm)
    expected = torch.autograd.grad(expected_out, (q, k, v), g)
    assert_rel_close(out, expected_out, 1e-5, "output")
    for name, a, e in zip(("dq", "dk", "dv"), got, expected):
        assert_rel_close(a, e, 1e-5, name)


# ---------------------------------------------------------------------------------------------
# One long sequence
# ---------------------------------------------------------------------------------------------

LONG_N, LONG_D, LONG_M = 65536, 64, 64


def _long_inputs():
    g = torch.Generator().manual_seed(21)
    q = torch.randn(1, 1, LONG_N, LONG_D, generator=g)
    k = torch.randn(1, 1, LONG_N, LONG_D, generator=g)
    v = torch.randn(1, 1, LONG_N, LONG_D, generator=g)
    return q, k, v


def _peak_extra(fn, keep_bytes):
    """(result, bytes): fn()'s result and the peak device memory of the call beyond what was allocated before
    it and beyond keep_bytes(result). Call it after a warm-up call, so that one-off workspaces (cuBLAS's) are
    not counted."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return result, peak - before - keep_bytes(result)


def test_long_sequence():
    """One head, n = 65536, D = 64, m = 64 (float32): output and gradients finite and close to the float64
    reference; the device memory the forward adds beyond its inputs and output stays below one n x m float32
    matrix (16 MiB here; a composition keeps several: F, Bm and their exponentials), and that of
    forward+backward beyond inputs, output and gradients below two."""
    qc, kc, vc = _long_inputs()
    q, k, v = (t.to(DEVICE) for t in (qc, kc, vc))
    nm_bytes = LONG_N * LONG_M * 4
    if ON_CUDA:  # peak device memory (on the CPU variant: no such measure, only the numbers below)
        with torch.no_grad():
            nystrom_attention(q, k, v, LONG_M)  # warm-up (its result is dropped at once)
            _, extra = _peak_extra(lambda: nystrom_attention(q, k, v, LONG_M), lambda o: o.numel() * o.element_size())
            assert extra < nm_bytes, (
                f"forward adds {extra / 2**20:.2f} MiB beyond inputs and output (limit {nm_bytes / 2**20:.1f} MiB)")

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    gout = cotangent((1, 1, LONG_N, LONG_D), torch.float32)

    def fwd_bwd():
        o = nystrom_attention(*leaves, LONG_M)
        o.backward(gout)
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        return [o.detach(), *grads]

    if ON_CUDA:
        fwd_bwd()  # warm-up
        res, extra = _peak_extra(fwd_bwd, lambda r: sum(t.numel() * t.element_size() for t in r))
        assert extra < 2 * nm_bytes, (
            f"forward+backward adds {extra / 2**20:.2f} MiB beyond inputs, output and gradients "
            f"(limit {2 * nm_bytes / 2**20:.1f} MiB)")
    else:
        res = fwd_bwd()
    out, grads = res[0], res[1:]
    assert out.shape == (1, 1, LONG_N, LONG_D)
    # The reference of one head keeps n x m matrices only (about 2 s on the CPU).
    ref, ref_grads = reference(qc, kc, vc, dict(num_landmarks=LONG_M), grad_out=gout)
    assert_rel_close(out.cpu(), ref, TOL[torch.float32], "output of the long sequence")
    for name, a, e in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_rel_close(a.cpu(), e, GRAD_TOL[torch.float32], f"{name} of the long sequence")


# ---------------------------------------------------------------------------------------------
# Property-based: random shapes and masks on the device
# ---------------------------------------------------------------------------------------------

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    hypothesis = None


def _given_random_shapes(f):
    if hypothesis is None:
        return pytest.mark.skip(reason="hypothesis is not installed")(f)
    return hypothesis.settings(max_examples=25, deadline=None, derandomize=True)(hypothesis.given(
        B=st.integers(1, 3), H=st.integers(1, 3), L=st.integers(1, 150), S=st.integers(1, 150),
        D=st.integers(1, 40), Dv=st.integers(1, 40), m=st.sampled_from([1, 3, 17, 64, 65, 100, 129]),
        iterations=st.integers(0, 7), pinv_init=st.sampled_from(["per_head", "original"]),
        masked=st.booleans(), seed=st.integers(0, 2**16),
    )(f))


@_given_random_shapes
def test_random_shapes_match_reference(B, H, L, S, D, Dv, m, iterations, pinv_init, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, L, S, D, Dv, seed=seed)
    kw = dict(num_landmarks=m, pinv_iterations=iterations, pinv_init=pinv_init)
    if masked:
        kw["key_padding_mask"] = random_mask(B, S, 0.4, gen)
        kw["query_padding_mask"] = torch.rand(B, L, generator=gen) < 0.3
    out = nystrom_attention(*(t.to(DEVICE) for t in (q, k, v)), **on_device(kw))
    assert out.shape == (B, H, L, Dv)
    assert_rel_close(out.cpu(), nystrom_reference(q, k, v, **kw), 1e-9)


# ---------------------------------------------------------------------------------------------
# The tensor-core forward of half-precision inputs, against the generic kernels
# ---------------------------------------------------------------------------------------------

_TC_SCRIPT = r"""
import sys, torch, torch_nystrom
g = torch.Generator().manual_seed(7)
q, k, v = (torch.randn(2, 3, n, 64, generator=g).to(torch.float16).cuda() for n in (333, 290, 290))
kpm = torch.zeros(2, 290, dtype=torch.bool); kpm[1, 100:] = True
out = torch_nystrom.nystrom_attention(q, k, v, 64, key_padding_mask=kpm.cuda())
torch.save(out.cpu(), sys.argv[1])
"""


@pytest.mark.skipif(not ON_CUDA, reason="NYSTROM_CUDA_TENSOR_CORES switches a CUDA path")
def test_tensor_core_forward_agrees_with_generic_kernels(tmp_path):
    """The same call with the tensor-core kernels on (default) and off (environment, read once per process)."""
    import subprocess
    import sys

    outs = []
    for flag in ("1", "0"):
        path = tmp_path / f"out_{flag}.pt"
        env = dict(os.environ, NYSTROM_CUDA_TENSOR_CORES=flag)
        subprocess.run([sys.executable, "-c", _TC_SCRIPT, str(path)], check=True, env=env, cwd=str(tmp_path))
        outs.append(torch.load(path).double())
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g).to(torch.float16) for n in (333, 290, 290))
    kpm = torch.zeros(2, 290, dtype=torch.bool)
    kpm[1, 100:] = True
    ref = nystrom_reference(q.double(), k.double(), v.double(), 64, key_padding_mask=kpm)
    tc_err, generic_err = rel_err(outs[0], ref), rel_err(outs[1], ref)
    assert generic_err < 5e-3, generic_err
    assert tc_err < 5e-3, tc_err
    assert rel_err(outs[0], outs[1]) < 5e-3
