"""The case table every device runs (tests/python/helpers.py builds the inputs).

Small odd sizes (L=37, S=53, D=19, Dv=23, m=7 unless a case says otherwise) check the math; the cases whose
id starts with a head dim (d64_..., d256_...) straddle the CUDA backend's paths: head dims up to 256,
landmark counts on both sides of its Newton–Schulz limits (fused shared-memory kernel for m <= 64, or
m <= 128 in float32; cuBLAS batched above), the tensor-core forward of half inputs (tc_: head dims 64 / 128,
m <= 64), and long sequences (several CPU row tiles of 512, many CUDA blocks). Every device runs all of them.
"""

from __future__ import annotations

from helpers import Case, middle, scattered, trailing

CASES = [
    Case("self_no_masks", L=37, S=37, Dv=19),
    Case("cross_dv", L=37, S=53, D=19, Dv=23),
    Case("key_mask", key_mask=trailing(53, 30)),
    Case("query_mask", query_mask=trailing(37, 20)),
    Case("both_masks", key_mask=trailing(40, 53), query_mask=trailing(37, 11)),
    Case("middle_padding", key_mask=middle((10, 25), (0, 5)), query_mask=middle((3, 9), (30, 37))),
    Case("even_segments", L=35, S=35, Dv=19, m=7, key_mask=trailing(35, 28), query_mask=trailing(35, 28)),
    Case("uneven_segments_m5", L=37, S=53, m=5),
    Case("exact_large_m", m=64, key_mask=trailing(53, 41), query_mask=trailing(29, 37)),
    Case("exact_m_equals_lengths", L=37, S=53, m=53),
    # element 0: 5 real queries, 7 real keys -> exact; element 1: L_b = m < S_b; element 2: S_b < m < L_b
    Case("mixed_exact_and_nystrom", B=3, L=29, S=29, Dv=11, m=7, key_mask=trailing(7, 20, 3),
         query_mask=trailing(5, 7, 29)),
    Case("custom_scale", key_mask=trailing(53, 44), extra={"scale": 0.113}),
    Case("sharp_softmax", L=37, S=37, Dv=19, std=2.0),
    Case("single_landmark", m=1, key_mask=trailing(53, 12)),
    Case("m1_cross_short_keys", B=2, H=2, L=40, S=33, D=5, Dv=3, m=1, key_mask=trailing(33, 12)),
    Case("original_init", key_mask=trailing(53, 30), query_mask=trailing(37, 20), extra={"pinv_init": "original"}),
    Case("original_init_mixed", B=3, L=29, S=29, m=7, key_mask=trailing(7, 20, 29), query_mask=trailing(5, 29, 13),
         extra={"pinv_init": "original"}),
    Case("custom_scale_sharp", B=2, H=2, L=97, S=97, D=24, Dv=24, m=33, std=2.0, key_mask=trailing(97, 60),
         query_mask=trailing(97, 60), extra={"scale": 0.3}),
    # Longer than the CPU kernel's row tile (512), with padding straddling tile boundaries and a sharp softmax,
    # so that tiled / online-softmax merging is exercised.
    Case("long_multi_tile", B=2, H=2, L=1100, S=1300, D=5, Dv=3, m=9, std=3.0,
         key_mask=middle((500, 530), (1000, 1300)), query_mask=middle((0, 0), (513, 600))),
    Case("long_multi_tile_original", B=2, H=1, L=1030, S=600, D=4, Dv=3, m=6, std=3.0,
         key_mask=middle((0, 0), (2, 40)), query_mask=middle((1, 3), (511, 513)), extra={"pinv_init": "original"}),
    # Several thousand rows, padding straddling power-of-two boundaries, a sharp softmax: many CUDA blocks.
    Case("long_tiles", B=2, H=2, L=2500, S=3100, D=64, Dv=48, m=64, std=2.0,
         key_mask=middle((1000, 1300), (3000, 3100)), query_mask=middle((0, 0), (1023, 1100))),
    # Head dims from 1 to 256, landmark counts on both sides of the CUDA Newton–Schulz limits; lengths above m
    # so that the Nyström path really uses m landmarks on at least one element.
    Case("d1_m17_key_trailing", B=2, H=3, L=37, S=53, D=1, Dv=3, m=17, key_mask=trailing(53, 30)),
    Case("d7_m17_random_masks", B=3, H=2, L=61, S=45, D=7, Dv=5, m=17, key_mask=scattered(0.3),
         query_mask=scattered(0.3)),
    Case("d64_m64_cross", B=2, H=3, L=150, S=201, D=64, Dv=33, m=64, key_mask=trailing(201, 120),
         query_mask=trailing(90, 150)),
    Case("d64_m100_nonsquare_A", B=2, H=2, L=150, S=90, D=64, Dv=64, m=100, key_mask=trailing(90, 70)),
    Case("d96_m100_middle_original", B=2, H=2, L=233, S=177, D=96, Dv=95, m=100,
         key_mask=middle((10, 40), (0, 3)), query_mask=middle((200, 233), (50, 51)), extra={"pinv_init": "original"}),
    Case("d128_m128_random_key", B=1, H=3, L=257, S=300, D=128, Dv=127, m=128, key_mask=scattered(0.2)),
    Case("d200_m129_query_original", B=2, H=1, L=300, S=280, D=200, Dv=77, m=129, query_mask=scattered(0.25),
         extra={"pinv_init": "original"}),
    Case("d256_m200", B=1, H=2, L=411, S=390, D=256, Dv=256, m=200),
    Case("d256_m256_masks", B=2, H=1, L=301, S=517, D=256, Dv=129, m=256, key_mask=trailing(517, 400),
         query_mask=middle((0, 5), (290, 301))),
    Case("m300_beyond_256", B=1, H=2, L=700, S=650, D=32, Dv=16, m=300, key_mask=scattered(0.1)),
    # Head dims 64 / 128 with m <= 64: in float16 / bfloat16 the CUDA forward products take the tensor cores.
    Case("tc_d64_m64", B=2, H=2, L=300, S=270, D=64, Dv=64, m=64, key_mask=scattered(0.2),
         query_mask=middle((40, 90), (0, 0))),
    Case("tc_d128_m17_cross", B=1, H=3, L=257, S=411, D=128, Dv=128, m=17, key_mask=trailing(350)),
    # The mixed head-dim instances of the tensor-core kernels: (D, Dv) = (64, 128) and (128, 64).
    Case("tc_d64_dv128", B=1, H=2, L=90, S=150, D=64, Dv=128, m=40, key_mask=trailing(120)),
    Case("tc_d128_dv64", B=2, H=1, L=130, S=70, D=128, Dv=64, m=48, query_mask=middle((10, 20), (0, 0))),
]
CASE = {c.id: c for c in CASES}
assert len(CASE) == len(CASES), "case ids must be unique"

# Tiny cases for torch.autograd.gradcheck (float64, finite differences).
GRADCHECK_CASES = [
    Case("masks_uneven", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3, key_mask=trailing(9, 5), query_mask=trailing(7, 5)),
    Case("masks_uneven_original", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3, key_mask=trailing(9, 5),
         query_mask=trailing(7, 5), extra={"pinv_init": "original"}),
    Case("cross_short_keys", B=1, H=2, L=9, S=4, D=3, Dv=2, m=3, std=1.5),
    Case("mixed_exact", B=2, H=1, L=8, S=7, D=3, Dv=3, m=4, key_mask=trailing(4, 7), query_mask=trailing(3, 8),
         extra={"pinv_init": "original"}),
    Case("middle_padding_scale", B=2, H=1, L=8, S=9, D=2, Dv=3, m=3, key_mask=middle((2, 5), (0, 1)),
         query_mask=middle((6, 8), (1, 2)), extra={"scale": 0.7}),
    Case("one_iteration", B=1, H=2, L=7, S=8, D=3, Dv=2, m=3, extra={"pinv_iterations": 1}),
    Case("zero_iterations", B=1, H=1, L=7, S=8, D=3, Dv=2, m=2, extra={"pinv_iterations": 0}),
    # m = 66 > 64: the cuBLAS Newton–Schulz path of the CUDA backend for float64 (gradcheck's fast mode).
    Case("m66_cublas_path", B=1, H=1, L=70, S=75, D=2, Dv=2, m=66, key_mask=middle((10, 12)),
         query_mask=middle((60, 61)), std=0.5),
]
