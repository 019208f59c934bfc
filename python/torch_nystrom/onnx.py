"""ONNX export of the Nyström attention op, in standard ONNX operators.

``torch.onnx.export(..., dynamo=True)`` cannot translate ``nystrom::*`` by itself:
it stops with "No ONNX function found for nystrom.nystrom_attention_forward"
(``torch.export`` keeps the op, its autograd lowers it to the forward op, and
the exporter has no ONNX function for either). Give it this module's table::

    onnx_program = torch.onnx.export(
        model, (x,), dynamo=True, dynamic_shapes=...,
        custom_translation_table=torch_nystrom.onnx.translation_table())

(The exporter would also pick up a decomposition registered in the global
``torch._decomp.decomposition_table``, but under symbolic sizes FakeTensor then
runs that Python decomposition instead of the op's C++ Meta kernel, in every
``torch.compile(dynamic=True)`` and ``torch.export`` trace; so the library leaves
that table alone.)

The graph computes exactly the op's math (docs/DESIGN.md §2) for any sequence
length the model later sees: segment means for uneven segments, both
``pinv_init``, both padding masks, and the exact path of elements with
``L_b, S_b <= m``. Padding cannot be dropped inside a static graph, so the
graph works with masks instead (the same formulation as
:func:`decomposed_nystrom_attention`, see ``_decomposition.py``): every
tensor is O((L + S) · m) per head, never L x S. ONNX opset 18 or newer.

The TorchScript-based exporter (``dynamo=False``, deprecated by torch) works
too, from the same graph builder, after :func:`register_torchscript_symbolic`.

Unlike the op, a graph cannot raise on data: an element with real queries but
every key padded (an error for the op) gives undefined rows.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from ._decomposition import decomposed_nystrom_attention, decomposed_nystrom_attention_forward

__all__ = [
    "translation_table",
    "register_torchscript_symbolic",
    "decomposed_nystrom_attention",
    "decomposed_nystrom_attention_forward",
]

MIN_OPSET = 18

# ONNX TensorProto data types (onnx.proto) used here.
_ONNX_TYPE = {torch.float32: 1, torch.int64: 7, torch.bool: 9, torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}


class _Graph:
    """What the graph builder needs from an exporter: nodes, constants, and input metadata."""

    def __call__(self, op_type: str, *inputs: Any, **attrs: Any) -> Any:
        raise NotImplementedError

    def const(self, array: torch.Tensor) -> Any:
        raise NotImplementedError

    def dtype(self, value: Any) -> torch.dtype:
        raise NotImplementedError

    def static_size(self, value: Any, dim: int) -> Optional[int]:
        raise NotImplementedError


class _OnnxscriptGraph(_Graph):
    """The dynamo exporter: translation functions call ONNX Script ops while it traces them."""

    def __init__(self) -> None:
        import onnx_ir as ir
        from onnxscript import opset18

        self._ir = ir
        self._op = opset18
        self._dtypes = {
            ir.DataType.FLOAT: torch.float32,
            ir.DataType.DOUBLE: torch.float64,
            ir.DataType.FLOAT16: torch.float16,
            ir.DataType.BFLOAT16: torch.bfloat16,
            ir.DataType.BOOL: torch.bool,
        }

    def __call__(self, op_type, *inputs, **attrs):
        attrs = {k: self._ir.tensor(v.numpy()) if isinstance(v, torch.Tensor) else v for k, v in attrs.items()}
        return getattr(self._op, op_type)(*inputs, **attrs)

    def const(self, array):
        return self._op.Constant(value=self._ir.tensor(array.numpy()))

    def dtype(self, value):
        if value.dtype not in self._dtypes:
            raise TypeError(f"torch_nystrom.onnx: unsupported input type {value.dtype}")
        return self._dtypes[value.dtype]

    def static_size(self, value, dim):
        size = value.shape[dim] if value.shape is not None else None
        return size if isinstance(size, int) else None


class _TorchScriptGraph(_Graph):
    """The TorchScript-based exporter: ``g.op`` with typed attribute suffixes."""

    def __init__(self, g) -> None:
        self._g = g

    def __call__(self, op_type, *inputs, **attrs):
        typed = {}
        for k, v in attrs.items():
            if isinstance(v, torch.Tensor):
                typed[k + "_t"] = v
            elif isinstance(v, (list, tuple)) or isinstance(v, (bool, int)):
                typed[k + "_i"] = v
            elif isinstance(v, float):
                typed[k + "_f"] = v
            else:
                typed[k + "_s"] = v
        return self._g.op(op_type, *inputs, **typed)

    def const(self, array):
        return self._g.op("Constant", value_t=array)

    def dtype(self, value):
        return torch.onnx.JitScalarType.from_value(value).dtype()

    def static_size(self, value, dim):
        from torch.onnx import symbolic_helper

        return symbolic_helper._get_tensor_dim_size(value, dim)


def _build(g: _Graph, query, key, value, m: int, iterations: int, pinv_init: str, key_padding_mask,
           query_padding_mask, scale: Optional[float], outputs: int):
    """The op's first `outputs` results, in ONNX nodes; step by step as in _decomposition.py."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"torch_nystrom.onnx: num_landmarks must be an int >= 1, got {m!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"torch_nystrom.onnx: pinv_iterations must be an int >= 0, got {iterations!r}")
    if pinv_init not in ("per_head", "original"):
        raise ValueError(f'torch_nystrom.onnx: pinv_init must be "per_head" or "original", got {pinv_init!r}')
    in_dtype = g.dtype(query)
    if in_dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"torch_nystrom.onnx: query must be a floating tensor, got {in_dtype}")
    acc = torch.float64 if in_dtype == torch.float64 else torch.float32
    if scale is None:
        D = g.static_size(query, 3)
        if D is None:
            raise ValueError("torch_nystrom.onnx: the head dim of query must be static to derive the default scale; "
                             "pass scale= explicitly")
        scale = float(D) ** -0.5
    i64 = lambda *v: g.const(torch.tensor(v, dtype=torch.int64))  # noqa: E731
    num = lambda x: g.const(torch.tensor(x, dtype=acc))  # noqa: E731
    axes = i64
    cast = lambda x, t: g("Cast", x, to=_ONNX_TYPE[t])  # noqa: E731
    kT = lambda x: g("Transpose", x, perm=[0, 1, 3, 2])  # noqa: E731
    zero, big_neg = num(0.0), num(torch.finfo(acc).min)

    q, k, v = ((x if in_dtype == acc else cast(x, acc)) for x in (query, key, value))
    B = g("Shape", query, start=0, end=1)
    L = g("Shape", query, start=2, end=3)
    S = g("Shape", key, start=2, end=3)
    ms = g("Min", g("Max", L, S), i64(m))  # landmark slots: min(m, max(L, S))
    scalar = lambda x: g("Squeeze", x, axes(0))  # noqa: E731
    slots = g("Range", scalar(i64(0)), scalar(ms), scalar(i64(1)))  # 0 .. ms-1

    def segments(mask, n):
        """(real (B, n), count (B, 1), used (B, 1), onehot (B, n, ms)): see _decomposition.segments."""
        if mask is None:
            real = g("ConstantOfShape", g("Concat", B, n, axis=0), value=torch.tensor([True]))
        else:
            real = g("Not", mask)
        ri = cast(real, torch.int64)
        count = g("ReduceSum", ri, axes(1), keepdims=1)
        used = g("Min", count, i64(m))
        rank = g("Sub", g("CumSum", ri, scalar(i64(1))), i64(1))
        seg = g("Div", g("Sub", g("Mul", g("Add", rank, i64(1)), used), i64(1)), g("Max", count, i64(1)))
        onehot = g("And", g("Equal", g("Unsqueeze", seg, axes(2)), slots), g("Unsqueeze", real, axes(2)))
        return real, count, used, onehot

    def segment_means(x, onehot):
        w = cast(onehot, acc)
        sums = g("MatMul", g("Unsqueeze", g("Transpose", w, perm=[0, 2, 1]), axes(1)), x)
        counts = g("Max", g("ReduceSum", w, axes(1), keepdims=0), num(1.0))
        return g("Div", sums, g("Unsqueeze", counts, axes(1, 3)))

    def masked_softmax(logits, keep):
        x = g("Where", keep, logits, big_neg)
        mx = g("ReduceMax", x, axes(-1), keepdims=1)
        e = g("Exp", g("Sub", x, mx))
        s = g("ReduceSum", e, axes(-1), keepdims=1)
        return g("Div", e, s), g("Squeeze", g("Add", g("Log", s), mx), axes(-1))

    q_real, q_count, q_used, q_onehot = segments(query_padding_mask, L)
    k_real, k_count, k_used, k_onehot = segments(key_padding_mask, S)
    q_lm = segment_means(q, q_onehot)
    k_lm = segment_means(k, k_onehot)
    k_lm_s = g("Mul", k_lm, num(scale))
    q_cols = g("Unsqueeze", g("Less", slots, k_used), axes(1, 2))  # (B, 1, 1, ms)
    q_rows = g("Unsqueeze", g("Less", slots, q_used), axes(1, 3))  # (B, 1, ms, 1)
    A = g("Where", q_rows, masked_softmax(g("MatMul", q_lm, kT(k_lm_s)), q_cols)[0], zero)
    c = g("ReduceMax", g("ReduceSum", A, axes(-2), keepdims=0), axes(-1), keepdims=0)  # (B, H)
    empty = g("Equal", q_count, i64(0))  # (B, 1)
    small = g("And", g("LessOrEqual", q_count, i64(m)), g("LessOrEqual", k_count, i64(m)))
    exact = g("And", g("Not", empty), small)
    nys = g("And", g("Not", empty), g("Not", small))
    if pinv_init == "original":
        c = g("Expand", g("ReduceMax", g("Where", nys, c, zero), keepdims=0), g("Shape", c))
    c = g("Where", nys, c, zero)
    Z = g("Div", kT(A), g("Unsqueeze", g("Where", nys, c, num(1.0)), axes(2, 3)))
    eye = cast(g("Equal", g("Unsqueeze", slots, axes(1)), g("Unsqueeze", slots, axes(0))), acc)
    I7, I13, I15 = (g("Mul", eye, num(f)) for f in (7.0, 13.0, 15.0))
    for _ in range(iterations):
        X = g("MatMul", A, Z)
        T = g("Sub", I7, X)
        T = g("Sub", I15, g("MatMul", X, T))
        T = g("Sub", I13, g("MatMul", X, T))
        Z = g("Mul", g("MatMul", Z, T), num(0.25))

    nys4 = g("Unsqueeze", nys, axes(2, 3))  # (B, 1, 1, 1)
    Bm, lse_l = masked_softmax(g("MatMul", g("Mul", q_lm, num(scale)), kT(k)), g("Unsqueeze", k_real, axes(1, 2)))
    bv = g("Where", g("And", nys4, q_rows), g("MatMul", Bm, v), zero)
    zbv = g("MatMul", Z, bv)
    F, lse_q = masked_softmax(g("MatMul", q, kT(k_lm_s)), q_cols)
    values = g("Where", g("Unsqueeze", exact, axes(2, 3)), segment_means(v, k_onehot), zbv)
    real_q = g("Unsqueeze", q_real, axes(1))  # (B, 1, L)
    out = g("Where", g("Unsqueeze", real_q, axes(3)), g("MatMul", F, values), zero)
    if in_dtype != acc:
        out = cast(out, in_dtype)
    if outputs == 1:
        return out
    nys3 = g("Unsqueeze", nys, axes(2))
    return (
        out,
        g("Where", nys4, q_lm, zero),
        g("Where", nys4, k_lm, zero),
        bv,
        zbv,
        g("Where", real_q, lse_q, zero),
        g("Where", g("And", nys3, g("Squeeze", q_rows, axes(3))), lse_l, zero),
        c,
    )


def _onnx_nystrom_attention(query, key, value, num_landmarks: int = 64, pinv_iterations: int = 6,
                            pinv_init: str = "per_head", key_padding_mask=None, query_padding_mask=None, scale=None):
    """ONNX translation of ``nystrom::nystrom_attention`` (the dynamo exporter calls it while tracing)."""
    return _build(_OnnxscriptGraph(), query, key, value, num_landmarks, pinv_iterations, pinv_init,
                  key_padding_mask, query_padding_mask, scale, outputs=1)


def _onnx_nystrom_attention_forward(query, key, value, num_landmarks: int = 64, pinv_iterations: int = 6,
                                    pinv_init: str = "per_head", key_padding_mask=None, query_padding_mask=None,
                                    scale=None):
    """ONNX translation of ``nystrom::nystrom_attention_forward``: all eight outputs."""
    return _build(_OnnxscriptGraph(), query, key, value, num_landmarks, pinv_iterations, pinv_init,
                  key_padding_mask, query_padding_mask, scale, outputs=8)


def translation_table() -> Dict[Callable, Callable]:
    """``custom_translation_table=`` for ``torch.onnx.export(..., dynamo=True)``.

    Maps ``torch.ops.nystrom.nystrom_attention.default`` and
    ``torch.ops.nystrom.nystrom_attention_forward.default`` (what ``torch.export``
    lowers the first to) to ONNX Script functions in standard ONNX operators.
    Merge it with a table of your own with ``{**translation_table(), **mine}``.
    """
    return {
        torch.ops.nystrom.nystrom_attention.default: _onnx_nystrom_attention,
        torch.ops.nystrom.nystrom_attention_forward.default: _onnx_nystrom_attention_forward,
    }


def _torchscript_symbolic(outputs: int):
    def symbolic(g, query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                 query_padding_mask, scale):
        from torch.onnx import symbolic_helper as sh

        if g.opset < MIN_OPSET:
            raise torch.onnx.errors.OnnxExporterError(
                f"torch_nystrom.onnx: export nystrom::nystrom_attention with opset_version >= {MIN_OPSET}, got {g.opset}")
        none = lambda x: x is None or sh._is_none(x)  # noqa: E731
        return _build(
            _TorchScriptGraph(g), query, key, value,
            sh._get_const(num_landmarks, "i", "num_landmarks"),
            sh._get_const(pinv_iterations, "i", "pinv_iterations"),
            sh._get_const(pinv_init, "s", "pinv_init"),
            None if none(key_padding_mask) else key_padding_mask,
            None if none(query_padding_mask) else query_padding_mask,
            None if none(scale) else sh._get_const(scale, "f", "scale"),
            outputs,
        )

    return symbolic


def register_torchscript_symbolic(opset_version: int = MIN_OPSET) -> None:
    """Teach the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``) the nystrom ops.

    Registers the same ONNX graph as :func:`translation_table` for
    ``nystrom::nystrom_attention`` and ``nystrom::nystrom_attention_forward``,
    for ``opset_version`` (at least 18) and newer. Calling it again is harmless.
    Pass ``dynamic_axes`` to the exporter for a dynamic sequence length.
    """
    if opset_version < MIN_OPSET:
        raise ValueError(f"register_torchscript_symbolic: opset_version must be >= {MIN_OPSET}, got {opset_version}")
    torch.onnx.register_custom_op_symbolic("nystrom::nystrom_attention", _torchscript_symbolic(1), opset_version)
    torch.onnx.register_custom_op_symbolic("nystrom::nystrom_attention_forward", _torchscript_symbolic(8),
                                           opset_version)
