// Internal: the forward and backward tile kernels of fused.h for bfloat16
// inputs, with the long products on vdpbf16ps (AVX512-BF16). Torch-free; built once, from
// fused_bf16.cpp with -mavx512bf16. Callers check bf16_products() (isa.h).
//
// vdpbf16ps multiplies pairs of bfloat16 numbers and adds both products to a
// float32 lane: 32 multiply-adds per instruction against the FMA's 16. Its
// right operand holds, in each 32-bit lane, the elements of two consecutive
// rows of one column ("pairs"); its left operand is one such pair broadcast.
// The bfloat16 inputs (q, k, v, dO) enter as they are; the float32 operands
// (landmarks; the query side's probabilities and W; the backward's scores X
// and dbv) are rounded to bfloat16 once, to nearest even.
// Sums, softmax statistics and log-sum-exps stay float32, and so does the
// pseudoinverse (it is not computed here). docs/DESIGN.md §5 states the error
// this adds; test_cpu_paths.py bounds it.
#pragma once

#include "cpu/fused.h"

#include <cstdint>

namespace nystrom::cpu::fused::bf16 {

/// dst (ceil(K / 2) rows of ldd 32-bit pairs): pair (kp, j) holds the bfloat16
/// roundings of src[2 kp][j] (low half) and src[2 kp + 1][j] (high half), for
/// j < N; zero halves for rows >= K and pairs for columns N <= j < ldd. src:
/// K x N floats, row stride lds.
void pack_pairs(const float* src, int64_t lds, int64_t K, int64_t N, uint32_t* dst, int64_t ldd);

/// attend_rows of fused.h for bfloat16 query rows q_i (q + i * ldq elements;
/// D + D % 2 readable, element D zero when D is odd):
///   s = q_i · kT over the first m of mp columns, kTp = pack_pairs of kT (D x mp,
///   the softmax scale folded in, mp a multiple of 16, <= kMaxLandmarksFused);
///   lse[i] = log(sum exp s); out_i = softmax(s) · w, wp = pack_pairs of w
///   (mp x ldw floats, ldw >= Dv rounded up to 16), written as Dv bfloat16
///   elements at out + i * ldo, rounded once from the float32 sums (to nearest
///   even, NaN as 0x7fc0: as c10::BFloat16 and fused::store_rows round).
void attend_rows(const uint16_t* q, int64_t ldq, int64_t rows, int64_t D, const uint32_t* kTp, int64_t m,
                 int64_t mp, const uint32_t* wp, int64_t ldw, int64_t Dv, uint16_t* out, int64_t ldo, float* lse);

/// key_tile of fused.h with the logits on vdpbf16ps, for bfloat16 key rows
/// k_i (k + i * ldk elements, as q above) and float32 value rows v_i (v + i *
/// ldv, readable up to Dv rounded up to 16):
///   S = k · qT (qTp = pack_pairs of qT, D x mp) into work (rows x mp floats);
///   col_max, col_sum (mp floats) and P = exp(S - col_max) in work as there;
///   pv (m x Dv floats, row stride ldpv) = Pᵀ · v in float32.
/// Pᵀ · v stays on the FMA units with P unrounded: the backward's key pass
/// subtracts rowsum(dbv ∘ bv) from v · dbvᵀ, and a bv from bfloat16-rounded P
/// made that difference (and dk) up to 3.4x less accurate in the tests.
void key_tile(const uint16_t* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,
              const uint32_t* qTp, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,
              int64_t ldpv);

/// backward_tile of fused.h for bfloat16 x and y rows (x + i * ldx: D + D % 2
/// elements readable, element D zero when D is odd; y likewise with Dv), the
/// products that take X on vdpbf16ps: the per-head operands b1 (D x mp), b2
/// (Dv x mp) and c1 (mp x ldc1, ldc1 >= D rounded up to 16) come as pairs
/// (pack_pairs); the logits x · b1 and G = y · b2, then out1 = X · c1 and
/// t1 = Xᵀ · x with X rounded to bfloat16 once. The products that take P,
/// out2 = P · c2 (c2: mp x ldc2 floats, the key pass's dv) and t2 = Pᵀ · y
/// (the query pass's dW), stay on the FMA units with P unrounded: rounded
/// there, dW made dq and dk about 1.8x less accurate (the m x m part amplifies
/// its error) and dv came to 2.3x the float32 path's error, where the rounded
/// X adds about 7 %. Logits, exponentials, d, X, every sum and output are
/// float32. Scratch: pbuf, xbuf (rows x mp floats) as fused.h's; pairs:
/// ceil(rows / 2) x mp, and rbuf: rows x (max(D, Dv) rounded up to 16) 32-bit
/// words (the pairs of x's rows, then y's rows widened to float32).
using PairTile = BackwardTileOf<uint16_t, uint32_t>;
void backward_tile(const PairTile& t);

}  // namespace nystrom::cpu::fused::bf16
