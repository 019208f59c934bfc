"""torch.compile and torch.export of the Nyström ops and of NystromAttention.

The ops' Meta kernels (csrc/meta/) give fake tensors their shapes with symbolic sizes, so a model
traces into one graph (fullgraph=True), the sequence length stays symbolic (no recompilation when
it changes) and torch.export keeps ``torch.ops.nystrom.*`` as single nodes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import rel_err

torch_nystrom = pytest.importorskip("torch_nystrom")
from torch._dynamo.testing import CompileCounter  # noqa: E402
from torch.export import Dim, export  # noqa: E402

TOL = 1e-5
E, H, M = 32, 4, 8  # embed dim, heads, landmarks; test lengths avoid these values (no duck-size coincidences)


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TinyModel(nn.Module):
    """A small encoder block around NystromAttention (with the conv skip), the way a user model holds it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, E)
        self.attn = torch_nystrom.NystromAttention(E, H, M, pinv_init="original", conv_kernel_size=3)
        self.norm = nn.LayerNorm(E)
        self.head = nn.Linear(E, 5)

    def forward(self, x, key_padding_mask=None):
        h = self.embed(x)
        h = self.norm(h + self.attn(h, key_padding_mask=key_padding_mask))
        return self.head(h)


def make_model(seed=0):
    torch.manual_seed(seed)
    return TinyModel()


def batch(b, n, pad_from=None, seed=1, always_mask=False):
    """x (b, n, 12) and a key padding mask (last element padded from pad_from), None if no padding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 12, generator=g)
    mask = None
    if pad_from is not None or always_mask:
        mask = torch.zeros(b, n, dtype=torch.bool)
        if pad_from is not None:
            mask[-1, pad_from:] = True
    return x, mask


def forward_backward(fn, model, x, mask, dynamic_length=False):
    """Output, input gradient and parameter gradients of sum(out * w) for a fixed w."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if dynamic_length:
        torch._dynamo.mark_dynamic(x, 1)
    out = fn(x, mask)
    w = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    (out * w).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def assert_matches(actual, expected, what, tol=TOL, grad_tol=TOL):
    out_a, dx_a, g_a = actual
    out_e, dx_e, g_e = expected
    assert out_a.shape == out_e.shape
    assert rel_err(out_a, out_e) <= tol, f"{what}: output {rel_err(out_a, out_e):.3e}"
    assert rel_err(dx_a, dx_e) <= grad_tol, f"{what}: input grad {rel_err(dx_a, dx_e):.3e}"
    assert g_a.keys() == g_e.keys()
    for name in g_e:
        # The k_proj bias gradient is zero up to rounding (it shifts whole softmax rows).
        scale = max(g_e[name].abs().max().item(), 1e-3 * max(g.abs().max().item() for g in g_e.values()))
        err = (g_a[name] - g_e[name]).abs().max().item() / scale
        assert err <= grad_tol, f"{what}: grad of {name} {err:.3e}"


# ----------------------------------------------------------------------------- (a) fullgraph compile


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_module_compiles_fullgraph(backend):
    """A model holding NystromAttention compiles into one graph; forward and backward equal eager."""
    model = make_model()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    # Inductor fuses and reorders the float math around the op (linear, layer norm): its gradients
    # differ from eager by a few ulps more.
    grad_tol = 1e-4 if backend == "inductor" else TOL
    # Inductor compiles C++ kernels (tens of seconds on a cold cache): one signature only, the masked one.
    for pad_from in (17,) if backend == "inductor" else (None, 17):
        x, mask = batch(2, 24, pad_from)
        expected = forward_backward(model, model, x, mask)
        actual = forward_backward(compiled, model, x, mask)
        assert_matches(actual, expected, f"{backend}, pad_from={pad_from}", grad_tol=grad_tol)


def test_compiled_graph_holds_the_op():
    """The op is one node of the captured graph (not traced through, not a graph break)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = make_model()
    x, mask = batch(2, 24, 17)
    torch.compile(model, backend=capture, fullgraph=True)(x, mask)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    op = torch.ops.nystrom.nystrom_attention
    assert sum(t is op or t is op.default for t in targets) == 1


# ----------------------------------------------------------------------------- (b) dynamic sequence length


def test_dynamic_sequence_length_no_recompile():
    """dynamic=True: one graph for every length (and batch size); a mask instead of None is one more graph."""
    model = make_model()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    for b, n, pad_from, graphs in ((2, 40, None, 1), (2, 57, None, 1), (3, 29, 20, 2), (2, 45, 30, 2)):
        x, mask = batch(b, n, pad_from)
        expected = forward_backward(model, model, x, mask)
        actual = forward_backward(compiled, model, x, mask)
        assert_matches(actual, expected, f"b={b} n={n}")
        assert counter.frame_count == graphs, f"b={b} n={n}: {counter.frame_count} graphs"


def test_mark_dynamic_aot_autograd_one_graph():
    """mark_dynamic on the length with AOTAutograd (forward and backward graphs): no recompilation."""
    model = make_model()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch._dynamo.utils.counters.clear()
    for n in (40, 57, 33):
        x, _ = batch(2, n)
        actual = forward_backward(compiled, model, x, None, dynamic_length=True)
        assert_matches(actual, forward_backward(model, model, x, None), f"n={n}")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


# ----------------------------------------------------------------------------- (c) torch.export


@pytest.mark.parametrize("decompose", [False, True], ids=["training_ir", "run_decompositions"])
def test_export_dynamic_sequence_length(decompose):
    """torch.export with Dims for batch and length; .module() equals eager at other lengths and batches."""
    model = make_model().eval()
    x, mask = batch(2, 40, 30)
    seq = Dim("seq", min=2, max=4096)
    bsz = Dim("batch", min=1, max=64)
    ep = export(
        model,
        (x,),
        {"key_padding_mask": mask},
        dynamic_shapes={"x": {0: bsz, 1: seq}, "key_padding_mask": {0: bsz, 1: seq}},
    )
    if decompose:
        ep = ep.run_decompositions()
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    op = torch.ops.nystrom.nystrom_attention_forward.default if decompose else torch.ops.nystrom.nystrom_attention.default
    assert op in targets
    exported = ep.module()
    with torch.no_grad():
        for b, n, pad_from in ((2, 40, 30), (2, 57, None), (3, 23, 9)):
            xi, mi = batch(b, n, pad_from, seed=n, always_mask=True)
            out = exported(xi, key_padding_mask=mi)
            expected = model(xi, key_padding_mask=mi)
            assert out.shape == (b, n, 5)
            assert rel_err(out, expected) <= TOL, f"exported, b={b} n={n}"


def test_export_layer_alone():
    """The layer itself, exported with a length Dim, without a mask."""
    torch.manual_seed(0)
    layer = torch_nystrom.NystromAttention(E, H, M, conv_kernel_size=5).eval()
    ep = export(layer, (torch.randn(2, 40, E),), dynamic_shapes=({1: Dim("seq", min=2, max=1024)},))
    with torch.no_grad():
        for n in (40, 71):
            x = torch.randn(2, n, E)
            assert rel_err(ep.module()(x), layer(x)) <= TOL


# ----------------------------------------------------------------------------- (d) the functional op


def _attention(q, k, v, kpm, qpm):
    return torch_nystrom.nystrom_attention(
        q, k, v, M, pinv_init="original", key_padding_mask=kpm, query_padding_mask=qpm
    )


def _qkv(b, length, s, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, 3, n, 16, generator=g) for n in (length, s, s))
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[-1, s // 2 :] = True
    qpm = torch.zeros(b, length, dtype=torch.bool)
    qpm[0, length - 3 :] = True
    return q, k, v, kpm, qpm


def _grads(fn, q, k, v, kpm, qpm):
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, kpm, qpm)
    w = torch.linspace(-1.0, 1.0, out.numel()).view_as(out)
    (out * w).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_functional_compiles_with_masks(backend):
    """nystrom_attention with both masks (cross-attention, S != L) under fullgraph, dynamic lengths."""
    counter = CompileCounter() if backend == "eager" else None
    compiled = torch.compile(_attention, backend=counter or backend, fullgraph=True, dynamic=True)
    for b, length, s in ((2, 40, 33), (2, 57, 70), (5, 20, 21)):
        args = _qkv(b, length, s, seed=length)
        actual = _grads(compiled, *args)
        expected = _grads(_attention, *args)
        for a, e, what in zip(actual, expected, ("out", "dq", "dk", "dv")):
            assert rel_err(a, e) <= TOL, f"{backend} b={b} L={length} S={s}: {what}"
        assert actual[0][0, :, length - 3 :].abs().max() == 0  # padded query rows are zero
    if counter is not None:
        assert counter.frame_count == 1


def test_functional_explicit_scale_dynamic_head_dim():
    """With an explicit scale nothing depends on the value of D: a dynamic D exports too."""

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return torch_nystrom.nystrom_attention(q, k, v, M, scale=0.25)

    q, k, v, _, _ = _qkv(2, 40, 40, seed=0)
    seq, d = Dim("seq", min=2, max=1024), Dim("d", min=2, max=256)
    ep = export(Attn(), (q, k, v), dynamic_shapes=({2: seq, 3: d}, {2: seq, 3: d}, {2: seq}))
    for length, dim in ((51, 24), (33, 8)):
        q2, k2, v2 = torch.randn(2, 3, length, dim), torch.randn(2, 3, length, dim), torch.randn(2, 3, length, 16)
        assert rel_err(ep.module()(q2, k2, v2), Attn()(q2, k2, v2)) <= TOL


def test_functional_default_scale_dynamic_head_dim():
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return torch_nystrom.nystrom_attention(q, k, v, M)

    q, k, v, _, _ = _qkv(2, 40, 40, seed=0)
    d = Dim("d", min=2, max=256)
    # The default scale D**-0.5 must not specialise a symbolic head dimension.
    ep = export(Attn(), (q, k, v), dynamic_shapes=({3: d}, {3: d}, None))
    for dim in (24, 8):
        q2, k2 = torch.randn(2, 3, 40, dim), torch.randn(2, 3, 40, dim)
        v2 = torch.randn(2, 3, 40, v.shape[-1])
        assert rel_err(ep.module()(q2, k2, v2), Attn()(q2, k2, v2)) <= TOL
