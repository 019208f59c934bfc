"""The key landmarks of the tensor-core forward (issue 13; docs/DESIGN.md §7): where tc_landmark_kernel serves the
Bm·V pass (float16 / bfloat16, D, Dv in {64, 128}, at most 64 landmarks), it pools k̃ of the Nyström elements from the
key rows it stages (per-split float32 segment sums, merged in split order by tc_key_landmark_kernel), so the forward
reads k once; exact elements keep pool_kernel (their k̃ is their keys). Other dtypes and shapes keep pool_kernel for
every element.

Checked against the float64 segment means of the real keys (the saved k_landmarks of nystrom_attention_forward),
with odd lengths, key padding (trailing and scattered: the index lists), several key splits per head (segments that
straddle split boundaries, span several splits, or end exactly at one; splits without keys), elements whose keys are
fewer than m (single-row segments) and exact elements next to Nyström ones. k̃ feeds A and its scale c, which the
forward now computes after the Bm·V merge: pinv_scale and the output are checked too.

Tolerance: a float32 running sum of input-dtype values (exact products of the input; |k| < ~5) over at most a few
hundred rows, divided once: the error is a few float32 ulps of the segment sum, < 1e-5 here; a dropped or doubled
row moves a mean by ~1 / segment size (> 1e-3). The output, rounded to the input dtype, is held to 4 eps of its
largest entry (1e-4 in float32) against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from helpers import Case, emulated_library, ops_args, rel_err, scattered, trailing
from reference import landmarks, max_column_sum, nystrom_reference

torch_nystrom = pytest.importorskip("torch_nystrom")

# splits per head on a 132-SM device: min(264 / (B·H), S / 256)
CASES = [
    # 5 splits of 320 / 256 rows for the long elements (segments of ~35 rows straddle them), element 2 has 30 keys
    # for 37 landmarks (single-row segments; its splits 1-4 are empty), element 3 is exact
    Case("tcf_d64_m37_mixed", B=4, H=2, L=203, S=1301, D=64, Dv=64, m=37, key_mask=trailing(1301, 1177, 30, 25),
         query_mask=trailing(203, 190, 203, 20)),
    # 11 splits, ~2100 real keys (scattered padding: 192-row splits), 5 segments of ~420 rows: each spans two or
    # three splits
    Case("tcf_d128_dv64_m5_scattered", B=1, H=1, L=77, S=3001, D=128, Dv=64, m=5, key_mask=scattered(0.3)),
    # 4 splits of 256 rows, segments of 128: every split boundary is a segment boundary, and so is the first row of
    # every split's third chunk
    Case("tcf_d64_dv128_m8_aligned", B=1, H=2, L=100, S=1024, D=64, Dv=128, m=8),
    # one split, 64 landmarks of an odd number of keys, D = Dv = 128
    Case("tcf_d128_m64_one_split", B=2, H=2, L=150, S=211, D=128, Dv=128, m=64, key_mask=trailing(211, 97)),
]
CASE = {c.id: c for c in CASES}


def expected_key_landmarks(k: torch.Tensor, kpm, m: int, ms: int) -> torch.Tensor:
    """float64 segment means of each element's real keys, (B, H, ms, D); rows past min(m, S_b) zero."""
    k = k.detach().cpu().double()
    B, H, S, D = k.shape
    out = torch.zeros(B, H, ms, D, dtype=torch.float64)
    for b in range(B):
        real = torch.ones(S, dtype=torch.bool) if kpm is None else ~kpm[b].cpu()
        kb = k[b][:, real, :]
        mk = min(m, kb.shape[-2])
        out[b, :, :mk] = landmarks(kb, mk)
    return out


def forward(q, k, v, kw):
    return torch.ops.nystrom.nystrom_attention_forward(*ops_args(q, k, v, kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("case_id", list(CASE))
def test_key_landmarks_are_segment_means(case_id, dtype, cuda_device):
    case = CASE[case_id]
    q, k, v, kw = case.build(dtype, cuda_device)
    kpm = kw.get("key_padding_mask")
    out, q_lm, k_lm, *_, pinv_scale = forward(q, k, v, kw)
    ms = min(case.m, max(case.L, case.S))
    assert k_lm.dtype == torch.float32 and k_lm.shape == (case.B, case.H, ms, case.D)
    expected = expected_key_landmarks(k, kpm, case.m, ms)
    err = (k_lm.cpu().double() - expected).abs().max().item()
    assert err < 1e-5, f"k_landmarks: max error {err:.3e}"
    # c = the largest column sum of A = softmax(scale q̃ k̃ᵀ), for the Nyström elements (A after the merge)
    qpm = kw.get("query_padding_mask")
    scale = case.D ** -0.5
    for b in range(case.B):
        Lb = case.L if qpm is None else int((~qpm[b].cpu()).sum())
        Sb = case.S if kpm is None else int((~kpm[b].cpu()).sum())
        if Lb <= case.m and Sb <= case.m:
            continue  # exact: no A
        mq, mk = min(case.m, Lb), min(case.m, Sb)
        a = torch.softmax(scale * q_lm[b, :, :mq].cpu().double() @ expected[b, :, :mk].transpose(-1, -2), dim=-1)
        torch.testing.assert_close(pinv_scale[b].cpu().double(), max_column_sum(a), rtol=1e-5, atol=0,
                                   msg=lambda m: f"pinv_scale of element {b}: {m}")
    ref = nystrom_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), case.m,
                            key_padding_mask=None if kpm is None else kpm.cpu(),
                            query_padding_mask=None if qpm is None else qpm.cpu())
    real_q = slice(None) if qpm is None else ~qpm.cpu()[:, None, :, None].expand_as(ref)
    tol = 1e-4 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps  # the output is rounded to the dtype
    err = rel_err(out.cpu().double()[real_q], ref[real_q])
    assert err < tol, f"output: {err:.3e} >= {tol:.3e}"


@pytest.mark.skipif(not emulated_library(), reason="which kernels ran: the emulated backend's launch log")
@pytest.mark.parametrize("dtype,pooled_in_pass", [(torch.bfloat16, True), (torch.float16, True),
                                                  (torch.float32, False)])
def test_key_pooling_kernels_and_schedules(dtype, pooled_in_pass, cuda_device):
    """Half inputs of a tensor-core shape merge k̃ from the Bm·V pass (tc_key_landmark_kernel); float32 does not.
    The result is the same bits under every schedule of a block's threads (no race on the staged keys)."""
    from test_emulated import SCHEDULES, emulator_setting, launched_during

    case = CASE["tcf_d64_m37_mixed"]
    q, k, v, kw = case.build(dtype, cuda_device)
    results = []
    for schedule in SCHEDULES:
        with emulator_setting("schedule", schedule):
            res, launched = launched_during(lambda: forward(q, k, v, kw))
        names = " ".join(launched)
        assert ("tc_key_landmark_kernel" in names) == pooled_in_pass, f"{schedule}: {sorted(launched)}"
        assert ("tc_landmark_kernel" in names) == pooled_in_pass, f"{schedule}: {sorted(launched)}"
        results.append(res)
    for schedule, res in zip(SCHEDULES[1:], results[1:]):
        for i, (a, b) in enumerate(zip(results[0], res)):
            assert torch.equal(a, b), f"output {i} differs between {SCHEDULES[0]} and {schedule}"


def test_query_blocks_walk_several_tiles(cuda_device):
    """64 heads of 5 query tiles at D = Dv = 128 on the sm90 profile's 132 SMs, 2 resident blocks each by shared
    memory (grid.h: query_tiles_per_block): 3 blocks per head of 2, 2 and 1 tiles, so a block walks several tiles
    with k̃ and W converted once, the last one fewer; elements whose real queries end inside a block's first or
    second tile (trailing padding) leave later tiles and blocks idle."""
    case = Case("tcf_walk", B=4, H=16, L=300, S=90, D=128, Dv=128, m=16, query_mask=trailing(300, 150, 64, 201))
    q, k, v, kw = case.build(torch.bfloat16, cuda_device)
    out = forward(q, k, v, kw)[0]
    qpm = kw["query_padding_mask"].cpu()
    ref = nystrom_reference(q.cpu().double(), k.cpu().double(), v.cpu().double(), case.m, query_padding_mask=qpm)
    real_q = ~qpm[:, None, :, None].expand_as(ref)
    err = rel_err(out.cpu().double()[real_q], ref[real_q])
    tol = 4 * torch.finfo(torch.bfloat16).eps
    assert err < tol, f"output: {err:.3e} >= {tol:.3e}"
