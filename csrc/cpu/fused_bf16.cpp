// The bfloat16 forward and backward tile kernels of fused_bf16.h, compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma -mf16c where the compiler
// takes them (CMakeLists.txt; isa.cpp then knows they exist). The vector
// primitives (exponential, softmax of a row, column statistics, the float32
// products and the backward's per-row scores) are fused_simd.h's,
// built here once more for this instruction set.
#include "cpu/fused_bf16.h"

#include <cstdlib>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__)
#define NYSTROM_SIMD_NS bf16
#define NYSTROM_SIMD_WIDTH 16
#include "cpu/fused_simd.h"

namespace nystrom::cpu::fused::bf16 {
namespace {

// permutexvar index that interleaves the low 16 and the high 16 halves of a
// vector: element 2t <- t, element 2t + 1 <- 16 + t.
alignas(64) constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// 16 pairs: the bfloat16 roundings (nearest even) of a[t] (low half) and b[t].
inline __m512i pair_up(__m512 a, __m512 b) {
  const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // a's in the low 256 bits, b's in the high
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), both);
}

// The lanes of columns j .. j + 15 that lie below n.
inline __mmask16 lanes_below(int64_t n, int64_t j) {
  const int64_t valid = n - j < 0 ? 0 : (n - j > 16 ? 16 : n - j);
  return valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1u);
}

// The 32 bits at p (any alignment) in every lane.
inline __m512i broadcast_pair(const char* p) {
  uint32_t x;
  std::memcpy(&x, p, sizeof x);
  return _mm512_set1_epi32(static_cast<int>(x));
}

// c[r][0 .. n) (row r at c + r * ldc) = sum over kp < KP of the pair at
// a[r] + kp * ak (bytes) times the pairs b[kp * ldb + (0 .. n)], for r < rows
// (<= kMR), n <= NV * 16: one register block, as block() of fused_simd.h;
// with accumulate, c's values are the starting sums. b's rows are readable up
// to NV * 16 pairs; a[r] for r >= rows must be readable (their sums are dropped).
template <int NV>
inline void pair_block(const char* const* a, int rows, int64_t ak, int64_t KP, const uint32_t* b, int64_t ldb,
                       float* c, int64_t ldc, int64_t n, bool accumulate) {
  __m512 acc[kMR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_setzero_ps();
  if (accumulate && n == NV * 16) {
    for (int r = 0; r < rows; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_loadu_ps(c + r * ldc + j * 16);
  } else if (accumulate) {
    alignas(64) float tmp[NV * 16] = {};
    for (int r = 0; r < rows; ++r) {
      std::memcpy(tmp, c + r * ldc, n * sizeof(float));
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_load_ps(tmp + j * 16);
    }
  }
  const char* ar[kMR];
#pragma GCC unroll 8
  for (int r = 0; r < kMR; ++r) ar[r] = a[r];
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512bh bv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) bv[j] = (__m512bh)_mm512_loadu_si512(b + j * 16);
    const int64_t o = kp * ak;
#pragma GCC unroll 8
    for (int r = 0; r < kMR; ++r) {
      const __m512bh x = (__m512bh)broadcast_pair(ar[r] + o);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], x, bv[j]);
    }
    b += ldb;
  }
  alignas(64) float tmp[NV * 16];
  for (int r = 0; r < rows; ++r) {
    if (n == NV * 16) {
      for (int j = 0; j < NV; ++j) _mm512_storeu_ps(c + r * ldc + j * 16, acc[r][j]);
    } else {
      for (int j = 0; j < NV; ++j) _mm512_store_ps(tmp + j * 16, acc[r][j]);
      std::memcpy(c + r * ldc, tmp, n * sizeof(float));
    }
  }
}

// c[r][0 .. cols) for r < rows = the pair rows a (as in pair_block) times the
// (KP x cols) pairs b (row stride ldb, readable up to the next multiple of 16).
inline void pair_product(const char* const* a, int rows, int64_t ak, int64_t KP, const uint32_t* b, int64_t ldb,
                         int64_t cols, float* c, int64_t ldc, bool accumulate = false) {
  for (int64_t c0 = 0; c0 < cols; c0 += kNV * 16) {
    const int64_t n = cols - c0 < kNV * 16 ? cols - c0 : kNV * 16;
    switch ((n + 15) / 16) {
      case 1: pair_block<1>(a, rows, ak, KP, b + c0, ldb, c + c0, ldc, n, accumulate); break;
      case 2: pair_block<2>(a, rows, ak, KP, b + c0, ldb, c + c0, ldc, n, accumulate); break;
      case 3: pair_block<3>(a, rows, ak, KP, b + c0, ldb, c + c0, ldc, n, accumulate); break;
      default: pair_block<4>(a, rows, ak, KP, b + c0, ldb, c + c0, ldc, n, accumulate); break;
    }
  }
}

// Byte addresses of rows r0 .. r0 + kMR of x (row stride ld bytes); rows
// past `rows` repeat row r0.
inline int pair_row_block(const void* x, int64_t ld, int64_t r0, int64_t rows, const char* (&p)[kMR]) {
  const int n = rows - r0 < kMR ? static_cast<int>(rows - r0) : kMR;
  for (int r = 0; r < kMR; ++r) p[r] = static_cast<const char*>(x) + (r0 + (r < n ? r : 0)) * ld;
  return n;
}

// dst (ceil(rows / 2) x ldd pairs): pair (kp, j) holds x[2 kp][j] (low half)
// and x[2 kp + 1][j] for j < cols, zero for cols <= j < ldd (a multiple of 16)
// and in the high halves of a last, odd row. x: bfloat16 rows, stride ldx.
inline void pack_row_pairs(const uint16_t* x, int64_t ldx, int64_t rows, int64_t cols, uint32_t* dst, int64_t ldd) {
  // element 2t <- lo's t, element 2t + 1 <- hi's t (index 32 + t); the upper halves of the
  // widened operands are never read
  alignas(64) static constexpr uint16_t kRows[32] = {0, 32, 1, 33, 2,  34, 3,  35, 4,  36, 5,  37, 6,  38, 7,  39,
                                                     8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i interleave = _mm512_load_si512(kRows);
  for (int64_t kp = 0; kp < (rows + 1) / 2; ++kp) {
    const uint16_t* a = x + 2 * kp * ldx;
    const bool two = 2 * kp + 1 < rows;
    for (int64_t j = 0; j < ldd; j += 16) {
      const __mmask16 mask = lanes_below(cols, j);
      const __m256i lo = _mm256_maskz_loadu_epi16(mask, a + j);
      const __m256i hi = two ? _mm256_maskz_loadu_epi16(mask, a + ldx + j) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + kp * ldd + j, _mm512_permutex2var_epi16(_mm512_castsi256_si512(lo), interleave,
                                                                         _mm512_castsi256_si512(hi)));
    }
  }
}

// The bfloat16 rows x (stride ldx, cols wide) as float32 rows of dst (stride
// ldd, a multiple of 16), zero in columns cols .. ldd.
inline void widen_rows(const uint16_t* x, int64_t ldx, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < ldd; j += 16) {
      const __mmask16 mask = lanes_below(cols, j);
      // (the zero-masking forms: GCC 12's unmasked ones read an undefined
      // register and warn)
      const __m512i w = _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_maskz_loadu_epi16(mask, x + r * ldx + j));
      _mm512_storeu_ps(dst + r * ldd + j, _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, w, 16)));
    }
}

// c (m x cols, row stride ldc) = Aᵀ · B over a tile's rows, from their pairs:
// ap (KP x lda) of A (rows x m) and bp (KP x ldb) of B (rows x cols), as
// product_tn of fused_simd.h: kChunkPairs pairs (512 rows) at a time, each
// chunk adding to the sums of the chunks before it while it is in L2. 64-pair
// chunks ran slower, as there (one core, m = cols = 64, AMD EPYC Zen 4: ~80
// GMAC/s with 64 pairs, ~90 with the accumulators reloaded directly, ~105 with
// 256 pairs, for 512- and 2048-row tiles).
inline void pair_product_tn(const uint32_t* ap, int64_t lda, int64_t m, int64_t KP, const uint32_t* bp, int64_t ldb,
                            int64_t cols, float* c, int64_t ldc) {
  constexpr int64_t kChunkPairs = 256;
  for (int64_t k0 = 0; k0 < KP; k0 += kChunkPairs) {
    const int64_t kc = KP - k0 < kChunkPairs ? KP - k0 : kChunkPairs;
    for (int64_t j0 = 0; j0 < m; j0 += kMR) {
      const char* aj[kMR];
      const int n = pair_row_block(ap + k0 * lda, 4, j0, m, aj);
      pair_product(aj, n, lda * 4, kc, bp + k0 * ldb, ldb, cols, c + j0 * ldc, ldc, /*accumulate=*/k0 > 0);
    }
  }
}

// Rows [r0, r0 + n) of the float32 x (ld floats, mp columns), times
// scale[r] when scale is given, rounded to bfloat16 rows of dst
// (kMaxLandmarksFused apart); pointers to the kMR rows of the block in p, rows
// past n repeating the first.
inline void half_block(const float* x, int64_t ld, int n, int64_t mp, uint16_t (*dst)[kMaxLandmarksFused],
                       const char* (&p)[kMR], const float* scale = nullptr) {
  for (int r = 0; r < kMR; ++r) {
    p[r] = reinterpret_cast<const char*>(dst[r < n ? r : 0]);
    if (r >= n) continue;
    const __m512 s = _mm512_set1_ps(scale != nullptr ? scale[r] : 1.0f);
    for (int64_t c = 0; c < mp; c += 16) {
      const __m512 v = _mm512_loadu_ps(x + r * ld + c);
      _mm256_store_si256(reinterpret_cast<__m256i*>(dst[r] + c),
                         (__m256i)_mm512_cvtneps_pbh(scale != nullptr ? _mm512_mul_ps(v, s) : v));
    }
  }
}

// The first `cols` floats of src as bfloat16 at dst, rounded to nearest even
// with integer arithmetic and NaN as 0x7fc0, as fused::store_rows does
// (vcvtneps2bf16 would flush subnormal sums to zero).
inline void store_bf16_row(const float* src, int64_t cols, uint16_t* dst) {
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 mask = lanes_below(cols, c);
    const __m512 v = _mm512_maskz_loadu_ps(mask, src + c);
    const __m512i u = _mm512_castps_si512(v);
    // (the zero-masking forms: GCC 12's unmasked ones read an undefined
    // register and warn)
    const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(0xffff, u, 16), _mm512_set1_epi32(1));
    __m512i r =
        _mm512_maskz_srli_epi32(0xffff, _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(dst + c, mask, _mm512_maskz_cvtepi32_epi16(0xffff, r));
  }
}

}  // namespace

void pack_pairs(const float* src, int64_t lds, int64_t K, int64_t N, uint32_t* dst, int64_t ldd) {
  for (int64_t kp = 0; kp < (K + 1) / 2; ++kp) {
    const float* a = src + 2 * kp * lds;
    const bool two = 2 * kp + 1 < K;
    for (int64_t j = 0; j < ldd; j += 16) {
      const __mmask16 mask = lanes_below(N, j);
      const __m512 x = _mm512_maskz_loadu_ps(mask, a + j);
      const __m512 y = two ? _mm512_maskz_loadu_ps(mask, a + lds + j) : _mm512_setzero_ps();
      _mm512_storeu_si512(dst + kp * ldd + j, pair_up(x, y));
    }
  }
}

void attend_rows(const uint16_t* q, int64_t ldq, int64_t rows, int64_t D, const uint32_t* kTp, int64_t m,
                 int64_t mp, const uint32_t* wp, int64_t ldw, int64_t Dv, uint16_t* out, int64_t ldo, float* lse) {
  alignas(64) float s[kMR][kMaxLandmarksFused];
  alignas(64) uint16_t p16[kMR][kMaxLandmarksFused];
  constexpr int64_t kCols = kNV * 16;  // output columns per product block
  alignas(64) float o[kMR][kCols];
  const int64_t KP = (D + 1) / 2;
  for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
    const char* qr[kMR];
    const int n = pair_row_block(q, ldq * 2, r0, rows, qr);
    // logits of the block: (n x m) = q rows · kT (rows >= n repeat row 0's)
    pair_product(qr, kMR, 4, KP, kTp, mp, mp, &s[0][0], kMaxLandmarksFused);
    // exponentials and lse; the normalisation is folded into the rounding to
    // bfloat16 (the same products, one pass over the block fewer)
    float inv[kMR];
    softmax_block(&s[0][0], kMaxLandmarksFused, n, m, mp, lse + r0, inv);
    const char* pr[kMR];
    half_block(&s[0][0], kMaxLandmarksFused, n, mp, p16, pr, inv);
    // out rows = p · w, a block of columns at a time, rounded as written
    for (int64_t c0 = 0; c0 < Dv; c0 += kCols) {
      const int64_t nc = Dv - c0 < kCols ? Dv - c0 : kCols;
      pair_product(pr, n, 4, mp / 2, wp + c0, ldw, nc, &o[0][0], kCols);
      for (int r = 0; r < n; ++r) store_bf16_row(o[r], nc, out + (r0 + r) * ldo + c0);
    }
  }
}

void key_tile(const uint16_t* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,
              const uint32_t* qTp, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,
              int64_t ldpv) {
  const int64_t KP = (D + 1) / 2;
  // S = k rows · qT: (rows x mp) in work
  for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
    const char* kr[kMR];
    const int n = pair_row_block(k, ldk * 2, r0, rows, kr);
    pair_product(kr, n, 4, KP, qTp, mp, mp, work + r0 * mp, mp);
  }
  column_softmax(work, rows, mp, col_max, col_sum);
  // pv (m x Dv) = Pᵀ · v in float32 (P unrounded: see fused_bf16.h)
  product_tn(work, mp, m, rows, v, ldv, Dv, pv, ldpv);
}

void backward_tile(const PairTile& t) {
  const int64_t mp = t.mp, m = t.m, KP = (t.rows + 1) / 2;
  alignas(64) float g[kMR][kMaxLandmarksFused];
  alignas(64) uint16_t x16[kMR][kMaxLandmarksFused];
  for (int64_t r0 = 0; r0 < t.rows; r0 += kMR) {
    const char* xr[kMR];
    const char* yr[kMR];
    const int n = pair_row_block(t.x, t.ldx * 2, r0, t.rows, xr);
    pair_row_block(t.y, t.ldy * 2, r0, t.rows, yr);
    float* p = t.pbuf + r0 * mp;
    float* xb = t.xbuf + r0 * mp;
    // logits = x · b1 into the tile's P buffer; G = y · b2
    pair_product(xr, n, 4, (t.D + 1) / 2, t.b1, mp, mp, p, mp);
    pair_product(yr, n, 4, (t.Dv + 1) / 2, t.b2, mp, mp, &g[0][0], kMaxLandmarksFused);
    backward_scores(p, mp, &g[0][0], kMaxLandmarksFused, xb, mp, n, m, mp,
                    t.row_offset != nullptr ? t.row_offset + r0 : nullptr, t.col_offset, t.col_dot);
    // out1 rows = X · c1 (X rounded to bfloat16); out2 rows = P · c2 in
    // float32 (see fused_bf16.h)
    const char* xh[kMR];
    half_block(xb, mp, n, mp, x16, xh);
    pair_product(xh, n, 4, mp / 2, t.c1, t.ldc1, t.D, t.out1 + r0 * t.ldo1, t.ldo1);
    if (t.c2 != nullptr) {
      const float* pr[kMR];
      row_block(p, mp, 0, n, pr);
      product(pr, n, 1, mp, t.c2, t.ldc2, t.Dv, t.out2 + r0 * t.ldo2, t.ldo2);
    }
  }
  // t1 (m x D) = Xᵀ · x over the whole tile on the pairs of consecutive rows
  // (X rounded); t2 (m x Dv) = Pᵀ · y in float32 with P unrounded (see
  // fused_bf16.h), y widened to float32 rows in the same scratch
  uint32_t* xp = t.pairs;
  pack_pairs(t.xbuf, mp, t.rows, mp, xp, mp);
  const int64_t ldx = (t.D + 15) / 16 * 16;
  pack_row_pairs(t.x, t.ldx, t.rows, t.D, t.rbuf, ldx);
  pair_product_tn(xp, mp, m, KP, t.rbuf, ldx, t.D, t.t1, t.ldt1);
  if (t.t2 != nullptr) {
    float* yf = reinterpret_cast<float*>(t.rbuf);
    const int64_t ldy = (t.Dv + 15) / 16 * 16;
    widen_rows(t.y, t.ldy, t.rows, t.Dv, yf, ldy);
    product_tn(t.pbuf, mp, m, t.rows, yf, ldy, t.Dv, t.t2, t.ldt2);
  }
}

}  // namespace nystrom::cpu::fused::bf16

#else

// Built without AVX512-BF16 support in the compiler: bf16_products() (isa.h)
// is then false, so nothing calls these.
namespace nystrom::cpu::fused::bf16 {
void pack_pairs(const float*, int64_t, int64_t, int64_t, uint32_t*, int64_t) { std::abort(); }
void attend_rows(const uint16_t*, int64_t, int64_t, int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*,
                 int64_t, int64_t, uint16_t*, int64_t, float*) {
  std::abort();
}
void key_tile(const uint16_t*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, const uint32_t*, int64_t,
              int64_t, float*, float*, float*, float*, int64_t) {
  std::abort();
}
void backward_tile(const PairTile&) { std::abort(); }
}  // namespace nystrom::cpu::fused::bf16

#endif
