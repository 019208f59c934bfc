"""torch_nystrom.lucidrains.NystromAttention against lucidrains' nystrom-attention 0.0.14 (the installed package).

Every layer pair holds the same weights (ours loads the package's state_dict). Outputs, input gradients
and parameter gradients must agree within 1e-5 relative in float32 (1e-12 in float64), for any length,
with and without a mask; the attention maps too.

The last section documents where the package's semantics differ from this library's own op
(``torch_nystrom.nystrom_attention``), with numbers: the drop-in reproduces the package there, the op
does not.
"""

from __future__ import annotations

import pytest
import torch

from helpers import rel_err

torch_nystrom = pytest.importorskip("torch_nystrom")
lucid = pytest.importorskip("nystrom_attention")
from torch_nystrom.lucidrains import NystromAttention  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
DIM, M, KERNEL = 48, 16, 5

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def make_pair(heads=3, dim_head=16, m=M, residual=True, dtype=torch.float32, seed=0, **kw):
    """(the package's layer, ours with its weights), eval mode."""
    torch.manual_seed(seed)
    theirs = lucid.NystromAttention(DIM, dim_head=dim_head, heads=heads, num_landmarks=m, residual=residual,
                                    residual_conv_kernel=KERNEL, **kw)
    ours = NystromAttention(DIM, dim_head=dim_head, heads=heads, num_landmarks=m, residual=residual,
                            residual_conv_kernel=KERNEL, **kw)
    ours.load_state_dict(theirs.state_dict())
    return theirs.to(dtype).eval(), ours.to(dtype).eval()


def run(layer, x, mask=None):
    """Output, input gradient and parameter gradients of sum(out * w) for a fixed w."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = layer(x, mask=mask)
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
    (out * w).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in layer.named_parameters()}


def assert_same(actual, expected, tol, what):
    out_a, dx_a, g_a = actual
    out_e, dx_e, g_e = expected
    assert out_a.shape == out_e.shape
    assert rel_err(out_a, out_e) <= tol, f"{what}: output {rel_err(out_a, out_e):.3e}"
    assert rel_err(dx_a, dx_e) <= tol, f"{what}: input grad {rel_err(dx_a, dx_e):.3e}"
    assert g_a.keys() == g_e.keys()
    for name in g_e:
        assert rel_err(g_a[name], g_e[name]) <= tol, f"{what}: grad of {name} {rel_err(g_a[name], g_e[name]):.3e}"


def inputs(b, n, dtype=torch.float32, seed=1):
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------- the module


def test_state_dict_loads_both_ways():
    theirs, ours = make_pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(ours.state_dict()) == ["to_qkv.weight", "to_out.0.weight", "to_out.0.bias", "res_conv.weight"]
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
    # ours -> the package: a model trained with this layer loads into nystrom_attention
    torch.manual_seed(5)
    fresh = NystromAttention(DIM, dim_head=16, heads=3, num_landmarks=M, residual_conv_kernel=KERNEL)
    back = lucid.NystromAttention(DIM, dim_head=16, heads=3, num_landmarks=M, residual_conv_kernel=KERNEL)
    back.load_state_dict(fresh.state_dict())
    x = inputs(2, 37)
    with torch.no_grad():
        assert rel_err(fresh(x), back(x)) <= 1e-5
    _, no_conv = make_pair(residual=False)
    assert "res_conv.weight" not in no_conv.state_dict()


def test_constructor_defaults_are_the_packages():
    ours, theirs = NystromAttention(64), lucid.NystromAttention(64)
    for name in ("heads", "num_landmarks", "pinv_iterations", "eps", "scale", "residual"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.res_conv.kernel_size == theirs.res_conv.kernel_size == (33, 1)
    assert ours.to_qkv.weight.shape == theirs.to_qkv.weight.shape == (3 * 8 * 64, 64)


@pytest.mark.parametrize(
    "n", [1, 5, 15, 16, 17, 48, 50, 129], ids=lambda n: f"n{n}"
)  # n < m, n = m, n a multiple of m, odd and uneven lengths (left padding)
@pytest.mark.parametrize("heads, residual", [(1, False), (3, True)], ids=["h1-noconv", "h3-conv"])
def test_matches_package_without_mask(n, heads, residual):
    theirs, ours = make_pair(heads=heads, residual=residual)
    x = inputs(2, n)
    assert_same(run(ours, x), run(theirs, x), TOL[torch.float32], f"n={n}")


@pytest.mark.parametrize("n", [7, 16, 40], ids=lambda n: f"n{n}")
def test_matches_package_float64(n):
    theirs, ours = make_pair(dtype=torch.float64)
    x = inputs(2, n, torch.float64)
    assert_same(run(ours, x), run(theirs, x), TOL[torch.float64], f"n={n}")
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n // 3:] = False
    assert_same(run(ours, x, mask), run(theirs, x, mask), TOL[torch.float64], f"n={n} masked")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_half_precision_keeps_the_dtype(dtype, masked):
    """float16 / bfloat16 in, the same dtype out (the m-sized parts in float32), close to the float32 package."""
    theirs, ours = make_pair()
    ours = ours.to(dtype)
    x = inputs(2, 41)
    mask = _masks(41)["trailing-and-hole"][:2] if masked else None
    with torch.no_grad():
        out = ours(x.to(dtype), mask=mask)
        _, attn = ours(x.to(dtype), mask=mask, return_attn=True)
        expected = theirs(x, mask=mask)
    assert out.dtype == attn.dtype == dtype
    assert rel_err(out, expected) <= 2e-2, f"{rel_err(out, expected):.3e}"


def test_matches_package_more_landmarks_and_iterations():
    """Default-like sizes: dim_head 64, 8 iterations, m = 32, n = 300 (an uneven last segment of the padding)."""
    theirs, ours = make_pair(heads=2, dim_head=64, m=32, pinv_iterations=8)
    x = inputs(1, 300)
    assert_same(run(ours, x), run(theirs, x), TOL[torch.float32], "m=32 n=300")


def _masks(n):
    """name -> (B=3, n) bool mask, True = real token."""
    masks = {}
    m = torch.ones(3, n, dtype=torch.bool)
    m[1, n - 9:] = False  # trailing padding
    m[2, 3:7] = False  # a hole
    masks["trailing-and-hole"] = m
    m = torch.ones(3, n, dtype=torch.bool)
    m[0, :M + 3] = False  # the first segments hold no real token: empty landmarks
    m[2] = False
    m[2, -1] = True  # one real token
    masks["empty-segments"] = m
    m = torch.ones(3, n, dtype=torch.bool)
    m[1] = False  # every token masked
    masks["all-masked-element"] = m
    masks["random"] = torch.rand(3, n, generator=torch.Generator().manual_seed(3)) < 0.6
    masks["all-real"] = torch.ones(3, n, dtype=torch.bool)
    return masks


@pytest.mark.parametrize("n", [12, 16, 41, 64], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("mask_name", list(_masks(64)))
def test_matches_package_with_mask(n, mask_name):
    """Masked rows included: the package's output there is not zero, and neither is ours."""
    theirs, ours = make_pair()
    x = inputs(3, n)
    mask = _masks(n)[mask_name]
    assert_same(run(ours, x, mask), run(theirs, x, mask), TOL[torch.float32], f"{mask_name} n={n}")


@pytest.mark.parametrize("n", [9, 16, 41], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_attention_matrix_matches_package(n, masked):
    theirs, ours = make_pair()
    x = inputs(3, n)
    mask = _masks(n)["empty-segments"] if masked else None
    with torch.no_grad():
        out_e, attn_e = theirs(x, mask=mask, return_attn=True)
        out_a, attn_a = ours(x, mask=mask, return_attn=True)
        _, (f_e, z_e, b_e) = theirs(x, mask=mask, return_attn_matrices=True)
        _, (f_a, z_a, b_a) = ours(x, mask=mask, return_attn_matrices=True)
        rows = [0, n // 2, -1]
        _, attn_rows = ours(x, mask=mask, return_attn=True, attn_rows=rows)
    padded = -(-n // M) * M
    assert attn_a.shape == attn_e.shape == (3, 3, padded, padded)
    assert rel_err(out_a, out_e) <= 1e-5
    assert rel_err(attn_a, attn_e) <= 1e-5, f"attn {rel_err(attn_a, attn_e):.3e}"
    for a, e, name in ((f_a, f_e, "F"), (z_a, z_e, "Z"), (b_a, b_e, "Bm")):
        assert a.shape == e.shape, name
        assert rel_err(a, e) <= 1e-5, f"{name} {rel_err(a, e):.3e}"
    # attn_rows: rows of the same matrix, indexed in the input sequence (the last n rows)
    assert attn_rows.shape == (3, 3, len(rows), padded)
    expected = attn_e[:, :, padded - n:][:, :, rows]
    assert rel_err(attn_rows, expected) <= 1e-5


def test_attention_rows_equal_attention_weights_where_the_semantics_agree():
    """No mask and n > m: the package's matrix is the op's F Z Bm over the left-padded sequence with
    pinv_init="original", i.e. torch_nystrom.attention_weights of the padded q, k."""
    _, ours = make_pair()
    n = 41
    pad = -n % M
    x = inputs(2, n)
    rows = [0, 7, 40]
    with torch.no_grad():
        _, attn = ours(x, return_attn=True, attn_rows=rows)
        q, k, _ = (torch.nn.functional.pad(t, (0, 0, pad, 0)) for t in _heads(ours, x))
        weights = torch_nystrom.attention_weights(q, k, M, rows=[pad + r for r in rows], pinv_init="original",
                                                  scale=ours.scale)
    assert rel_err(attn, weights) <= 1e-5, f"{rel_err(attn, weights):.3e}"


def _largest_allocation(fn):
    """Bytes of the largest allocation by one op while fn runs (torch.profiler's CPU memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    return max(e.cpu_memory_usage for e in prof.events()), result


def test_attention_map_of_one_row_is_linear_in_n():
    """attn_rows=[0] (a class token's map) builds no n x n matrix: O(m n) per head; the full map is n'^2."""
    _, ours = make_pair(heads=1, m=8)
    n = 2000
    x = inputs(1, n)
    row_bytes, (_, row) = _largest_allocation(lambda: ours(x, return_attn=True, attn_rows=[0]))
    full_bytes, (_, full) = _largest_allocation(lambda: ours(x, return_attn=True))
    assert row.shape == (1, 1, 1, n) and full.shape == (1, 1, n, n)
    assert full_bytes >= 4 * n * n
    assert row_bytes < 4 * n * n / 16, f"largest allocation {row_bytes} bytes"
    assert rel_err(row, full[:, :, :1]) <= 1e-5
    assert abs(row.sum().item() - 1.0) < 1e-3  # the map over the input tokens sums to ~1


def test_op_exact_path_memory_is_linear_in_the_long_side():
    """On the op's exact path (num_landmarks >= L, S) memory is O(L S), as SDPA's: the CPU forward once allocated
    a (B, H, max(L, S))^2 landmark matrix there, which no exact element uses."""
    q = torch.randn(1, 2, 64, 32)
    k, v = torch.randn(1, 2, 4096, 32), torch.randn(1, 2, 4096, 32)
    big = k.size(2)
    largest, out = _largest_allocation(
        lambda: torch.ops.nystrom.nystrom_attention(q, k, v, big, 0, "per_head", None, None, 1.0))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0)
    assert rel_err(out, expected) <= 1e-5
    assert largest <= 16 * 2**20, f"largest allocation {largest / 2**20:.0f} MiB (L S = {64 * 4096} scores per head)"


def test_train_mode_dropout_and_errors():
    _, ours = make_pair(dropout=0.5)
    ours.train()
    x = inputs(2, 20)
    assert not torch.equal(ours(x), ours(x))  # the package's dropout after the output projection
    ours.eval()
    with pytest.raises(ValueError, match=r"x must have shape \(B, n, dim=48\)"):
        ours(torch.randn(2, 20, 47))
    with pytest.raises(ValueError, match="at least one token"):
        ours(torch.randn(2, 0, DIM))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ours(x, mask=torch.ones(2, 20))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, n\) = \[2, 20\]"):
        ours(x, mask=torch.ones(2, 21, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_rows .* return_attn=True"):
        ours(x, attn_rows=[0])
    with pytest.raises(ValueError, match="attn_rows must index the n = 20 input tokens"):
        ours(x, return_attn=True, attn_rows=[20])
    with pytest.raises(ValueError, match="residual_conv_kernel must be a positive odd number"):
        NystromAttention(DIM, residual_conv_kernel=4)
    with pytest.raises(ValueError, match="num_landmarks must be >= 1"):
        NystromAttention(DIM, num_landmarks=0)


# ------------------------------------------- where the package's semantics differ from the op's


def _heads(layer, x, heads=3):
    """The package's q, k, v of x (no padding), (B, H, n, d)."""
    b, n, _ = x.shape
    return [t.view(b, n, heads, -1).transpose(1, 2) for t in layer.to_qkv(x).chunk(3, dim=-1)]


def test_difference_package_padding_is_not_invisible():
    """The op removes padding (outputs at real tokens do not change when padding is appended); the package
    does not: its landmarks are masked means over fixed segments of the padded length, so appending padded
    tokens moves the segment boundaries. The drop-in follows the package (tested above)."""
    theirs, _ = make_pair(residual=False)
    n, extra = 40, 17
    x = inputs(1, n + extra)
    mask = torch.ones(1, n + extra, dtype=torch.bool)
    mask[:, n:] = False
    with torch.no_grad():
        short = theirs(x[:, :n])
        long = theirs(x, mask=mask)[:, :n]
        q, k, v = _heads(theirs, x)
        pad = ~mask
        op_short = torch_nystrom.nystrom_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], M, pinv_init="original")
        op_long = torch_nystrom.nystrom_attention(q, k, v, M, pinv_init="original", key_padding_mask=pad,
                                                  query_padding_mask=pad)[:, :, :n]
    assert rel_err(op_long, op_short) <= 1e-5  # the op: padding invisible
    assert rel_err(long, short) > 1e-2, f"package: {rel_err(long, short):.3e}"  # the package: not


def test_difference_package_masked_query_rows():
    """The package's output at a masked token is the output projection of the mean over all m landmarks of
    Z Bm v (plus the conv of the zeroed v); the op's (and torch_nystrom.NystromAttention's) padded rows are 0
    before the output projection."""
    theirs, ours = make_pair(residual=False)
    x = inputs(1, 40)
    mask = torch.ones(1, 40, dtype=torch.bool)
    mask[:, 30:] = False
    with torch.no_grad():
        rows = theirs(x, mask=mask)[:, 30:]
        zero_rows = theirs.to_out(torch.zeros(1, 10, 48))
        ours_rows = ours(x, mask=mask)[:, 30:]
    assert rel_err(rows, zero_rows) > 1e-2
    assert rel_err(ours_rows, rows) <= 1e-5


def test_difference_package_mask_none_is_not_mask_all_real():
    """Without a mask the package's left-padding zeros are tokens (keys with score 0, values 0); with a mask
    they are masked. So mask=None and an all-True mask differ unless m divides n, in the package and the
    drop-in alike."""
    theirs, ours = make_pair()
    x = inputs(2, 41)
    real = torch.ones(2, 41, dtype=torch.bool)
    with torch.no_grad():
        assert rel_err(theirs(x), theirs(x, mask=real)) > 1e-3
        assert rel_err(ours(x), ours(x, mask=real)) > 1e-3
        assert rel_err(theirs(x[:, :32]), theirs(x[:, :32], mask=real[:, :32])) <= 1e-5


def test_difference_package_short_sequences_are_not_exact():
    """n <= m: the op is exact softmax attention. The package pads to m one-token segments and still applies
    6 Newton–Schulz steps, so F Z Bm is not softmax attention (2.3 % at n = m = 16 here); for n < m the
    m - n zero tokens of the left padding are keys too (a further 38 % at n = 10 here)."""
    theirs, ours = make_pair(residual=False)
    for n, zero_keys in ((M, 0), (10, M - 10)):
        x = inputs(2, n)
        with torch.no_grad():
            q, k, v = _heads(theirs, x)
            exact = torch.softmax(q @ k.transpose(-1, -2) * theirs.scale, -1) @ v
            op = torch_nystrom.nystrom_attention(q, k, v, M)
            _, (f, z, bm) = theirs(x, return_attn_matrices=True)
            qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, zero_keys, 0)) for t in (q, k, v))
            package = (f @ z @ bm @ vp)[:, :, -n:]
            exact_padded = (torch.softmax(qp @ kp.transpose(-1, -2) * theirs.scale, -1) @ vp)[:, :, -n:]
            assert rel_err(op, exact) <= 1e-5
            assert rel_err(package, exact_padded) > 1e-2, f"n={n}: {rel_err(package, exact_padded):.3e}"
            if zero_keys:
                assert rel_err(exact_padded, exact) > 1e-1, f"n={n}: {rel_err(exact_padded, exact):.3e}"
            assert rel_err(ours(x), theirs(x)) <= 1e-5
