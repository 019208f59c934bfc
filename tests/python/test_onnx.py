"""ONNX export of the op and the layer (torch_nystrom.onnx), and the plain-PyTorch decomposition.

Each model is exported once, with dynamic sequence lengths, and run in onnxruntime (CPU) at
lengths not seen at export: n < m, n = m, uneven segments, cross-attention, masks that leave a
batch element on the exact path, one fully real, one with no real query. float32 graphs must match
the eager op within 1e-5 relative; a float64 graph matches the float64 reference within 1e-10.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import torch_nystrom
from torch_nystrom.onnx import decomposed_nystrom_attention, decomposed_nystrom_attention_forward

from helpers import assert_rel_close, make_qkv, random_mask
from reference import nystrom_reference

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = [
    pytest.mark.usefixtures("one_intra_op_thread"),
    # the exporter notes that L and S of the masks are the same axes as those of q and k
    pytest.mark.filterwarnings("ignore:# The axis name"),
]

M = 8  # landmarks of the exported models
EXPORT_L, EXPORT_S = 40, 33  # export-time lengths; never used at run time below
RUN_LENGTHS = [(2, 3), (5, 7), (8, 8), (9, 8), (37, 50), (100, 61), (257, 257)]
SAVED = ["out", "q_landmarks", "k_landmarks", "bv", "zbv", "lse_query", "lse_landmark", "pinv_scale"]


def masks(B: int, L: int, S: int, seed: int):
    """Random padding; element 0 fully real, element 1 exact (few real tokens), element 2 without real query."""
    g = torch.Generator().manual_seed(seed)
    kpm, qpm = random_mask(B, S, 0.3, g), random_mask(B, L, 0.3, g)
    kpm[0] = qpm[0] = False
    kpm[1, min(S, M - 2):] = True
    qpm[1, min(L, M - 1):] = True
    qpm[2] = True
    return kpm, qpm


class Op(torch.nn.Module):
    """nystrom_attention on given q, k, v and masks."""

    def __init__(self, pinv_init="per_head", scale=None):
        super().__init__()
        self.pinv_init, self.scale = pinv_init, scale

    def forward(self, q, k, v, kpm, qpm):
        return torch_nystrom.nystrom_attention(q, k, v, M, pinv_init=self.pinv_init, key_padding_mask=kpm,
                                               query_padding_mask=qpm, scale=self.scale)


class NoMask(torch.nn.Module):
    def forward(self, q, k, v):
        return torch_nystrom.nystrom_attention(q, k, v, M)


class Forward(torch.nn.Module):
    """All eight outputs of the forward op, to check the whole translation."""

    def forward(self, q, k, v, kpm, qpm):
        return torch.ops.nystrom.nystrom_attention_forward(q, k, v, M, 6, "per_head", kpm, qpm, None)


def dims(*spec):
    """dynamic_shapes from marks per input: (dim index, name) pairs; B, L, S dynamic."""
    named = {n: torch.export.Dim(n, min=2, max=1 << 16) for n in "BLS"}
    return tuple({d: named[n] for d, n in s} for s in spec)


QKV_DIMS = ([(0, "B"), (2, "L")], [(0, "B"), (2, "S")], [(0, "B"), (2, "S")])
MASK_DIMS = ([(0, "B"), (1, "S")], [(0, "B"), (1, "L")])


def session(path, basic=False):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if basic:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run(sess, *inputs):
    feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feed)]


def export(model, args, dynamic_shapes, path, basic=False):
    prog = torch.onnx.export(model.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes,
                             custom_translation_table=torch_nystrom.onnx.translation_table(), verbose=False)
    prog.save(str(path))
    return session(path, basic)


def qkv_masks(B, L, S, dtype=torch.float32, seed=0):
    q, k, v = make_qkv(B, 2, L, S, 8, 6, dtype=dtype, seed=seed)
    return (q, k, v) + masks(B, L, S, seed)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module", params=["per_head", "original"])
def op_session(request, onnx_dir):
    init = request.param
    args = qkv_masks(3, EXPORT_L, EXPORT_S)
    return init, export(Op(init), args, dims(*QKV_DIMS, *MASK_DIMS), onnx_dir / f"op_{init}.onnx")


@pytest.mark.parametrize("L,S", RUN_LENGTHS)
def test_op_masks_unseen_lengths(op_session, L, S):
    init, sess = op_session
    args = qkv_masks(4, L, S, seed=L * 1000 + S)
    (out,) = run(sess, *args)
    assert_rel_close(out, Op(init)(*args), 1e-5, f"onnx {init} L={L} S={S}")


def test_op_without_masks(onnx_dir):
    q, k, v = make_qkv(2, 2, EXPORT_L, EXPORT_S, 8, dtype=torch.float32)
    sess = export(NoMask(), (q, k, v), dims(*QKV_DIMS), onnx_dir / "nomask.onnx")
    for L, S in RUN_LENGTHS:
        q, k, v = make_qkv(2, 2, L, S, 8, dtype=torch.float32, seed=L + S)
        assert_rel_close(run(sess, q, k, v)[0], NoMask()(q, k, v), 1e-5, f"L={L} S={S}")


def test_forward_op_all_outputs(onnx_dir):
    sess = export(Forward(), qkv_masks(3, EXPORT_L, EXPORT_S), dims(*QKV_DIMS, *MASK_DIMS), onnx_dir / "fwd.onnx")
    for L, S in [(5, 7), (37, 50), (100, 61)]:
        args = qkv_masks(4, L, S, seed=L)
        for name, got, want in zip(SAVED, run(sess, *args), Forward()(*args)):
            assert_rel_close(got, want, 1e-5, f"{name} L={L} S={S}")


def test_float64_graph_matches_reference(onnx_dir):
    # onnxruntime's extended optimisations fuse "x * scale" into its FusedMatMul, whose alpha is
    # a float32 attribute: 0.3 becomes 0.30000001192 in a float64 graph (4e-8 relative). The basic
    # level keeps the graph's own float64 arithmetic.
    args = qkv_masks(3, EXPORT_L, EXPORT_S, dtype=torch.float64)
    sess = export(Op("original", scale=0.3), args, dims(*QKV_DIMS, *MASK_DIMS), onnx_dir / "f64.onnx", basic=True)
    for L, S in [(9, 8), (37, 50), (257, 257)]:
        q, k, v, kpm, qpm = qkv_masks(4, L, S, dtype=torch.float64, seed=L)
        ref = nystrom_reference(q, k, v, M, pinv_init="original", key_padding_mask=kpm, query_padding_mask=qpm,
                                scale=0.3)
        assert_rel_close(run(sess, q, k, v, kpm, qpm)[0], ref, 1e-10, f"L={L} S={S}")


@pytest.mark.parametrize("conv", [None, 5], ids=["no_conv", "conv5"])
def test_layer(onnx_dir, conv):
    torch.manual_seed(1)
    layer = torch_nystrom.NystromAttention(32, 4, M, conv_kernel_size=conv).eval()
    b, n = torch.export.Dim("b", min=2, max=1 << 16), torch.export.Dim("n", min=2, max=1 << 16)
    x = torch.randn(3, EXPORT_L, 32)
    mask = masks(3, EXPORT_L, EXPORT_L, 0)[0]
    sess = export(layer, (x, mask), ({0: b, 1: n}, {0: b, 1: n}), onnx_dir / f"layer_{conv}.onnx")
    for L in [3, 8, 9, 37, 257]:
        x = torch.randn(4, L, 32)
        mask = masks(4, L, L, L)[0]
        with torch.no_grad():
            want = layer(x, mask)
        assert_rel_close(run(sess, x, mask)[0], want, 1e-5, f"layer conv={conv} L={L}")


def test_torchscript_exporter(onnx_dir):
    torch_nystrom.onnx.register_torchscript_symbolic()
    path = onnx_dir / "torchscript.onnx"
    names = ["q", "k", "v", "kpm", "qpm"]
    axes = {"q": {0: "B", 2: "L"}, "k": {0: "B", 2: "S"}, "v": {0: "B", 2: "S"}, "kpm": {0: "B", 1: "S"},
            "qpm": {0: "B", 1: "L"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(Op("original"), qkv_masks(3, EXPORT_L, EXPORT_S), str(path), dynamo=False,
                          input_names=names, dynamic_axes=axes, opset_version=18)
    sess = session(path)
    for L, S in [(5, 7), (9, 8), (100, 61)]:
        args = qkv_masks(4, L, S, seed=L)
        assert_rel_close(run(sess, *args)[0], Op("original")(*args), 1e-5, f"L={L} S={S}")


def test_torchscript_exporter_refuses_old_opset():
    with pytest.raises(ValueError, match="opset_version must be >= 18"):
        torch_nystrom.onnx.register_torchscript_symbolic(17)


# --- the plain-PyTorch decomposition --------------------------------------------------------------

DECOMP_CASES = {
    # id: (B, L, S, m, masked)
    "uneven": (2, 37, 37, 5, False),
    "n_below_m": (2, 5, 6, 8, False),
    "n_equals_m": (2, 8, 8, 8, False),
    "cross_masks": (4, 50, 29, 7, True),
    "long_masks": (4, 300, 300, 16, True),
}


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
@pytest.mark.parametrize("case", DECOMP_CASES, ids=str)
def test_decomposition_matches_reference_and_op(case, pinv_init):
    B, L, S, m, masked = DECOMP_CASES[case]
    q, k, v = make_qkv(B, 3, L, S, 8, 5, seed=7)
    kpm, qpm = masks(B, L, S, 7) if masked else (None, None)
    kw = dict(pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm)
    out = decomposed_nystrom_attention(q, k, v, m, **kw)
    assert_rel_close(out, nystrom_reference(q, k, v, m, **kw), 1e-10, "vs reference")
    got = decomposed_nystrom_attention_forward(q.float(), k.float(), v.float(), m, 6, pinv_init, kpm, qpm, None)
    want = torch.ops.nystrom.nystrom_attention_forward(q.float(), k.float(), v.float(), m, 6, pinv_init, kpm, qpm,
                                                       None)
    for name, a, b in zip(SAVED, got, want):
        assert a.dtype == b.dtype, name
        assert_rel_close(a, b, 1e-5, name)


def test_decomposition_gradients_match_reference():
    q, k, v = make_qkv(3, 2, 23, 19, 4, 3, requires_grad=True, seed=3)
    kpm, qpm = masks(3, 23, 19, 3)
    kw = dict(pinv_init="original", key_padding_mask=kpm, query_padding_mask=qpm)
    g = torch.randn(3, 2, 23, 3, dtype=torch.float64)
    got = torch.autograd.grad((decomposed_nystrom_attention(q, k, v, 4, **kw) * g).sum(), (q, k, v))
    want = torch.autograd.grad((nystrom_reference(q, k, v, 4, **kw) * g).sum(), (q, k, v))
    for name, a, b in zip("qkv", got, want):
        assert_rel_close(a, b, 1e-9, f"d{name}")


def test_decomposition_exports_with_dynamic_length():
    class Decomposed(torch.nn.Module):
        def forward(self, q, k, v, kpm):
            return decomposed_nystrom_attention(q, k, v, M, key_padding_mask=kpm, query_padding_mask=kpm)

    args = qkv_masks(3, EXPORT_L, EXPORT_L)[:3] + (masks(3, EXPORT_L, EXPORT_L, 0)[0],)
    b, n = torch.export.Dim("b", min=2, max=1 << 16), torch.export.Dim("n", min=2, max=1 << 16)
    qkv = {0: b, 2: n}
    ep = torch.export.export(Decomposed(), args, dynamic_shapes=(qkv, qkv, qkv, {0: b, 1: n}))
    assert not [nd for nd in ep.graph.nodes if "nystrom" in str(nd.target)]
    q, k, v, kpm, _ = qkv_masks(4, 97, 97, seed=97)
    assert_rel_close(ep.module()(q, k, v, kpm), Decomposed()(q, k, v, kpm), 1e-6)


def test_decomposition_argument_errors():
    q, k, v = make_qkv(2, 1, 6, 6, 4)
    with pytest.raises(ValueError, match="num_landmarks must be an int >= 1"):
        decomposed_nystrom_attention(q, k, v, 0)
    with pytest.raises(ValueError, match='pinv_init must be "per_head" or "original"'):
        decomposed_nystrom_attention(q, k, v, 2, pinv_init="global")
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, S\)"):
        decomposed_nystrom_attention(q, k, v, 2, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="value must have the same dtype as query"):
        decomposed_nystrom_attention(q, k, v.float(), 2)
    with pytest.raises(ValueError, match="masks every key of batch element 1"):
        decomposed_nystrom_attention(q, k, v, 2, key_padding_mask=torch.tensor([[False] * 6, [True] * 6]))
