// The vector primitives of the fused CPU kernels (fused_impl.h): vector types,
// loads and stores, the one exponential, horizontal folds, the register-blocked
// products and the small square-matrix helpers of Newton–Schulz. Included only
// by fused_impl.h, inside its per-instruction-set namespace NYSTROM_SIMD_NS
// (defined with NYSTROM_SIMD_WIDTH by fused_avx2.cpp / fused_avx512.cpp).
//
// The products are register-blocked: a block of kMR rows of the left operand
// times kNV vectors of columns of the right one accumulates in kMR x kNV
// vector registers, each left element broadcast once per step of the inner
// dimension. Operands are read where they lie (row pointers and strides); only
// the small per-head matrices are packed, by the caller.
#pragma once

#include "cpu/fused.h"
#include "element.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if !defined(NYSTROM_SIMD_NS) || !defined(NYSTROM_SIMD_WIDTH)
#error "define NYSTROM_SIMD_NS and NYSTROM_SIMD_WIDTH before including fused_simd.h (through fused_impl.h)"
#endif

namespace nystrom::cpu::fused::NYSTROM_SIMD_NS {
namespace {

constexpr int kW = NYSTROM_SIMD_WIDTH;  // floats per vector
typedef float V __attribute__((vector_size(kW * 4)));
typedef int32_t VI __attribute__((vector_size(kW * 4)));

// Rows per register block, and the most column vectors per block: 6 x 2 (AVX2,
// 12 accumulators of 16) or 6 x 4 (AVX-512, 24 of 32).
constexpr int kMR = 6;
constexpr int kNV = kW == 8 ? 2 : 4;

inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
inline V splat(float x) {
  return x - V{};  // x - 0 is x for every x (also -0), so this folds to a broadcast
}
inline V select(VI mask, V a, V b) {  // mask ? a : b, lane by lane
  return (V)(((VI)a & mask) | ((VI)b & ~mask));
}
inline V vmax(V a, V b) { return select(a > b, a, b); }

// exp(x) lane by lane, the one exponential of the CPU kernels: x = n ln2 + r,
// |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation below 6e-8
// relative; 7e-8 measured against exp in double), 2^n through the exponent
// bits; 0 below -87.3 (e^x would be subnormal), so exp(-inf) = 0; NaN gives
// NaN (as ATen's exp does, so a NaN input is not silently dropped).
inline V vexp(V x) {
  const V lo = splat(-87.3f), hi = splat(88.7f);
  const VI under = x < lo;
  x = select(under, lo, x);  // clamps that keep a NaN a NaN (vmax would replace it by lo)
  x = select(x > hi, hi, x);
  // n = round(x / ln2): adding 1.5 * 2^23 rounds to an integer, which then
  // sits in the low mantissa bits.
  const V magic = splat(12582912.0f);
  const V t = x * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  V p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VI e = (((VI)t - (VI)magic) + 127) << 23;
  return select(under, splat(0.0f), p * (V)e);
}

// The larger of a and b; b when a is NaN (as fmax, which is a libm call here).
inline float fmax2(float a, float b) { return a > b ? a : b; }

// Horizontal maximum and sum of a vector: halves folded onto each other
// (a fixed order, so results repeat bitwise), then the last four lanes.
inline __m128 fold_to_128(V v, bool max) {
#if NYSTROM_SIMD_WIDTH == 16
  // register-to-register halves (a memcpy of the halves kept the running
  // maxima and sums of the callers' loops in memory, a store-to-load chain)
  const __m512 w = (__m512)v;
  const __m256 lo8 = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(w), 0));
  const __m256 hi8 = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(w), 1));
  const __m256 x = max ? _mm256_max_ps(lo8, hi8) : _mm256_add_ps(lo8, hi8);
#else
  const __m256 x = (__m256)v;
#endif
  const __m128 lo = _mm256_castps256_ps128(x), hi = _mm256_extractf128_ps(x, 1);
  return max ? _mm_max_ps(lo, hi) : _mm_add_ps(lo, hi);
}
inline float hmax(V v) {
  __m128 x = fold_to_128(v, true);
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}
inline float hsum(V v) {
  __m128 x = fold_to_128(v, false);
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_shuffle_ps(x, x, 1));
  return _mm_cvtss_f32(x);
}

// c[r][0 .. n) (row r at c + r * ldc) = sum_k a[r][k * ak] * b[k * ldb + (0 .. n)]
// for r < rows (<= kMR), n <= NV * kW: one register block of a product; with
// accumulate, c's values are the starting sums (c += ...). b's rows are
// readable up to NV * kW floats; a[r] for r >= rows must be readable (their
// sums are dropped).
template <int NV>
inline void block(const float* const* a, int rows, int64_t ak, int64_t K, const float* b, int64_t ldb, float* c,
                  int64_t ldc, int64_t n, bool accumulate) {
  V acc[kMR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = splat(0.0f);
  if (accumulate && n == NV * kW) {
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = load(c + r * ldc + j * kW);
  } else if (accumulate) {  // a narrow block: through a buffer, reading only n floats of c
    alignas(64) float tmp[NV * kW] = {};
    for (int r = 0; r < rows; ++r) {
      std::memcpy(tmp, c + r * ldc, n * sizeof(float));
      for (int j = 0; j < NV; ++j) acc[r][j] = load(tmp + j * kW);
    }
  }
  const float* ar[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) ar[r] = a[r];
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = load(b + j * kW);
    const int64_t o = k * ak;
    // one broadcast live at a time: 12 accumulators, 2 columns and 1
    // broadcast fill AVX2's 16 registers
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const V x = splat(ar[r][o]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] += x * bv[j];
    }
    b += ldb;
  }
  if (n == NV * kW) {
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      if (r < rows) {
#pragma GCC unroll 8
        for (int j = 0; j < NV; ++j) store(c + r * ldc + j * kW, acc[r][j]);
      }
    }
  } else {
    alignas(64) float tmp[NV * kW];
    for (int r = 0; r < rows; ++r) {
      for (int j = 0; j < NV; ++j) store(tmp + j * kW, acc[r][j]);
      std::memcpy(c + r * ldc, tmp, n * sizeof(float));
    }
  }
}

// c[r][0 .. cols) for r < rows (<= kMR) = rows of a (as in block) times the
// (K x cols) matrix b (row stride ldb, readable up to the next multiple of kW
// columns); row r of c at c + r * ldc.
inline void product(const float* const* a, int rows, int64_t ak, int64_t K, const float* b, int64_t ldb,
                    int64_t cols, float* c, int64_t ldc, bool accumulate = false) {
  for (int64_t c0 = 0; c0 < cols; c0 += kNV * kW) {
    const int64_t n = cols - c0 < kNV * kW ? cols - c0 : kNV * kW;
    switch ((n + kW - 1) / kW) {
      case 1:
        block<1>(a, rows, ak, K, b + c0, ldb, c + c0, ldc, n, accumulate);
        break;
      case 2:
        block<2>(a, rows, ak, K, b + c0, ldb, c + c0, ldc, n, accumulate);
        break;
      case 3:
        if constexpr (kNV >= 3) block<3>(a, rows, ak, K, b + c0, ldb, c + c0, ldc, n, accumulate);
        break;
      default:
        if constexpr (kNV >= 4) block<4>(a, rows, ak, K, b + c0, ldb, c + c0, ldc, n, accumulate);
        break;
    }
  }
}

// Pointers to rows r0 .. r0 + kMR of x (row stride ld); rows past `rows`
// repeat row r0 (read, never written back).
inline int row_block(const float* x, int64_t ld, int64_t r0, int64_t rows, const float* (&p)[kMR]) {
  const int n = rows - r0 < kMR ? static_cast<int>(rows - r0) : kMR;
  for (int r = 0; r < kMR; ++r) p[r] = x + (r0 + (r < n ? r : 0)) * ld;
  return n;
}

// c (m x cols, row stride ldc) = aᵀ · b over the K rows of a tile: a is K x m
// (row stride lda, its first m columns), b is K x cols (row stride ldb,
// readable up to the next multiple of kW columns). The rows are taken
// kChunkRows at a time, every row block of c passing over a chunk while it is
// in L2, and each chunk adds to the sums of the chunks before it: the same
// sums in the same order as one pass. Chunks of 64 rows (a chunk of a and b
// in L1) ran slower: each chunk reloads and stores every accumulator block,
// and that cost more than reading the chunk from L2
// (benchmarks/micro/product_tn.cpp, AMD EPYC Zen 4, one core, m = cols = 64:
// 39 -> 55 GMAC/s for a 2048-row tile, 42 -> 54 for 512 rows, with the
// accumulators reloaded directly in block()).
inline void product_tn(const float* a, int64_t lda, int64_t m, int64_t K, const float* b, int64_t ldb, int64_t cols,
                       float* c, int64_t ldc) {
  constexpr int64_t kChunkRows = 512;
  for (int64_t k0 = 0; k0 < K; k0 += kChunkRows) {
    const int64_t kc = K - k0 < kChunkRows ? K - k0 : kChunkRows;
    for (int64_t j0 = 0; j0 < m; j0 += kMR) {
      const float* aj[kMR];
      const int n = row_block(a + k0 * lda, 1, j0, m, aj);
      product(aj, n, lda, kc, b + k0 * ldb, ldb, cols, c + j0 * ldc, ldc, /*accumulate=*/k0 > 0);
    }
  }
}

// c = op(a) · op(b) for n x n row-major matrices (n a multiple of kW);
// op(x) = xᵀ when the flag is set. A transposed right operand is copied into
// tbuf (n x n) first; a transposed left one is read down its columns.
inline void square_product(const float* a, bool ta, const float* b, bool tb, float* c, int64_t n, float* tbuf) {
  if (tb) {
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) tbuf[j * n + i] = b[i * n + j];
    b = tbuf;
  }
  for (int64_t r0 = 0; r0 < n; r0 += kMR) {
    const float* pr[kMR];
    const int rows = ta ? row_block(a, 1, r0, n, pr) : row_block(a, n, r0, n, pr);
    product(pr, rows, ta ? n : 1, n, b, n, n, c + r0 * n, n);
  }
}

// t = k I - x (n x n)
inline void identity_minus(float k, const float* x, float* t, int64_t n) {
  for (int64_t i = 0; i < n * n; ++i) t[i] = -x[i];
  for (int64_t i = 0; i < n; ++i) t[i * n + i] += k;
}

// x *= s; y += s * x (n x n)
inline void scale(float s, float* x, int64_t n) {
  for (int64_t i = 0; i < n * n; ++i) x[i] *= s;
}
inline void add_scaled(float s, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n * n; ++i) y[i] += s * x[i];
}

// One Newton–Schulz iteration's terms: X = A Z, Y3 = 7I - X,
// Y2 = 15I - X Y3, Y1 = 13I - X Y2 (n x n each; tmp is scratch).
inline void iteration_terms(const float* A, const float* Z, int64_t n, float* X, float* Y3, float* Y2, float* Y1,
                            float* tmp) {
  square_product(A, false, Z, false, X, n, nullptr);
  identity_minus(7.0f, X, Y3, n);
  square_product(X, false, Y3, false, tmp, n, nullptr);
  identity_minus(15.0f, tmp, Y2, n);
  square_product(X, false, Y2, false, tmp, n, nullptr);
  identity_minus(13.0f, tmp, Y1, n);
}


// exp of each of the n floats at x, in place, through vexp: whole vectors,
// then the tail through a zero-padded vector (no access past x + n).
inline void exp_in_place(float* x, int64_t n, float shift, float* sum) {
  V vs = splat(0.0f);
  const V vshift = splat(shift);
  int64_t c = 0;
  for (; c + kW <= n; c += kW) {
    const V e = vexp(load(x + c) - vshift);
    store(x + c, e);
    vs += e;
  }
  float s = hsum(vs);
  if (c < n) {
    alignas(64) float tail[kW] = {};
    std::memcpy(tail, x + c, (n - c) * sizeof(float));
    const V e = vexp(load(tail) - vshift);
    store(tail, e);
    for (int64_t i = 0; i < n - c; ++i) s += tail[i];
    std::memcpy(x + c, tail, (n - c) * sizeof(float));
  }
  if (sum != nullptr) *sum = s;
}

// Softmax of a register block's kMR rows of logits (row r at s + r * ld) over
// their m real columns, in place, normalised; the padding columns m .. mp (mp
// a multiple of kW) get probability 0. The rows are processed side by side (six
// independent chains of maxima, exponentials and sums, not one row's
// dependent chain after another's); every row must hold finite or -inf logits.
// lse[r] = the log-sum-exp of row r, for r < rows. With inv given, the rows
// are left unnormalised and inv[r] = 1 / (row r's sum) for every r < kMR
// (the caller multiplies by it as it reads them).
inline void softmax_block(float* s, int64_t ld, int rows, int64_t m, int64_t mp, float* lse, float* inv_out = nullptr) {
  V vm[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) vm[r] = splat(-INFINITY);
  int64_t c = 0;
  for (; c + kW <= m; c += kW)
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) vm[r] = vmax(vm[r], load(s + r * ld + c));
  float mx[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    float* row = s + r * ld;
    mx[r] = hmax(vm[r]);
    for (int64_t t = c; t < m; ++t) mx[r] = fmax2(row[t], mx[r]);
    for (int64_t t = m; t < mp; ++t) row[t] = -INFINITY;
  }
  V vs[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) vs[r] = splat(0.0f);
  for (c = 0; c < mp; c += kW)
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const V e = vexp(load(s + r * ld + c) - mx[r]);
      store(s + r * ld + c, e);
      vs[r] += e;
    }
  V inv[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) {
    const float sum = hsum(vs[r]);
    inv[r] = splat(1.0f / sum);
    if (inv_out != nullptr) inv_out[r] = 1.0f / sum;
    if (r < rows) lse[r] = std::log(sum) + mx[r];
  }
  if (inv_out != nullptr) return;
  for (c = 0; c < mp; c += kW)
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) store(s + r * ld + c, load(s + r * ld + c) * inv[r]);
}

// The backward's probabilities and scores of a register block's rows
// (backward_tile of fused.h): row r's logits (p + r * ldp, mp columns) become
// P = exp(logit - offset) in place, offset = row_offset[r] (the query pass:
// its saved log-sum-exp) or col_offset[j] (the key pass), and x + r * ldx gets
// X = (G - d) * P with G at g + r * ldg and d = sum_j P_rj G_rj (row_offset
// given) or col_dot[j]. Padding columns (j >= m) get P = 0 and X = 0.
inline void backward_scores(float* p, int64_t ldp, const float* g, int64_t ldg, float* x, int64_t ldx, int rows,
                            int64_t m, int64_t mp, const float* row_offset, const float* col_offset,
                            const float* col_dot) {
  for (int r = 0; r < rows; ++r) {
    float* prow = p + r * ldp;
    const float* grow = g + r * ldg;
    float* xrow = x + r * ldx;
    V dot = splat(0.0f);
    // Padding columns (j >= m) have logit 0, so exp(logit - offset) there
    // overflows once the log-sum-exp offset is below about -88 (sharp
    // logits); inf times G's zero there would make the row NaN. Their
    // logits become -inf, hence P = 0.
    for (int64_t c = m; c < mp; ++c) prow[c] = -INFINITY;
    if (row_offset != nullptr) {
      const V off = splat(row_offset[r]);
      for (int64_t c = 0; c < mp; c += kW) {
        const V e = vexp(load(prow + c) - off);
        store(prow + c, e);
        dot += e * load(grow + c);
      }
      const V d = splat(hsum(dot));
      for (int64_t c = 0; c < mp; c += kW) store(xrow + c, (load(grow + c) - d) * load(prow + c));
    } else {
      for (int64_t c = 0; c < mp; c += kW) {
        const V e = vexp(load(prow + c) - load(col_offset + c));
        store(prow + c, e);
        store(xrow + c, (load(grow + c) - load(col_dot + c)) * e);
      }
    }
  }
}

// A key tile's logits S (rows x mp, row stride mp) in place to P = exp(S -
// col_max), with col_max[j] = max_i S[i][j] and col_sum[j] = sum_i P[i][j].
// Up to four vectors of columns at a time, their maxima and sums kept in
// registers over the rows (the sums in row order, as one running sum per
// column); through memory, every row's update waited on the previous row's
// store (col_max and col_sum may alias the tile for the compiler).
template <int NV>
inline void column_softmax_block(float* work, int64_t rows, int64_t mp, float* col_max, float* col_sum) {
  V mx[NV], sum[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) mx[j] = splat(-INFINITY);
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) mx[j] = vmax(mx[j], load(work + r * mp + j * kW));
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) sum[j] = splat(0.0f);
  for (int64_t r = 0; r < rows; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      float* x = work + r * mp + j * kW;
      const V e = vexp(load(x) - mx[j]);
      store(x, e);
      sum[j] += e;
    }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    store(col_max + j * kW, mx[j]);
    store(col_sum + j * kW, sum[j]);
  }
}

inline void column_softmax(float* work, int64_t rows, int64_t mp, float* col_max, float* col_sum) {
  constexpr int64_t kBlock = 4 * kW;
  int64_t c = 0;
  for (; c + kBlock <= mp; c += kBlock) column_softmax_block<4>(work + c, rows, mp, col_max + c, col_sum + c);
  switch ((mp - c) / kW) {
    case 3: column_softmax_block<3>(work + c, rows, mp, col_max + c, col_sum + c); break;
    case 2: column_softmax_block<2>(work + c, rows, mp, col_max + c, col_sum + c); break;
    case 1: column_softmax_block<1>(work + c, rows, mp, col_max + c, col_sum + c); break;
    default: break;
  }
}

}  // namespace
}  // namespace nystrom::cpu::fused::NYSTROM_SIMD_NS
