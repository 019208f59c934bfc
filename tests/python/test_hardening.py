"""Hardening: bad input, edge cases, property fuzzing, concurrency and determinism.

- Bad input: one test per case, each checking the error type and that the message names the argument
  and says what was expected; the same cases through the Meta (shape) kernels with all-meta inputs.
- Sizes whose element count does not fit in 32 bits (without the memory they would normally need).
- Valid edge cases against the float64 reference (tests/python/reference.py).
- Property fuzzing with hypothesis: random shapes, masks, options and dtypes against the reference,
  plus padding invariance.
- Concurrency (many Python threads at once give the serial results, bitwise) and determinism (repeated
  calls bitwise equal at a fixed thread count; close across thread counts).
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import re
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch

from helpers import assert_rel_close, make_qkv, middle_mask, rel_err
from reference import landmarks, max_column_sum, newton_schulz, nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")
nystrom_attention = torch_nystrom.nystrom_attention

try:
    import hypothesis
    from hypothesis import HealthCheck, note, strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    hypothesis = None

F64_TOL = 1e-9  # float64 op vs float64 reference (Newton–Schulz amplifies rounding on near-singular A)
F64_GRAD_TOL = 1e-7


def _call(q, k, v, kw):
    return nystrom_attention(q, k, v, **kw)


def _forward_op(a: Dict) -> tuple:
    """torch.ops.nystrom.nystrom_attention_forward with the argument dict of the error tests."""
    return torch.ops.nystrom.nystrom_attention_forward(
        a["query"], a["key"], a["value"], a["num_landmarks"], a["pinv_iterations"], a["pinv_init"],
        a["key_padding_mask"], a["query_padding_mask"], a["scale"],
    )


def _run_slow(request) -> bool:
    """Slow tests run only when asked for: `-m slow` (any -m expression that selects them), or
    NYSTROM_RUN_SLOW=1. A plain `pytest tests/python` skips them."""
    return bool(request.config.getoption("markexpr", "")) or os.environ.get("NYSTROM_RUN_SLOW") == "1"


# =============================================================================================
# Bad input
# =============================================================================================


def _good(device="cpu") -> Dict:
    """Valid arguments (B=2, H=3, L=7, S=9, D=4, Dv=5, m=3); every error case changes one thing."""
    q, k, v = make_qkv(2, 3, 7, 9, 4, 5, dtype=torch.float32, seed=1)
    return dict(
        query=q.to(device), key=k.to(device), value=v.to(device), num_landmarks=3, pinv_iterations=6,
        pinv_init="per_head",
        key_padding_mask=torch.zeros(2, 9, dtype=torch.bool, device=device),
        query_padding_mask=torch.zeros(2, 7, dtype=torch.bool, device=device),
        scale=None,
    )


def _other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


def _to_other_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """t on the device other than `device` (a meta tensor has no data to copy: zeros instead)."""
    other = _other_device(device)
    return t.to(other) if t.device.type != "meta" else torch.zeros(t.shape, dtype=t.dtype, device=other)


class Bad(NamedTuple):
    id: str
    mutate: Callable[[Dict, str], None]  # (arguments, device of the call) -> changes the arguments
    words: List[str]  # regexes that must all occur in the message: the argument, what was expected, what came
    data_dependent: bool = False  # needs tensor values: not checkable on the meta device


def _set(**changes):
    def mutate(a, device):
        for name, f in changes.items():
            a[name] = f(a, device)
    return mutate


def _mask_all_keys_of_element_1(a, device):
    a["key_padding_mask"][1] = True


BAD = [
    # wrong rank
    Bad("query_rank_3", _set(query=lambda a, d: a["query"][0]),
        [r"\bquery\b", r"4-D", r"\(B, H, L, D\)", r"got shape \[3, 7, 4\]"]),
    Bad("query_rank_5", _set(query=lambda a, d: a["query"].unsqueeze(0)),
        [r"\bquery\b", r"4-D", r"got shape \[1, 2, 3, 7, 4\]"]),
    Bad("key_rank_3", _set(key=lambda a, d: a["key"][0]), [r"\bkey\b", r"4-D", r"\(B, H, S, D\)", r"\[3, 9, 4\]"]),
    Bad("key_rank_5", _set(key=lambda a, d: a["key"].unsqueeze(0)), [r"\bkey\b", r"4-D", r"\[1, 2, 3, 9, 4\]"]),
    Bad("value_rank_3", _set(value=lambda a, d: a["value"][..., 0]),
        [r"\bvalue\b", r"4-D", r"\(B, H, S, Dv\)", r"\[2, 3, 9\]"]),
    Bad("value_rank_2", _set(value=lambda a, d: a["value"][0, 0]), [r"\bvalue\b", r"4-D", r"\[9, 5\]"]),
    # mismatched batch, heads, lengths, head dims
    Bad("key_batch", _set(key=lambda a, d: a["key"][:1]),
        [r"\bkey\b", r"same batch size", r"\(B, H\)", r"\[1, 3, 9, 4\]"]),
    Bad("value_batch", _set(value=lambda a, d: a["value"][:1]),
        [r"\bvalue\b", r"same batch size", r"\[1, 3, 9, 5\]"]),
    Bad("key_heads", _set(key=lambda a, d: a["key"][:, :2]),
        [r"\bkey\b", r"number of heads", r"\[2, 2, 9, 4\]"]),
    Bad("value_heads", _set(value=lambda a, d: a["value"][:, :1]),
        [r"\bvalue\b", r"number of heads", r"\[2, 1, 9, 5\]"]),
    Bad("value_length_vs_key", _set(value=lambda a, d: a["value"][:, :, :8]),
        [r"\bvalue\b", r"same length S as key", r"\[2, 3, 9, 4\]", r"\[2, 3, 8, 5\]"]),
    Bad("key_length_vs_value", _set(key=lambda a, d: torch.cat([a["key"], a["key"][:, :, :1]], 2)),
        [r"\bvalue\b", r"same length S as key", r"\[2, 3, 10, 4\]"]),
    Bad("key_head_dim_vs_query", _set(key=lambda a, d: a["key"][..., :3]),
        [r"\bkey\b", r"same head dimension D as query", r"\[2, 3, 7, 4\]", r"\[2, 3, 9, 3\]"]),
    # dtypes
    Bad("key_float64", _set(key=lambda a, d: a["key"].double()),
        [r"\bkey\b", r"same dtype as query", r"Float", r"Double"]),
    Bad("value_float16", _set(value=lambda a, d: a["value"].half()),
        [r"\bvalue\b", r"same dtype as query", r"Float", r"Half"]),
    Bad("query_bfloat16", _set(query=lambda a, d: a["query"].bfloat16()),
        [r"\bkey\b", r"same dtype as query", r"BFloat16", r"Float"]),
    Bad("all_int64", _set(**{n: (lambda a, d, n=n: a[n].long()) for n in ("query", "key", "value")}),
        [r"\bquery\b", r"floating-point", r"float32, float64, float16 or bfloat16", r"Long"]),
    Bad("all_int32", _set(**{n: (lambda a, d, n=n: a[n].int()) for n in ("query", "key", "value")}),
        [r"\bquery\b", r"floating-point", r"Int"]),
    Bad("all_uint8", _set(**{n: (lambda a, d, n=n: a[n].to(torch.uint8)) for n in ("query", "key", "value")}),
        [r"\bquery\b", r"floating-point", r"Byte"]),
    Bad("all_bool", _set(**{n: (lambda a, d, n=n: a[n] > 0) for n in ("query", "key", "value")}),
        [r"\bquery\b", r"floating-point", r"Bool"]),
    Bad("all_complex", _set(**{n: (lambda a, d, n=n: a[n].to(torch.complex64)) for n in ("query", "key", "value")}),
        [r"\bquery\b", r"floating-point", r"ComplexFloat"]),
    Bad("key_int64", _set(key=lambda a, d: a["key"].long()), [r"\bkey\b", r"same dtype as query", r"Long"]),
    # devices: on a CPU call the odd tensor is on meta; on an all-meta call it is on the CPU
    Bad("key_other_device", _set(key=lambda a, d: _to_other_device(a["key"], d)),
        [r"\bkey\b", r"same device as query", r"\b(cpu|meta)\b.*\b(cpu|meta)\b"]),
    Bad("value_other_device", _set(value=lambda a, d: _to_other_device(a["value"], d)),
        [r"\bvalue\b", r"same device as query"]),
    Bad("query_other_device", _set(query=lambda a, d: _to_other_device(a["query"], d)),
        [r"\bkey\b", r"same device as query"]),
    # options
    Bad("num_landmarks_0", _set(num_landmarks=lambda a, d: 0), [r"num_landmarks", r">= 1", r"got 0\b"]),
    Bad("num_landmarks_negative", _set(num_landmarks=lambda a, d: -5), [r"num_landmarks", r">= 1", r"got -5\b"]),
    Bad("pinv_iterations_negative", _set(pinv_iterations=lambda a, d: -1),
        [r"pinv_iterations", r">= 0", r"got -1\b"]),
    Bad("pinv_init_unknown", _set(pinv_init=lambda a, d: "exact"),
        [r"pinv_init", r'"per_head"', r'"original"', r'got "exact"']),
    Bad("pinv_init_wrong_case", _set(pinv_init=lambda a, d: "Per_Head"), [r"pinv_init", r'got "Per_Head"']),
    Bad("pinv_init_empty", _set(pinv_init=lambda a, d: ""), [r"pinv_init", r'got ""']),
    Bad("scale_nan", _set(scale=lambda a, d: math.nan), [r"\bscale\b", r"finite", r"> 0", r"got nan"]),
    Bad("scale_inf", _set(scale=lambda a, d: math.inf), [r"\bscale\b", r"finite", r"> 0", r"got inf"]),
    Bad("scale_minus_inf", _set(scale=lambda a, d: -math.inf), [r"\bscale\b", r"finite", r"got -inf"]),
    Bad("scale_0", _set(scale=lambda a, d: 0.0), [r"\bscale\b", r"> 0", r"got 0\b"]),
    Bad("scale_minus_1", _set(scale=lambda a, d: -1.0), [r"\bscale\b", r"> 0", r"got -1\b"]),
    # masks: shape, dtype, device
    Bad("key_mask_length", _set(key_padding_mask=lambda a, d: torch.zeros(2, 10, dtype=torch.bool, device=d)),
        [r"key_padding_mask", r"shape \(B, S\) = \(2, 9\)", r"got \[2, 10\]"]),
    Bad("key_mask_batch", _set(key_padding_mask=lambda a, d: torch.zeros(3, 9, dtype=torch.bool, device=d)),
        [r"key_padding_mask", r"\(B, S\) = \(2, 9\)", r"got \[3, 9\]"]),
    Bad("key_mask_rank_3", _set(key_padding_mask=lambda a, d: torch.zeros(2, 1, 9, dtype=torch.bool, device=d)),
        [r"key_padding_mask", r"\(B, S\)", r"got \[2, 1, 9\]"]),
    Bad("key_mask_rank_1", _set(key_padding_mask=lambda a, d: torch.zeros(9, dtype=torch.bool, device=d)),
        [r"key_padding_mask", r"\(B, S\)", r"got \[9\]"]),
    Bad("query_mask_length", _set(query_padding_mask=lambda a, d: torch.zeros(2, 9, dtype=torch.bool, device=d)),
        [r"query_padding_mask", r"shape \(B, L\) = \(2, 7\)", r"got \[2, 9\]"]),
    Bad("query_mask_rank_4",
        _set(query_padding_mask=lambda a, d: torch.zeros(2, 1, 1, 7, dtype=torch.bool, device=d)),
        [r"query_padding_mask", r"\(B, L\) = \(2, 7\)", r"got \[2, 1, 1, 7\]"]),
    Bad("key_mask_float", _set(key_padding_mask=lambda a, d: torch.zeros(2, 9, device=d)),
        [r"key_padding_mask", r"bool", r"got dtype Float"]),
    Bad("key_mask_int", _set(key_padding_mask=lambda a, d: torch.zeros(2, 9, dtype=torch.int64, device=d)),
        [r"key_padding_mask", r"bool", r"got dtype Long"]),
    Bad("query_mask_float", _set(query_padding_mask=lambda a, d: torch.zeros(2, 7, dtype=torch.float64, device=d)),
        [r"query_padding_mask", r"bool", r"got dtype Double"]),
    Bad("query_mask_uint8", _set(query_padding_mask=lambda a, d: torch.zeros(2, 7, dtype=torch.uint8, device=d)),
        [r"query_padding_mask", r"bool", r"got dtype Byte"]),
    Bad("key_mask_other_device",
        _set(key_padding_mask=lambda a, d: _to_other_device(a["key_padding_mask"], d)),
        [r"key_padding_mask", r"same device as query"]),
    Bad("query_mask_other_device",
        _set(query_padding_mask=lambda a, d: _to_other_device(a["query_padding_mask"], d)),
        [r"query_padding_mask", r"same device as query"]),
    # keys: none at all, or all of one batch element masked, while there are queries
    Bad("all_keys_masked", _mask_all_keys_of_element_1,
        [r"key_padding_mask", r"every key", r"batch element 1\b", r"at least one real key"], data_dependent=True),
    Bad("zero_keys_with_queries",
        _set(key=lambda a, d: a["key"][:, :, :0], value=lambda a, d: a["value"][:, :, :0],
             key_padding_mask=lambda a, d: None),
        [r"\bkey\b", r"S >= 1", r"\[2, 3, 0, 4\]"]),
]


def _check_message(err: BaseException, words: List[str]):
    msg = str(err)
    missing = [w for w in words if not re.search(w, msg)]
    assert not missing, f"message {msg!r} lacks {missing}"


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_input(case):
    a = _good()
    case.mutate(a, "cpu")
    with pytest.raises(RuntimeError) as info:
        nystrom_attention(
            a["query"], a["key"], a["value"], a["num_landmarks"], pinv_iterations=a["pinv_iterations"],
            pinv_init=a["pinv_init"], key_padding_mask=a["key_padding_mask"],
            query_padding_mask=a["query_padding_mask"], scale=a["scale"],
        )
    _check_message(info.value, case.words)


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.id)
def test_bad_input_meta(case):
    """The Meta kernel (shape inference for fake tensors, torch.compile, torch.export) refuses the same calls
    with the same words."""
    if case.data_dependent:
        pytest.skip("depends on tensor values, which the meta device does not have")
    a = _good("meta")
    case.mutate(a, "meta")
    with pytest.raises(RuntimeError) as info:
        _forward_op(a)
    _check_message(info.value, case.words)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_good_arguments_of_bad_input_tests_are_accepted(device):
    """The bad-input tests change one thing of these arguments: as they are, they must be valid."""
    out = _forward_op(_good(device))[0]
    assert out.shape == (2, 3, 7, 5) and out.device.type == device


def test_all_keys_masked_is_fine_when_the_element_has_no_query():
    """The all-keys-masked refusal concerns elements with real queries only."""
    a = _good()
    a["key_padding_mask"][1] = True
    a["query_padding_mask"][1] = True
    out = _forward_op(a)[0]
    assert torch.count_nonzero(out[1]) == 0
    assert_rel_close(out[:1], nystrom_reference(a["query"][:1], a["key"][:1], a["value"][:1], 3).float(), 1e-5)


def test_num_landmarks_far_above_the_lengths_is_exact_attention():
    q, k, v = make_qkv(1, 1, 5, 6, 4, 3)
    out = nystrom_attention(q, k, v, 2**40)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    # The saved per-landmark tensors have min(num_landmarks, max(L, S)) rows, not num_landmarks.
    saved = torch.ops.nystrom.nystrom_attention_forward(q, k, v, 2**40, 6, "per_head", None, None, None)
    assert saved[1].shape == (1, 1, 6, q.shape[-1])


# =============================================================================================
# Element counts beyond 32 bits
# =============================================================================================

BIG_D = 64
BIG_L = 2**31 // BIG_D + 5  # B*H*L*D > 2**31


def test_sizes_beyond_int32_meta():
    """Shape inference with element counts above 2**31 (meta tensors take no memory)."""
    q = torch.empty(1, 1, BIG_L, BIG_D, device="meta")
    k = torch.empty(1, 1, BIG_L, BIG_D, device="meta")
    v = torch.empty(1, 1, BIG_L, 3, device="meta")
    assert q.numel() > 2**31
    out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c = torch.ops.nystrom.nystrom_attention_forward(q, k, v, 7)
    assert out.shape == (1, 1, BIG_L, 3) and out.dtype == torch.float32
    assert q_lm.shape == k_lm.shape == (1, 1, 7, BIG_D)
    assert bv.shape == zbv.shape == (1, 1, 7, 3)
    assert lse_q.shape == (1, 1, BIG_L) and lse_l.shape == (1, 1, 7) and c.shape == (1, 1)
    grads = torch.ops.nystrom.nystrom_attention_backward(
        out, q, k, v, q_lm, k_lm, bv, zbv, lse_q, lse_l, c, 7, 6, "per_head", None, None, None)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    # many heads and batch elements instead of one long sequence; the output alone has > 2**31 elements
    q = torch.empty(2**11, 2**10, 1025, 2, device="meta")
    v = torch.empty(2**11, 2**10, 1025, 1, device="meta")
    kpm = torch.empty(2**11, 1025, dtype=torch.bool, device="meta")
    out = torch.ops.nystrom.nystrom_attention_forward(q, q, v, 3, 6, "original", kpm, kpm, 0.5)[0]
    assert out.shape == (2**11, 2**10, 1025, 1) and out.numel() > 2**31


def _sliding_windows(base: torch.Tensor, n: int, d: int) -> torch.Tensor:
    """(1, 1, n, d) view whose row i is base[i:i+d]: every row differs, n*d elements in n+d-1 of memory."""
    return base.as_strided((1, 1, n, d), (0, 0, 1, 1))


@pytest.mark.slow
def test_sizes_beyond_int32_cpu(request):
    """The CPU kernel on a query of B*H*L*D > 2**31 elements held in ~130 MiB (overlapping rows).

    Skipped by default: it streams 2**31 query elements through the kernel twice (landmarks, output),
    about 30 s on 2 shared cores, peak resident memory of the whole process about 1.6 GiB. A contiguous query of
    that size would need 8 GiB.
    """
    if not _run_slow(request):
        pytest.skip("slow (about 30 s): run with -m slow or NYSTROM_RUN_SLOW=1; the meta-device test covers "
                    "shape inference")
    L, D, S, Dv, m = BIG_L, BIG_D, 16, 2, 2
    g = torch.Generator().manual_seed(0)
    # A slow wave (so that the two query landmarks differ) plus noise (so that every row differs).
    base = torch.arange(L + D - 1, dtype=torch.float32).mul_(2 * math.pi / L).sin_().mul_(3)
    base.add_(torch.randn(L + D - 1, generator=g))
    q = _sliding_windows(base, L, D)
    k = torch.randn(1, 1, S, D, generator=g)
    v = torch.randn(1, 1, S, Dv, generator=g)
    assert q.numel() > 2**31
    with torch.no_grad():
        out = torch.ops.nystrom.nystrom_attention(q, k, v, m, 6, "per_head", None, None, None)
    assert out.shape == (1, 1, L, Dv)
    assert torch.isfinite(out).all()

    # The same math in float64 for a subset of rows: query landmarks from prefix sums of the base.
    scale = D ** -0.5
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(base, 0, dtype=torch.float64)])
    cols = torch.arange(D)
    bounds = [(j * L) // m for j in range(m + 1)]
    q_lm = torch.stack([(prefix[bounds[j + 1] + cols] - prefix[bounds[j] + cols]) / (bounds[j + 1] - bounds[j])
                        for j in range(m)])  # (m, D)
    k64, v64 = k[0].double(), v[0, 0].double()
    k_lm = landmarks(k64, m)[0]  # (m, D)
    a = torch.softmax(scale * q_lm @ k_lm.T, -1)
    bm = torch.softmax(scale * q_lm @ k64[0].T, -1)
    z = newton_schulz(a[None], max_column_sum(a[None]), 6)[0]
    w = z @ (bm @ v64)  # (m, Dv)
    boundary = 2**31 // D  # first row whose flat index r*D passes 2**31
    rows = torch.cat([torch.tensor([0, 1, 511, 512, L // 2 - 1, L // 2, boundary - 1, boundary, boundary + 1,
                                    L - 2, L - 1]),
                      torch.randint(0, L, (64,), generator=g)])
    q_rows = torch.stack([base[i:i + D] for i in rows.tolist()]).double()
    expected = torch.softmax(scale * q_rows @ k_lm.T, -1) @ w
    assert_rel_close(out[0, 0, rows], expected, 1e-3, "rows of a > 2**31-element query")


# =============================================================================================
# Valid edge cases, against the float64 reference
# =============================================================================================


def _check_against_reference(q, k, v, kw, grad_of=None, tol=F64_TOL, grad_tol=F64_GRAD_TOL, seed=0):
    """Forward (and, for the leaves in grad_of, backward) of the op against the reference, float64."""
    out = _call(q, k, v, kw)
    ref = nystrom_reference(q, k, v, **kw)
    assert out.shape == ref.shape
    assert_rel_close(out, ref, tol)
    if grad_of:
        g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
        got = torch.autograd.grad(out, grad_of, g)
        want = torch.autograd.grad(ref, grad_of, g)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_rel_close(a, b, grad_tol, f"gradient of input {i}")
    return out


def test_empty_batch():
    q, k, v = make_qkv(0, 2, 5, 6, 3, 4, requires_grad=True)
    kpm = torch.zeros(0, 6, dtype=torch.bool)
    out = nystrom_attention(q, k, v, 2, key_padding_mask=kpm, query_padding_mask=torch.zeros(0, 5, dtype=torch.bool))
    assert out.shape == (0, 2, 5, 4) and out.dtype == torch.float64
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


def test_zero_queries():
    q, k, v = make_qkv(2, 2, 0, 6, 3, 4, requires_grad=True)
    out = nystrom_attention(q, k, v, 2)
    assert out.shape == (2, 2, 0, 4)
    out.sum().backward()
    assert q.grad.shape == (2, 2, 0, 3)
    assert torch.count_nonzero(k.grad) == 0 and torch.count_nonzero(v.grad) == 0


def test_zero_queries_and_zero_keys():
    """S = 0 is refused only when there are queries."""
    q, k, v = make_qkv(2, 2, 0, 0, 3, 4)
    assert nystrom_attention(q, k, v, 2).shape == (2, 2, 0, 4)


def test_every_query_masked():
    q, k, v = make_qkv(2, 2, 6, 8, 3, 4, requires_grad=True)
    qpm = torch.ones(2, 6, dtype=torch.bool)
    out = nystrom_attention(q, k, v, 2, query_padding_mask=qpm)
    assert torch.count_nonzero(out) == 0
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.count_nonzero(t.grad) == 0


@pytest.mark.parametrize(
    "B,H,L,S,D,Dv,m",
    [
        (2, 2, 1, 10, 3, 4, 3),  # L = 1: one query, Nyström path (S_b > m) with one query landmark
        (2, 2, 1, 1, 3, 4, 3),  # L = S = 1: exact
        (2, 2, 10, 1, 3, 4, 3),  # S = 1: one key landmark
        (2, 3, 9, 11, 5, 2, 1),  # m = 1: A is 1x1
        (2, 3, 600, 530, 3, 2, 1),  # m = 1 over several tiles
        (2, 2, 9, 11, 5, 3, 11),  # m = max(L, S): exact
        (2, 2, 9, 11, 5, 3, 12),  # m > L, S: exact
        (1, 1, 13, 13, 1, 1, 4),  # D = Dv = 1
    ],
    ids=["L1", "L1_S1", "S1", "m1", "m1_multi_tile", "m_eq_n", "m_gt_n", "D1_Dv1"],
)
def test_small_and_degenerate_shapes(B, H, L, S, D, Dv, m):
    q, k, v = make_qkv(B, H, L, S, D, Dv, requires_grad=True, seed=3)
    out = _check_against_reference(q, k, v, dict(num_landmarks=m), grad_of=(q, k, v))
    if m >= max(L, S):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert_rel_close(out, expected, 1e-12, "exact attention")


def test_m_ge_n_per_element_with_masks():
    """m covers some elements (exact) and not others (Nyström) in one batch."""
    q, k, v = make_qkv(3, 2, 12, 12, 4, 3, requires_grad=True, seed=4)
    kpm = torch.zeros(3, 12, dtype=torch.bool)
    kpm[0, 5:] = True
    qpm = torch.zeros(3, 12, dtype=torch.bool)
    qpm[0, 4:] = True
    qpm[2, :11] = True  # one query left, 12 keys > m
    _check_against_reference(q, k, v, dict(num_landmarks=5, key_padding_mask=kpm, query_padding_mask=qpm),
                             grad_of=(q, k, v))


def test_expanded_inputs():
    """Stride-0 inputs: the same query for every head, the same key/value for every batch element."""
    g = torch.Generator().manual_seed(5)
    qb = torch.randn(2, 1, 40, 6, dtype=torch.float64, generator=g, requires_grad=True)
    kb = torch.randn(1, 3, 50, 6, dtype=torch.float64, generator=g, requires_grad=True)
    vb = torch.randn(1, 3, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    vn = torch.randn(1, 3, 50, 4, dtype=torch.float64, generator=g)
    q = qb.expand(2, 3, 40, 6)
    k = kb.expand(2, 3, 50, 6)
    v = vb.expand(2, 3, 50, 4) + vn  # the sum is contiguous; expanded rows of v below
    v_rows = vb.expand(2, 3, 50, 4)
    for vv in (v, v_rows):
        _check_against_reference(q, k, vv, dict(num_landmarks=7), grad_of=(qb, kb, vb))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(6)
    # transposed storage, every other row, a slice of the feature dimension
    q = torch.randn(2, 3, 5, 37, dtype=torch.float64, generator=g).transpose(-1, -2)[..., :, :4]  # (2,3,37,4)
    k = torch.randn(2, 3, 106, 4, dtype=torch.float64, generator=g)[:, :, ::2]  # (2,3,53,4)
    v = torch.randn(3, 2, 53, 12, dtype=torch.float64, generator=g).permute(1, 0, 2, 3)[..., 1::2]  # (2,3,53,6)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    for t in (q, k, v):
        t.requires_grad_(True)
    kpm = middle_mask(2, 53, [(3, 9), (40, 53)])
    out = _check_against_reference(q, k, v, dict(num_landmarks=6, key_padding_mask=kpm), grad_of=(q, k, v))
    contiguous = nystrom_attention(q.contiguous(), k.contiguous(), v.contiguous(), 6, key_padding_mask=kpm)
    torch.testing.assert_close(out, contiguous, rtol=1e-13, atol=1e-13)


def test_non_contiguous_masks():
    q, k, v = make_qkv(2, 2, 9, 12, 3, 4, seed=7)
    kpm = torch.zeros(12, 2, dtype=torch.bool)
    kpm[3:6, 0] = True
    kpm[10:, 1] = True
    kpm = kpm.T  # non-contiguous (B, S)
    qpm = torch.zeros(1, 9, dtype=torch.bool).expand(2, 9)  # stride 0 along B
    kw = dict(num_landmarks=4, key_padding_mask=kpm, query_padding_mask=qpm)
    _check_against_reference(q, k, v, kw)


@pytest.mark.parametrize(
    "wants",
    [("value",), ("query",), ("key",), ("query", "value"), ("key", "value"), ("query", "key", "value")],
    ids=lambda w: "+".join(w),
)
def test_only_some_inputs_require_grad(wants):
    q, k, v = make_qkv(2, 2, 30, 25, 4, 3, seed=8)
    inputs = dict(query=q, key=k, value=v)
    for name in wants:
        inputs[name].requires_grad_(True)
    kpm = middle_mask(2, 25, [(4, 9), (0, 0)])
    kw = dict(num_landmarks=5, key_padding_mask=kpm)
    out = nystrom_attention(q, k, v, **kw)
    assert out.requires_grad
    g = torch.randn_like(out)
    out.backward(g)
    q2, k2, v2 = (t.detach().requires_grad_(True) for t in (q, k, v))
    ref = nystrom_reference(q2, k2, v2, **kw)
    ref.backward(g)
    for name, t, t2 in (("query", q, q2), ("key", k, k2), ("value", v, v2)):
        if name in wants:
            assert t.grad is not None, f"{name} requires grad but got none"
            assert_rel_close(t.grad, t2.grad, F64_GRAD_TOL, f"gradient of {name}")
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


def test_no_input_requires_grad():
    q, k, v = make_qkv(2, 2, 8, 8, 4, 3)
    out = nystrom_attention(q, k, v, 3)
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
def test_padding_in_the_middle(pinv_init):
    q, k, v = make_qkv(3, 2, 45, 60, 5, 4, requires_grad=True, seed=9)
    kpm = middle_mask(3, 60, [(10, 30), (0, 1), (59, 60)])
    qpm = middle_mask(3, 45, [(20, 21), (5, 40), (0, 0)])
    kw = dict(num_landmarks=6, pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm)
    out = _check_against_reference(q, k, v, kw, grad_of=(q, k, v))
    assert torch.count_nonzero(out.detach()[qpm[:, None, :, None].expand_as(out)]) == 0


def _poison(x: torch.Tensor, mask: torch.Tensor, values) -> torch.Tensor:
    """x with the rows of padded positions (mask (B, n), True = padding) set to values (cycled)."""
    y = x.detach().clone()
    rows = mask[:, None, :, None].expand(y.shape[0], y.shape[1], y.shape[2], 1).squeeze(-1)
    idx = rows.nonzero()
    for i, (b, h, r) in enumerate(idx.tolist()):
        y[b, h, r] = values[i % len(values)]
    return y.requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("m,pinv_init", [(4, "per_head"), (4, "original"), (64, "per_head")],
                         ids=["nystrom", "nystrom_original", "exact"])
def test_non_finite_values_in_padding_do_not_leak(m, pinv_init, dtype):
    """NaN and Inf at padded positions of q, k, v reach neither the outputs nor the gradients of real
    tokens: outputs equal those of the clean call, gradients at real positions too, and gradients at
    padded positions are exactly 0."""
    B, H, L, S, D, Dv = 2, 2, 37, 41, 5, 3
    q, k, v = make_qkv(B, H, L, S, D, Dv, dtype=dtype, seed=10)
    kpm = middle_mask(B, S, [(3, 9), (30, 41)])
    qpm = middle_mask(B, L, [(0, 2), (17, 25)])
    bad = [math.nan, math.inf, -math.inf]
    dirty = (_poison(q, qpm, bad), _poison(k, kpm, bad), _poison(v, kpm, bad))
    clean = tuple(t.detach().clone().requires_grad_(True) for t in (q, k, v))
    kw = dict(num_landmarks=m, pinv_init=pinv_init, key_padding_mask=kpm, query_padding_mask=qpm)
    g = torch.randn(B, H, L, Dv).to(dtype)
    out_dirty = nystrom_attention(*dirty, **kw)
    out_clean = nystrom_attention(*clean, **kw)
    assert torch.isfinite(out_dirty).all()
    assert torch.equal(out_dirty, out_clean)
    out_dirty.backward(g)
    out_clean.backward(g)
    for name, d, c, mask in (("query", dirty[0], clean[0], qpm), ("key", dirty[1], clean[1], kpm),
                             ("value", dirty[2], clean[2], kpm)):
        padded = mask[:, None, :, None].expand_as(d.grad)
        assert torch.isfinite(d.grad).all(), f"non-finite gradient of {name}"
        assert torch.count_nonzero(d.grad[padded]) == 0, f"gradient of {name} at padded positions must be 0"
        assert torch.equal(d.grad, c.grad), f"gradient of {name} changed by values in the padding"


def test_large_magnitude_inputs_stay_finite():
    """Logits of ~1e4 (sharp softmax) must not overflow: the softmax statistics are shifted."""
    q, k, v = make_qkv(2, 2, 50, 70, 8, 3, std=40.0, seed=11, requires_grad=True)
    out = nystrom_attention(q.float(), k.float(), v.float(), 5)
    assert torch.isfinite(out).all()
    _check_against_reference(q, k, v, dict(num_landmarks=5), grad_of=(q, k, v), tol=1e-7, grad_tol=1e-5)


# =============================================================================================
# Property fuzzing
# =============================================================================================


def _fuzz_case(draw_seed, B, H, L, S, D, Dv, m, iterations, pinv_init, scale, key_p, query_p):
    g = torch.Generator().manual_seed(draw_seed)
    q, k, v = make_qkv(B, H, L, S, D, Dv, seed=draw_seed)
    kpm = torch.rand(B, S, generator=g) < key_p
    qpm = torch.rand(B, L, generator=g) < query_p
    # Every element keeps at least one real key. (The library also accepts an element with neither real
    # queries nor real keys, see test_all_keys_masked_is_fine_when_the_element_has_no_query, but the
    # reference asserts S_b > 0 for every element.)
    for b in range(B):
        if kpm[b].all():
            kpm[b, int(torch.randint(0, S, (1,), generator=g))] = False
    kw = dict(num_landmarks=m, pinv_iterations=iterations, pinv_init=pinv_init, scale=scale)
    if key_p > 0:
        kw["key_padding_mask"] = kpm
    if query_p > 0:
        kw["query_padding_mask"] = qpm
    return q, k, v, kw


def _check_padding_invariance(q, k, v, out, kw, tol):
    """per_head: the real rows of each element equal a call on that element with its padding removed."""
    kpm, qpm = kw.get("key_padding_mask"), kw.get("query_padding_mask")
    B, _, L, _ = q.shape
    S = k.shape[2]
    for b in range(B):
        qi = (~qpm[b]).nonzero().flatten() if qpm is not None else torch.arange(L)
        ki = (~kpm[b]).nonzero().flatten() if kpm is not None else torch.arange(S)
        if qi.numel() == 0:
            continue
        alone = nystrom_attention(q[b:b + 1, :, qi], k[b:b + 1, :, ki], v[b:b + 1, :, ki],
                                  kw["num_landmarks"], pinv_iterations=kw["pinv_iterations"],
                                  pinv_init="per_head", scale=kw["scale"])
        err = rel_err(out[b:b + 1, :, qi], alone)
        assert err <= tol, f"padding changed element {b}: relative difference {err:.3e}"


def _given_fuzz(max_examples):
    def wrap(f):
        if hypothesis is None:
            return pytest.mark.skip(reason="hypothesis is not installed")(f)
        return hypothesis.settings(
            max_examples=max_examples, deadline=None, derandomize=True, print_blob=True,
            suppress_health_check=[HealthCheck.too_slow],
        )(hypothesis.given(
            B=st.integers(1, 3), H=st.integers(1, 3), L=st.integers(1, 70), S=st.integers(1, 70),
            D=st.integers(1, 17), Dv=st.integers(1, 17), m=st.integers(1, 20), iterations=st.integers(0, 8),
            pinv_init=st.sampled_from(["per_head", "original"]),
            scale=st.one_of(st.none(), st.floats(0.05, 1.5)),
            key_p=st.sampled_from([0.0, 0.2, 0.6, 0.95]), query_p=st.sampled_from([0.0, 0.2, 0.6, 0.95]),
            seed=st.integers(0, 2**31 - 1),
        )(f))
    return wrap


@_given_fuzz(max_examples=120)
def test_fuzz_float64(B, H, L, S, D, Dv, m, iterations, pinv_init, scale, key_p, query_p, seed):
    q, k, v, kw = _fuzz_case(seed, B, H, L, S, D, Dv, m, iterations, pinv_init, scale, key_p, query_p)
    note(f"key_padding_mask={kw.get('key_padding_mask')}\nquery_padding_mask={kw.get('query_padding_mask')}")
    for t in (q, k, v):
        t.requires_grad_(True)
    out = nystrom_attention(q, k, v, **kw)
    assert out.shape == (B, H, L, Dv) and out.dtype == torch.float64
    ref = nystrom_reference(q, k, v, **kw)
    assert_rel_close(out, ref, F64_TOL)
    gout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, (q, k, v), gout)
    want = torch.autograd.grad(ref, (q, k, v), gout)
    for name, a, b in zip(("query", "key", "value"), got, want):
        # |grad| can be tiny compared to its rounding when pinv_iterations amplifies: relative to the larger
        assert_rel_close(a, b, F64_GRAD_TOL, f"gradient of {name}")
    if pinv_init == "per_head":
        _check_padding_invariance(q.detach(), k.detach(), v.detach(), out.detach(), kw, 1e-11)


@_given_fuzz(max_examples=80)
def test_fuzz_float32(B, H, L, S, D, Dv, m, iterations, pinv_init, scale, key_p, query_p, seed):
    """float32 against the float64 reference; the tolerance follows the rounding error of the same math
    done in float32 (the reference with compute_dtype=float32), which Newton–Schulz can amplify."""
    q, k, v, kw = _fuzz_case(seed, B, H, L, S, D, Dv, m, iterations, pinv_init, scale, key_p, query_p)
    note(f"key_padding_mask={kw.get('key_padding_mask')}\nquery_padding_mask={kw.get('query_padding_mask')}")
    q32, k32, v32 = q.float(), k.float(), v.float()
    out = nystrom_attention(q32, k32, v32, **kw)
    assert out.shape == (B, H, L, Dv) and out.dtype == torch.float32
    ref = nystrom_reference(q32, k32, v32, **kw)
    rounding = rel_err(nystrom_reference(q32, k32, v32, compute_dtype=torch.float32, **kw), ref)
    note(f"float32 reference vs float64 reference: {rounding:.3e}")
    assert_rel_close(out, ref, max(2e-5, 20 * rounding))
    if pinv_init == "per_head":
        _check_padding_invariance(q32, k32, v32, out, kw, max(1e-5, 20 * rounding))


# =============================================================================================
# Concurrency and determinism
# =============================================================================================


def _work(seed, dtype=torch.float32):
    """One forward + backward on inputs that span several row tiles and batch elements."""
    q, k, v = make_qkv(2, 2, 600, 540, 8, 4, dtype=dtype, seed=seed, requires_grad=True)
    kpm = middle_mask(2, 540, [(100, 140), (530, 540)])
    qpm = middle_mask(2, 600, [(0, 3), (510, 530)])
    init = "original" if seed % 2 else "per_head"
    out = nystrom_attention(q, k, v, 9, pinv_init=init, key_padding_mask=kpm, query_padding_mask=qpm)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    return (out.detach(), *grads)


def _assert_bitwise(a, b, what):
    for name, x, y in zip(("output", "grad query", "grad key", "grad value"), a, b):
        assert torch.equal(x, y), f"{what}: {name} differs (max |diff| {(x - y).abs().max().item():.3e})"


def test_concurrent_calls_match_serial_calls():
    seeds = list(range(12))
    serial = [_work(s) for s in seeds]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(_work, seeds))
    for s, a, b in zip(seeds, serial, parallel):
        _assert_bitwise(a, b, f"seed {s}, 8 Python threads vs serial")


def test_concurrent_calls_on_shared_inputs():
    """Many threads on the very same tensors (read-only inputs, one autograd graph each)."""
    q, k, v = make_qkv(2, 2, 600, 600, 8, 8, dtype=torch.float32, seed=12, requires_grad=True)

    def work(_):
        out = nystrom_attention(q, k, v, 7)
        return (out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    first = work(0)
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(12)))
    for r in results:
        _assert_bitwise(first, r, "shared inputs, 8 Python threads")


def test_concurrent_errors_do_not_poison_other_calls():
    """Threads whose calls fail (bad arguments) run next to threads whose calls succeed."""
    expected = _work(3)

    def work(i):
        if i % 2:
            with pytest.raises(RuntimeError, match="num_landmarks"):
                nystrom_attention(*make_qkv(1, 1, 4, 4, 2), 0)
            return None
        return _work(3)

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(16)))
    for r in results:
        if r is not None:
            _assert_bitwise(expected, r, "next to failing calls")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_repeated_calls_are_bitwise_equal(dtype):
    first = _work(5, dtype)
    for _ in range(3):
        _assert_bitwise(first, _work(5, dtype), "repeated call, same thread count")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_thread_counts(dtype):
    """1 thread vs the default: the same up to rounding (the BLAS may split products differently, so not
    bitwise); each thread count bitwise reproducible."""
    threads = torch.get_num_threads()
    tol = 2e-6 if dtype == torch.float32 else 1e-13
    try:
        torch.set_num_threads(1)
        one = _work(6, dtype)
        one_again = _work(6, dtype)
        torch.set_num_threads(threads)
        many = _work(6, dtype)
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise(one, one_again, "1 thread, repeated")
    for name, a, b in zip(("output", "grad query", "grad key", "grad value"), one, many):
        err = rel_err(b, a)
        assert err <= tol, f"{name}: 1 vs {threads} threads differ by {err:.3e} (relative)"
