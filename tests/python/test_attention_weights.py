"""torch_nystrom.attention_weights: the rows F[rows]·Z·Bm of the attention the op applies.

Checked against a float64 reference built here from reference.py's pieces (per batch element,
padding dropped, every matrix explicit), against the op itself (``W @ v`` equals the op's output
rows), for memory (no L x S intermediate beyond the requested rows), and for its argument checks.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import torch_nystrom
from torch_nystrom import attention_weights

from helpers import assert_rel_close, make_qkv, random_mask, trailing_mask
from reference import landmarks, max_column_sum, newton_schulz

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def reference_weights(q, k, m, *, pinv_init="per_head", key_padding_mask=None, query_padding_mask=None, scale=None):
    """(B, H, L, S) float64 attention probabilities of DESIGN.md, one batch element at a time."""
    q, k = q.double(), k.double()
    B, H, L, D = q.shape
    S = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kpm = torch.zeros(B, S, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    qpm = torch.zeros(B, L, dtype=torch.bool) if query_padding_mask is None else query_padding_mask
    parts = []
    for b in range(B):
        qi, ki = torch.nonzero(~qpm[b]).flatten(), torch.nonzero(~kpm[b]).flatten()
        qb, kb = q[b][:, qi], k[b][:, ki]
        part = {"qi": qi, "ki": ki, "exact": len(qi) <= m and len(ki) <= m, "empty": len(qi) == 0}
        if part["empty"]:
            pass
        elif not part["exact"]:
            ql, kl = landmarks(qb, min(m, len(qi))), landmarks(kb, min(m, len(ki)))
            part["F"] = torch.softmax(scale * qb @ kl.transpose(-1, -2), -1)
            part["A"] = torch.softmax(scale * ql @ kl.transpose(-1, -2), -1)
            part["Bm"] = torch.softmax(scale * ql @ kb.transpose(-1, -2), -1)
            part["c"] = max_column_sum(part["A"])
        else:
            part["P"] = torch.softmax(scale * qb @ kb.transpose(-1, -2), -1)
        parts.append(part)
    cs = [p["c"] for p in parts if not p["exact"] and not p["empty"]]
    global_c = torch.cat(cs).max() if cs else None
    W = torch.zeros(B, H, L, S, dtype=torch.float64)
    for b, p in enumerate(parts):
        if p["empty"]:
            continue
        if p["exact"]:
            w = p["P"]
        else:
            c = p["c"] if pinv_init == "per_head" else global_c
            w = p["F"] @ newton_schulz(p["A"], c, 6) @ p["Bm"]
        W[b][:, p["qi"][:, None], p["ki"][None, :]] = w
    return W


def class_token_case(dtype=torch.float64):
    """B=2, H=3, one class token + 256 patches, element 1 with 50 padded patches at the end."""
    q, k, _ = make_qkv(2, 3, 257, 257, 16, dtype=dtype, seed=11)
    mask = trailing_mask(2, 257, [257, 207])
    return q, k, mask


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
def test_class_token_map_matches_reference(pinv_init):
    q, k, mask = class_token_case()
    W = attention_weights(q, k, 16, rows=[0], pinv_init=pinv_init, key_padding_mask=mask, query_padding_mask=mask)
    assert W.shape == (2, 3, 1, 257)
    ref = reference_weights(q, k, 16, pinv_init=pinv_init, key_padding_mask=mask, query_padding_mask=mask)
    assert_rel_close(W, ref[:, :, :1], 1e-10, "class token row")
    assert (W[1, :, :, 207:] == 0).all(), "padded patches must get weight 0"
    # the heatmap over the 256 patches: 16 x 16 after dropping the class token column
    assert W[0, :, 0, 1:].reshape(3, 16, 16).shape == (3, 16, 16)


CASES = {
    # id: (B, L, S, m, mask kind)
    "uneven": (2, 37, 37, 5, None),
    "cross_uneven": (2, 23, 41, 6, None),
    "n_below_m": (2, 5, 7, 8, None),
    "n_equals_m": (2, 8, 8, 8, None),
    "random_masks": (3, 61, 61, 7, "random"),
    "mixed_exact_and_nystrom": (3, 40, 40, 8, "mixed"),
}


def build(case, dtype):
    B, L, S, m, kind = CASES[case]
    q, k, v = make_qkv(B, 2, L, S, 8, 5, dtype=dtype, seed=L * S)
    kw = {}
    if kind is not None:
        g = torch.Generator().manual_seed(5)
        kpm, qpm = random_mask(B, S, 0.3, g), random_mask(B, L, 0.3, g)
        if kind == "mixed":  # element 1 on the exact path, element 2 with no real query
            kpm[1], qpm[1] = trailing_mask(1, S, [m - 1])[0], trailing_mask(1, L, [m])[0]
            qpm[2] = True
        kw = {"key_padding_mask": kpm, "query_padding_mask": qpm}
    return q, k, v, m, kw


@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_all_rows_match_reference(case, pinv_init):
    q, k, _, m, kw = build(case, torch.float64)
    W = attention_weights(q, k, m, pinv_init=pinv_init, **kw)
    assert_rel_close(W, reference_weights(q, k, m, pinv_init=pinv_init, **kw), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("pinv_init", ["per_head", "original"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rows_times_value_equal_the_op(case, pinv_init, dtype):
    q, k, v, m, kw = build(case, dtype)
    L = q.shape[2]
    rows = torch.tensor([0, L - 1, L // 2, 0])  # any order, repeats allowed
    W = attention_weights(q, k, m, rows=rows, pinv_init=pinv_init, **kw)
    out = torch_nystrom.nystrom_attention(q, k, v, m, pinv_init=pinv_init, **kw)
    assert W.dtype == dtype
    assert_rel_close(W @ v, out[:, :, rows], TOL[dtype], "W @ v")


def test_exact_path_rows_are_softmax():
    q, k, v, m, kw = build("mixed_exact_and_nystrom", torch.float64)
    W = attention_weights(q, k, m, **kw)
    kpm, qpm = kw["key_padding_mask"], kw["query_padding_mask"]
    real_q = ~qpm[1]
    logits = (q[1] @ k[1].transpose(-1, -2) * 8 ** -0.5).masked_fill(kpm[1], float("-inf"))
    assert_rel_close(W[1][:, real_q], torch.softmax(logits, -1)[:, real_q], 1e-12, "exact rows")
    assert (W[1][:, qpm[1]] == 0).all() and (W[2] == 0).all(), "rows of padded queries must be 0"
    assert (W.sum(-1)[1][:, real_q] - 1).abs().max() < 1e-12


def test_half_inputs_give_half_weights():
    q, k, v, m, kw = build("random_masks", torch.float32)
    W = attention_weights(q.bfloat16(), k.bfloat16(), m, rows=[3], **kw)
    assert W.dtype == torch.bfloat16
    want = attention_weights(q.bfloat16().float(), k.bfloat16().float(), m, rows=[3], **kw)
    assert_rel_close(W, want, 1e-2)


def test_gradients_flow():
    q, k, _ = make_qkv(2, 1, 13, 11, 3, requires_grad=True, seed=4)
    mask = trailing_mask(2, 11, [11, 9])
    assert torch.autograd.gradcheck(
        lambda a, b: attention_weights(a, b, 4, rows=[0, 5], key_padding_mask=mask, pinv_init="original"),
        (q, k), eps=1e-6, atol=1e-7)


class LargestTensor(TorchDispatchMode):
    """Records the largest element count of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_one_row_is_linear_in_memory():
    """n = 16384, m = 64, one row: no intermediate above a few (m x n) per head, far from n x n."""
    n, m, H = 16384, 64, 2
    q, k, _ = make_qkv(1, H, n, n, 16, dtype=torch.float32, seed=1)
    mask = trailing_mask(1, n, [n - 100])
    with LargestTensor() as probe:
        W = attention_weights(q, k, m, rows=[0], key_padding_mask=mask, query_padding_mask=mask)
    assert W.shape == (1, H, 1, n)
    assert probe.largest <= H * m * n, f"an intermediate of {probe.largest} elements (m*n = {m * n} per head)"
    assert probe.largest < n * n // 64


def test_one_row_of_131072_tokens_runs():
    """n x n would be 64 GiB of float32, more than the CI machine has."""
    n = 1 << 17
    q, k, _ = make_qkv(1, 1, n, n, 16, dtype=torch.float32, seed=2)
    W = attention_weights(q, k, 64, rows=[0])
    assert W.shape == (1, 1, 1, n) and torch.isfinite(W).all()


def test_argument_errors():
    q, k, _ = make_qkv(2, 1, 6, 5, 4)
    with pytest.raises(TypeError, match=r"rows must be a 1-D integer tensor or a sequence of ints, got int \(use \[i\]"):
        attention_weights(q, k, 2, rows=3)
    with pytest.raises(TypeError, match="rows must be a 1-D integer tensor.*got dtype torch.float32"):
        attention_weights(q, k, 2, rows=torch.tensor([0.0]))
    with pytest.raises(TypeError, match="got dtype torch.bool"):
        attention_weights(q, k, 2, rows=torch.tensor([True]))
    with pytest.raises(ValueError, match=r"rows must be 1-D, got shape \[1, 2\]"):
        attention_weights(q, k, 2, rows=torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="rows must hold ints, got float"):
        attention_weights(q, k, 2, rows=[0, 1.5])
    with pytest.raises(IndexError, match=r"rows must lie in \[0, L\) = \[0, 6\), got 6"):
        attention_weights(q, k, 2, rows=[0, 6])
    with pytest.raises(IndexError, match="got -1"):
        attention_weights(q, k, 2, rows=range(-1, 2))
    with pytest.raises(ValueError, match="num_landmarks must be an int >= 1"):
        attention_weights(q, k, 0)
    with pytest.raises(ValueError, match=r"query_padding_mask must have shape \(B, L\) = \(2, 6\)"):
        attention_weights(q, k, 2, query_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="key must have the head dim of query"):
        attention_weights(q, k[..., :3], 2)
    with pytest.raises(ValueError, match="masks every key of batch element 0"):
        attention_weights(q, k, 2, key_padding_mask=torch.tensor([[True] * 5, [False] * 5]))
    assert attention_weights(q, k, 2, rows=[]).shape == (2, 1, 0, 5)
