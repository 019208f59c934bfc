// Internal: fused float32 tile kernels of the CPU forward pass.
//
// The forward's long products (q·k̃ᵀ then F·W on query tiles, q̃·kᵀ then Bm·V
// on key tiles) run as register-blocked loops with the softmax in between,
// on the tile while it is in cache: no (tile x m) matrix goes through memory
// on the query side, and neither side pays a BLAS call's packing and
// set-up, which for these thin products (inner dimension D or m, 64 in the
// common case) cost about as much as the arithmetic (measured with perf on
// MKL: packing and scaling took 17% of the forward, its compute kernel 26%).
//
// Built twice from simd_attend_impl.h, for AVX-512 and for AVX2/FMA, with no
// torch headers; the best one this CPU runs is chosen at run time.
// NYSTROM_CPU_SIMD=0 turns them off (the kernels then use ATen), =avx2 keeps
// AVX2 on a CPU that has AVX-512 (for tests of both).
#pragma once

#include <cstdint>

namespace nystrom::cpu::simd {

/// Most (padded) landmarks the fused kernels take.
constexpr int64_t kMaxLandmarksFused = 256;
/// Columns of the packed operands are padded to a multiple of this.
constexpr int64_t kPadColumns = 16;

/// Which fused kernels this process uses: 0 none, 8 AVX2 (8 floats per
/// vector), 16 AVX-512. Decided once, from the CPU and NYSTROM_CPU_SIMD.
int fused_width();

/// Query side, for `rows` rows q_i (q + i * ldq, D floats each):
///   s = q_i · kT over the first m of mp columns (kT: D x mp row-major, the
///   softmax scale folded in, mp a multiple of kPadColumns, mp <= kMaxLandmarksFused);
///   lse[i] = log(sum exp s); out_i (out + i * ldo, Dv floats) = softmax(s) · w,
///   w: mp x ldw row-major, rows >= m zero, ldw >= Dv rounded up to kPadColumns
///   (columns past Dv are read, never used).
void attend_rows(const float* q, int64_t ldq, int64_t rows, int64_t D, const float* kT, int64_t m, int64_t mp,
                 const float* w, int64_t ldw, int64_t Dv, float* out, int64_t ldo, float* lse);

/// Key side, for a tile of `rows` (>= 1) keys k_i (k + i * ldk, D floats) and
/// values v_i (v + i * ldv, readable up to Dv rounded up to kPadColumns):
///   S = k · qT (qT: D x mp as kT above) into work (rows x mp);
///   col_max[j] = max_i S[i][j]; P = exp(S - col_max) in work; col_sum[j] = sum_i P[i][j];
///   pv (m x Dv, row stride ldpv) = Pᵀ · v.
/// col_max and col_sum hold mp floats (entries past m are meaningless).
void key_tile(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,
              const float* qT, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,
              int64_t ldpv);

// One copy per instruction set (simd_attend_avx2.cpp, simd_attend_avx512.cpp).
#define NYSTROM_DECLARE_SIMD_ATTEND(ns)                                                                             \
  namespace ns {                                                                                                    \
  void attend_rows(const float* q, int64_t ldq, int64_t rows, int64_t D, const float* kT, int64_t m, int64_t mp, \
                   const float* w, int64_t ldw, int64_t Dv, float* out, int64_t ldo, float* lse);                \
  void key_tile(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,   \
                const float* qT, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,   \
                int64_t ldpv);                                                                                    \
  }
NYSTROM_DECLARE_SIMD_ATTEND(avx2)
NYSTROM_DECLARE_SIMD_ATTEND(avx512)
#undef NYSTROM_DECLARE_SIMD_ATTEND

}  // namespace nystrom::cpu::simd
