"""Bad input: one table, every API, every device.

Each case changes one thing of valid arguments (good_args) and lists regexes that must all occur in the error
message: the argument, what was expected, what came. Every case runs through the Python wrapper, the
torch.ops entry, the forward op, on every test device; the Meta kernels (shape inference for fake tensors,
torch.compile, torch.export) refuse the same calls, all-meta, with the same words (except the case that
depends on tensor values, which meta tensors do not have); the nn layer refuses the cases that concern what
it passes on (its key_padding_mask, its options).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch

from helpers import DEVICES, assert_rel_close, make_qkv, torch_device
from reference import nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")

B, H, L, S, D, DV, M = 2, 3, 7, 9, 4, 5, 3
ANY_TWO_DEVICES = r"\b(cpu|cuda|meta)(:\d+)?\b.*\b(cpu|cuda|meta)(:\d+)?\b"  # both devices are named


def good_args(device) -> Dict:
    """Valid arguments (B=2, H=3, L=7, S=9, D=4, Dv=5, m=3) on the device; every case changes one thing."""
    dev = torch_device(device)
    q, k, v = make_qkv(B, H, L, S, D, DV, dtype=torch.float32, seed=1)
    return dict(
        query=q.to(dev), key=k.to(dev), value=v.to(dev), num_landmarks=M, pinv_iterations=6, pinv_init="per_head",
        key_padding_mask=torch.zeros(B, S, dtype=torch.bool, device=dev),
        query_padding_mask=torch.zeros(B, L, dtype=torch.bool, device=dev), scale=None,
    )


class Where(NamedTuple):
    """Where a case's tensors go: the device of the call, and the other device of a device-mismatch case."""

    device: torch.device
    other: torch.device

    def elsewhere(self, t: torch.Tensor) -> torch.Tensor:
        """t on the other device (a meta tensor has no data to copy: zeros instead)."""
        if t.device.type == "meta" or self.other.type == "meta":
            return torch.zeros(t.shape, dtype=t.dtype, device=self.other)
        return t.to(self.other)


class Bad(NamedTuple):
    id: str
    mutate: Callable[[Dict, Where], None]  # changes the arguments of a call on where.device
    words: List[str]
    data_dependent: bool = False  # needs tensor values: not checkable on the meta device


def _set(**changes):
    def mutate(a, w):
        for name, f in changes.items():
            a[name] = f(a, w)
    return mutate


def _all(fn):
    """The same change of query, key and value."""
    return _set(**{n: (lambda a, w, n=n: fn(a[n])) for n in ("query", "key", "value")})


def _mask(*shape, dtype=torch.bool):
    return lambda a, w: torch.zeros(*shape, dtype=dtype, device=w.device)


def _mask_all_keys_of_element_1(a, w):
    a["key_padding_mask"][1] = True


BAD = [
    # wrong rank
    Bad("query_rank_3", _set(query=lambda a, w: a["query"][0]),
        [r"\bquery\b", r"4-D", r"\(B, H, L, D\)", r"got shape \[3, 7, 4\]"]),
    Bad("query_rank_5", _set(query=lambda a, w: a["query"].unsqueeze(0)),
        [r"\bquery\b", r"4-D", r"got shape \[1, 2, 3, 7, 4\]"]),
    Bad("key_rank_3", _set(key=lambda a, w: a["key"][0]), [r"\bkey\b", r"4-D", r"\(B, H, S, D\)", r"\[3, 9, 4\]"]),
    Bad("key_rank_5", _set(key=lambda a, w: a["key"].unsqueeze(0)), [r"\bkey\b", r"4-D", r"\[1, 2, 3, 9, 4\]"]),
    Bad("value_rank_3", _set(value=lambda a, w: a["value"][..., 0]),
        [r"\bvalue\b", r"4-D", r"\(B, H, S, Dv\)", r"\[2, 3, 9\]"]),
    Bad("value_rank_2", _set(value=lambda a, w: a["value"][0, 0]), [r"\bvalue\b", r"4-D", r"\[9, 5\]"]),
    # mismatched batch, heads, lengths, head dims
    Bad("key_batch", _set(key=lambda a, w: a["key"][:1]),
        [r"\bkey\b", r"same batch size", r"\(B, H\)", r"\[1, 3, 9, 4\]"]),
    Bad("value_batch", _set(value=lambda a, w: a["value"][:1]), [r"\bvalue\b", r"same batch size", r"\[1, 3, 9, 5\]"]),
    Bad("key_heads", _set(key=lambda a, w: a["key"][:, :2]), [r"\bkey\b", r"number of heads", r"\[2, 2, 9, 4\]"]),
    Bad("value_heads", _set(value=lambda a, w: a["value"][:, :1]),
        [r"\bvalue\b", r"number of heads", r"\[2, 1, 9, 5\]"]),
    Bad("value_length_vs_key", _set(value=lambda a, w: a["value"][:, :, :8]),
        [r"\bvalue\b", r"same length S as key", r"\[2, 3, 9, 4\]", r"\[2, 3, 8, 5\]"]),
    Bad("key_length_vs_value", _set(key=lambda a, w: torch.cat([a["key"], a["key"][:, :, :1]], 2)),
        [r"\bvalue\b", r"same length S as key", r"\[2, 3, 10, 4\]"]),
    Bad("key_head_dim_vs_query", _set(key=lambda a, w: a["key"][..., :3]),
        [r"\bkey\b", r"same head dimension D as query", r"\[2, 3, 7, 4\]", r"\[2, 3, 9, 3\]"]),
    # dtypes
    Bad("key_float64", _set(key=lambda a, w: a["key"].double()),
        [r"\bkey\b", r"same dtype as query", r"Float", r"Double"]),
    Bad("value_float16", _set(value=lambda a, w: a["value"].half()),
        [r"\bvalue\b", r"same dtype as query", r"Float", r"Half"]),
    Bad("query_bfloat16", _set(query=lambda a, w: a["query"].bfloat16()),
        [r"\bkey\b", r"same dtype as query", r"BFloat16", r"Float"]),
    Bad("all_int64", _all(lambda t: t.long()),
        [r"\bquery\b", r"floating-point", r"float32, float64, float16 or bfloat16", r"Long"]),
    Bad("all_int32", _all(lambda t: t.int()), [r"\bquery\b", r"floating-point", r"Int"]),
    Bad("all_uint8", _all(lambda t: t.to(torch.uint8)), [r"\bquery\b", r"floating-point", r"Byte"]),
    Bad("all_bool", _all(lambda t: t > 0), [r"\bquery\b", r"floating-point", r"Bool"]),
    Bad("all_complex", _all(lambda t: t.to(torch.complex64)), [r"\bquery\b", r"floating-point", r"ComplexFloat"]),
    Bad("key_int64", _set(key=lambda a, w: a["key"].long()), [r"\bkey\b", r"same dtype as query", r"Long"]),
    # devices: the odd tensor on the test device's other_device (meta for the CPU), on the CPU for a meta call
    Bad("key_other_device", _set(key=lambda a, w: w.elsewhere(a["key"])),
        [r"\bkey\b", r"same device as query", ANY_TWO_DEVICES]),
    Bad("value_other_device", _set(value=lambda a, w: w.elsewhere(a["value"])),
        [r"\bvalue\b", r"same device as query", ANY_TWO_DEVICES]),
    Bad("query_other_device", _set(query=lambda a, w: w.elsewhere(a["query"])),
        [r"\bkey\b", r"same device as query", ANY_TWO_DEVICES]),  # the others are then the odd ones
    # options
    Bad("num_landmarks_0", _set(num_landmarks=lambda a, w: 0), [r"num_landmarks", r">= 1", r"got 0\b"]),
    Bad("num_landmarks_negative", _set(num_landmarks=lambda a, w: -5), [r"num_landmarks", r">= 1", r"got -5\b"]),
    Bad("pinv_iterations_negative", _set(pinv_iterations=lambda a, w: -1),
        [r"pinv_iterations", r">= 0", r"got -1\b"]),
    Bad("pinv_init_unknown", _set(pinv_init=lambda a, w: "exact"),
        [r"pinv_init", r'"per_head"', r'"original"', r'got "exact"']),
    Bad("pinv_init_wrong_case", _set(pinv_init=lambda a, w: "Per_Head"), [r"pinv_init", r'got "Per_Head"']),
    Bad("pinv_init_empty", _set(pinv_init=lambda a, w: ""), [r"pinv_init", r'got ""']),
    Bad("scale_nan", _set(scale=lambda a, w: math.nan), [r"\bscale\b", r"finite", r"> 0", r"got nan"]),
    Bad("scale_inf", _set(scale=lambda a, w: math.inf), [r"\bscale\b", r"finite", r"> 0", r"got inf"]),
    Bad("scale_minus_inf", _set(scale=lambda a, w: -math.inf), [r"\bscale\b", r"finite", r"got -inf"]),
    Bad("scale_0", _set(scale=lambda a, w: 0.0), [r"\bscale\b", r"> 0", r"got 0\b"]),
    Bad("scale_minus_1", _set(scale=lambda a, w: -1.0), [r"\bscale\b", r"> 0", r"got -1\b"]),
    # masks: shape, dtype, device
    Bad("key_mask_length", _set(key_padding_mask=_mask(2, 10)),
        [r"key_padding_mask", r"shape \(B, S\) = \(2, 9\)", r"got \[2, 10\]"]),
    Bad("key_mask_batch", _set(key_padding_mask=_mask(3, 9)),
        [r"key_padding_mask", r"\(B, S\) = \(2, 9\)", r"got \[3, 9\]"]),
    Bad("key_mask_rank_3", _set(key_padding_mask=_mask(2, 1, 9)), [r"key_padding_mask", r"\(B, S\)", r"got \[2, 1, 9\]"]),
    Bad("key_mask_rank_1", _set(key_padding_mask=_mask(9)), [r"key_padding_mask", r"\(B, S\)", r"got \[9\]"]),
    Bad("query_mask_length", _set(query_padding_mask=_mask(2, 9)),
        [r"query_padding_mask", r"shape \(B, L\) = \(2, 7\)", r"got \[2, 9\]"]),
    Bad("query_mask_batch", _set(query_padding_mask=_mask(3, 7)),
        [r"query_padding_mask", r"\(B, L\) = \(2, 7\)", r"got \[3, 7\]"]),
    Bad("query_mask_rank_4", _set(query_padding_mask=_mask(2, 1, 1, 7)),
        [r"query_padding_mask", r"\(B, L\) = \(2, 7\)", r"got \[2, 1, 1, 7\]"]),
    Bad("key_mask_float", _set(key_padding_mask=_mask(2, 9, dtype=torch.float32)),
        [r"key_padding_mask", r"bool", r"got dtype Float"]),
    Bad("key_mask_int", _set(key_padding_mask=_mask(2, 9, dtype=torch.int64)),
        [r"key_padding_mask", r"bool", r"got dtype Long"]),
    Bad("query_mask_float", _set(query_padding_mask=_mask(2, 7, dtype=torch.float64)),
        [r"query_padding_mask", r"bool", r"got dtype Double"]),
    Bad("query_mask_uint8", _set(query_padding_mask=_mask(2, 7, dtype=torch.uint8)),
        [r"query_padding_mask", r"bool", r"got dtype Byte"]),
    Bad("query_mask_int", _set(query_padding_mask=_mask(2, 7, dtype=torch.int64)),
        [r"query_padding_mask", r"bool", r"got dtype Long"]),
    Bad("key_mask_other_device", _set(key_padding_mask=lambda a, w: w.elsewhere(a["key_padding_mask"])),
        [r"key_padding_mask", r"same device as query", ANY_TWO_DEVICES]),
    Bad("query_mask_other_device", _set(query_padding_mask=lambda a, w: w.elsewhere(a["query_padding_mask"])),
        [r"query_padding_mask", r"same device as query", ANY_TWO_DEVICES]),
    # keys: none at all, or all of one batch element masked, while there are queries
    Bad("all_keys_masked", _mask_all_keys_of_element_1,
        [r"key_padding_mask", r"every key", r"batch element 1\b", r"at least one real key"], data_dependent=True),
    Bad("zero_keys_with_queries",
        _set(key=lambda a, w: a["key"][:, :, :0], value=lambda a, w: a["value"][:, :, :0],
             key_padding_mask=lambda a, w: None),
        [r"\bkey\b", r"S >= 1", r"\[2, 3, 0, 4\]"]),
]
BAD_IDS = [c.id for c in BAD]
assert len(set(BAD_IDS)) == len(BAD_IDS)


def bad_args(case: Bad, device) -> Dict:
    """good_args on the device with the case's change."""
    dev = torch_device(device)
    other = torch.device("cpu") if dev.type == "meta" else torch_device(DEVICES[device.name].other_device)
    a = good_args(dev)
    case.mutate(a, Where(dev, other))
    return a


# ---------------------------------------------------------------------------------------------
# The APIs
# ---------------------------------------------------------------------------------------------


def _python(a):
    return torch_nystrom.nystrom_attention(
        a["query"], a["key"], a["value"], a["num_landmarks"], pinv_iterations=a["pinv_iterations"],
        pinv_init=a["pinv_init"], key_padding_mask=a["key_padding_mask"],
        query_padding_mask=a["query_padding_mask"], scale=a["scale"])


def _ops(a):
    return torch.ops.nystrom.nystrom_attention(*a.values())


def _forward(a):
    return torch.ops.nystrom.nystrom_attention_forward(*a.values())[0]


APIS = {"python": _python, "ops": _ops, "forward": _forward}


def check_message(err: BaseException, words: List[str]):
    msg = str(err)
    missing = [w for w in words if not re.search(w, msg)]
    assert not missing, f"message {msg!r} lacks {missing}"


@pytest.mark.parametrize("case", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("api", list(APIS))
def test_bad_input(api, case, device):
    if case.data_dependent and not device.checks_data:
        pytest.skip(f"{device}: bad values are not read back (no host sync); test_all_keys_masked_gives_nan_rows")
    a = bad_args(case, device)
    with pytest.raises(RuntimeError) as info:
        APIS[api](a)
    check_message(info.value, case.words)


@pytest.mark.parametrize("api", list(APIS))
def test_all_keys_masked_gives_nan_rows(api, device):
    """Where the backend does not read the masks back (the CUDA backend: a host synchronisation per call would
    stall it and break CUDA-graph capture), an element whose keys are all masked gets NaN in its real query rows
    (its softmax has no key), and the other elements are unchanged (docs/DESIGN.md §3)."""
    if device.checks_data:
        pytest.skip(f"{device} refuses the call (test_bad_input[all_keys_masked])")
    case = next(c for c in BAD if c.id == "all_keys_masked")
    a = bad_args(case, device)
    a["query_padding_mask"][1, 5:] = True  # padded query rows stay 0
    out = APIS[api](a).cpu()
    assert torch.isnan(out[1, :, :5]).all(), "real query rows of the element without keys must be NaN"
    assert torch.count_nonzero(out[1, :, 5:]) == 0, "padded query rows must stay 0"
    alone = dict(a)
    for n in ("query", "key", "value", "key_padding_mask", "query_padding_mask"):
        alone[n] = a[n][:1]
    torch.testing.assert_close(out[:1], APIS[api](alone).cpu(), rtol=1e-6, atol=1e-6)
    if api != "forward":
        q, k, v = (a[n].detach().clone().requires_grad_(True) for n in ("query", "key", "value"))
        o = APIS[api](dict(a, query=q, key=k, value=v))
        o.backward(torch.ones_like(o))
        assert torch.isnan(q.grad[1, :, :5]).all() and torch.count_nonzero(q.grad[1, :, 5:]) == 0
        assert torch.count_nonzero(k.grad[1]) == 0 and torch.count_nonzero(v.grad[1]) == 0
        assert torch.isfinite(q.grad[0]).all()


@pytest.mark.parametrize("case", [c for c in BAD if not c.data_dependent], ids=lambda c: c.id)
def test_bad_input_meta(case):
    """The Meta kernel refuses the same calls, all-meta, with the same words."""
    a = good_args("meta")
    case.mutate(a, Where(torch.device("meta"), torch.device("cpu")))
    with pytest.raises(RuntimeError) as info:
        _forward(a)
    check_message(info.value, case.words)


def _layer_change(case: Bad):
    """What the case changes of what the nn layer passes on: ("mask",), ("option", name, value), or None."""
    a = good_args("cpu")
    before = dict(a)
    case.mutate(a, Where(torch.device("cpu"), torch.device("meta")))
    changed = [n for n in a if a[n] is not before[n]]  # (an in-place change, all_keys_masked, changes nothing here:
    #                                                    it is no error for the layer, whose queries are masked too)
    if changed == ["key_padding_mask"]:
        return ("mask",)
    if len(changed) == 1 and changed[0] in ("num_landmarks", "pinv_iterations", "pinv_init"):
        return ("option", changed[0], a[changed[0]])
    return None


LAYER_CASES = [c for c in BAD if _layer_change(c) is not None]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.id)
def test_bad_input_nn_layer(case, device):
    """NystromAttention passes x's heads as query, key and value, its key_padding_mask as both masks: a bad mask
    fails in its forward, a bad option when it is made, with the op's words."""
    change = _layer_change(case)
    options = dict(num_landmarks=M, pinv_iterations=6, pinv_init="per_head")
    x = torch.randn(B, S, 2 * H, device=device.torch)
    with pytest.raises((RuntimeError, ValueError)) as info:
        if change[0] == "option":
            options[change[1]] = change[2]
        layer = torch_nystrom.NystromAttention(2 * H, H, **options).to(device.torch)
        layer(x, bad_args(case, device)["key_padding_mask"])
    check_message(info.value, case.words)


@pytest.mark.parametrize("api", list(APIS))
def test_good_arguments_of_bad_input_tests_are_accepted(api, device):
    """The bad-input tests change one thing of these arguments: as they are, they must be valid."""
    out = APIS[api](good_args(device))
    assert out.shape == (B, H, L, DV) and out.device.type == device.type
    layer = torch_nystrom.NystromAttention(2 * H, H, M).to(device.torch)
    assert layer(torch.randn(B, S, 2 * H, device=device.torch), good_args(device)["key_padding_mask"]).shape == (B, S, 2 * H)


def test_good_arguments_of_bad_input_tests_are_accepted_meta():
    out = _forward(good_args("meta"))
    assert out.shape == (B, H, L, DV) and out.device.type == "meta"


def test_all_keys_masked_is_fine_when_the_element_has_no_query(device):
    """The all-keys-masked refusal concerns elements with real queries only."""
    a = good_args(device)
    a["key_padding_mask"][1] = True
    a["query_padding_mask"][1] = True
    out = _forward(a)
    assert torch.count_nonzero(out[1]) == 0
    ref = nystrom_reference(a["query"][:1].cpu(), a["key"][:1].cpu(), a["value"][:1].cpu(), M)
    assert_rel_close(out[:1], ref.float(), 1e-5)
