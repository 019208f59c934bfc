// The fused tile kernels of fused.h, written once with GCC/Clang vector
// extensions and compiled once per instruction set: fused_avx2.cpp
// (8 floats per vector, -mavx2 -mfma) and fused_avx512.cpp (16 floats,
// -mavx512f -mfma). Each of those defines NYSTROM_SIMD_NS (the namespace of
// its copy) and NYSTROM_SIMD_WIDTH before including this file; no torch
// header is included, so no torch inline code is built for these ISAs. The
// vector primitives they are built from are in fused_simd.h.
#include "cpu/fused_simd.h"

namespace nystrom::cpu::fused::NYSTROM_SIMD_NS {
namespace {

// ---- half-precision elements ----
// bfloat16 -> float is exact (the 16 bits become the high half); float ->
// bfloat16 rounds to nearest even with integer arithmetic, NaN -> 0x7fc0 (as
// c10::BFloat16). float16 <-> float through the F16C / AVX-512 conversions
// (round to nearest even, as c10::Half). The same results on every
// instruction set.
typedef uint32_t VU __attribute__((vector_size(kW * 4)));

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  if (f != f) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
// The rounded bfloat16 of each lane, in its low 16 bits.
inline VU bf16_bits(V v) {
  const VU u = (VU)v;
  const VU r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const VU nan = (VU)(v != v);
  return (r & ~nan) | ((VU{} + 0x7fc0u) & nan);
}

typedef uint16_t VH __attribute__((vector_size(kW * 2)));
inline V load_half(const uint16_t* p, Elem e) {
  if (e == Elem::kF16) {
#if NYSTROM_SIMD_WIDTH == 16
    return (V)_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#else
    return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  }
  VH h;
  std::memcpy(&h, p, sizeof h);
  return (V)(__builtin_convertvector(h, VU) << 16);
}
inline void store_half(uint16_t* p, V v, Elem e) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  if (e == Elem::kF16) {
#if NYSTROM_SIMD_WIDTH == 16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(0xffff, (__m512)v, kRound));
#else
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)v, kRound));
#endif
    return;
  }
  const VH h = __builtin_convertvector(bf16_bits(v), VH);
  std::memcpy(p, &h, sizeof h);
}
inline float half_to_float(uint16_t h, Elem e) { return e == Elem::kF16 ? _cvtsh_ss(h) : bf16_to_float(h); }
inline uint16_t float_to_half(float f, Elem e) {
  return e == Elem::kF16 ? _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC) : float_to_bf16(f);
}

// kW elements (one float) at element offset off of p, as floats.
inline V load_elems(const void* p, Elem e, int64_t off) {
  return e == Elem::kF32 ? load(static_cast<const float*>(p) + off) : load_half(static_cast<const uint16_t*>(p) + off, e);
}
inline float load_elem(const void* p, Elem e, int64_t off) {
  return e == Elem::kF32 ? static_cast<const float*>(p)[off] : half_to_float(static_cast<const uint16_t*>(p)[off], e);
}

// Row r of `in` as floats into dst[0, cols).
inline void load_row(const Rows& in, int64_t r, int64_t cols, float* dst) {
  const int64_t off = (in.idx != nullptr ? in.idx[r] : r) * in.rs;
  if (in.e == Elem::kF32) {
    const float* src = static_cast<const float*>(in.p) + off;
    if (in.cs == 1) {
      std::memcpy(dst, src, cols * sizeof(float));
    } else {
      for (int64_t c = 0; c < cols; ++c) dst[c] = src[c * in.cs];
    }
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(in.p) + off;
  int64_t c = 0;
  if (in.cs == 1)
    for (; c + kW <= cols; c += kW) store(dst + c, load_half(src + c, in.e));
  for (; c < cols; ++c) dst[c] = half_to_float(src[c * in.cs], in.e);
}

}  // namespace

void load_rows(const Rows& in, int64_t r0, int64_t rows, int64_t cols, float* dst, int64_t ldd, int64_t pad_to) {
  for (int64_t i = 0; i < rows; ++i) {
    float* d = dst + i * ldd;
    load_row(in, r0 + i, cols, d);
    for (int64_t c = cols; c < pad_to; ++c) d[c] = 0.0f;
  }
}

void store_rows(const float* src, int64_t lds, int64_t r0, int64_t rows, int64_t cols, const Rows& out) {
  for (int64_t i = 0; i < rows; ++i) {
    const float* s = src + i * lds;
    const int64_t off = (out.idx != nullptr ? out.idx[r0 + i] : r0 + i) * out.rs;
    if (out.e == Elem::kF32) {
      float* d = static_cast<float*>(const_cast<void*>(out.p)) + off;
      for (int64_t c = 0; c < cols; ++c) d[c * out.cs] = s[c];
      continue;
    }
    uint16_t* d = static_cast<uint16_t*>(const_cast<void*>(out.p)) + off;
    int64_t c = 0;
    if (out.cs == 1)
      for (; c + kW <= cols; c += kW) store_half(d + c, load(s + c), out.e);
    for (; c < cols; ++c) d[c * out.cs] = float_to_half(s[c], out.e);
  }
}

// The sums over rows [r0, r1) of `in` (unit column stride, elements E) of
// the NV vectors of columns from c0, into o[c0 ..): NV accumulators in
// registers, rows added in order (the same sums, bit for bit, as adding each
// row to a zeroed row in memory; that loop waited on its own stores: 2.6 % of
// the bfloat16 forward at n = 4096).
template <int NV, Elem E>
inline void column_sums(const Rows& in, int64_t r0, int64_t r1, int64_t c0, float* o) {
  V acc[NV];
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) acc[j] = splat(0.0f);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = (in.idx != nullptr ? in.idx[r] : r) * in.rs + c0;
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[j] += load_elems(in.p, E, off + j * kW);
  }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) store(o + c0 + j * kW, acc[j]);
}

template <Elem E>
inline void segment_vector_sums(const Rows& in, int64_t r0, int64_t r1, int64_t vectors, float* o) {
  int64_t v = 0;
  for (; v + 4 <= vectors; v += 4) column_sums<4, E>(in, r0, r1, v * kW, o);
  switch (vectors - v) {
    case 3: column_sums<3, E>(in, r0, r1, v * kW, o); break;
    case 2: column_sums<2, E>(in, r0, r1, v * kW, o); break;
    case 1: column_sums<1, E>(in, r0, r1, v * kW, o); break;
    default: break;
  }
}

void segment_sums(const Rows& in, int64_t n, int64_t ms, int64_t d, float* sums) {
  // whole vectors of columns in registers where the columns are contiguous;
  // the rest (a tail narrower than a vector, or strided columns) per element
  const int64_t vectors = in.cs == 1 ? d / kW : 0;
  for (int64_t j = 0; j < ms; ++j) {
    float* o = sums + j * d;
    const int64_t r0 = segment_start(j, n, ms), r1 = segment_start(j + 1, n, ms);
    switch (in.e) {
      case Elem::kF32: segment_vector_sums<Elem::kF32>(in, r0, r1, vectors, o); break;
      case Elem::kBf16: segment_vector_sums<Elem::kBf16>(in, r0, r1, vectors, o); break;
      case Elem::kF16: segment_vector_sums<Elem::kF16>(in, r0, r1, vectors, o); break;
    }
    for (int64_t c = vectors * kW; c < d; ++c) {
      float s = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        s += load_elem(in.p, in.e, (in.idx != nullptr ? in.idx[r] : r) * in.rs + c * in.cs);
      o[c] = s;
    }
  }
}

void add_shares_store(const Rows& in, const Rows& out, int64_t r0, int64_t r1, int64_t n, int64_t ms,
                      const float* shares, int64_t cols) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = in.idx != nullptr ? in.idx[r] : r;
    const float* s = static_cast<const float*>(in.p) + row * in.rs;
    const float* a = shares + segment_of(r, n, ms) * cols;
    if (out.e == Elem::kF32) {
      float* d = static_cast<float*>(const_cast<void*>(out.p)) + row * out.rs;
      for (int64_t c = 0; c < cols; ++c) d[c] = s[c] + a[c];
      continue;
    }
    // the sum in float32, then one rounding: what adding in place and
    // store_rows gave, bit for bit
    uint16_t* d = static_cast<uint16_t*>(const_cast<void*>(out.p)) + row * out.rs;
    int64_t c = 0;
    for (; c + kW <= cols; c += kW) store_half(d + c, load(s + c) + load(a + c), out.e);
    for (; c < cols; ++c) d[c] = float_to_half(s[c] + a[c], out.e);
  }
}

void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld, float* max, float* sum, bool normalize) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    V vm = splat(-INFINITY);
    int64_t c = 0;
    for (; c + kW <= cols; c += kW) vm = vmax(vm, load(row + c));
    float mx = hmax(vm);
    for (; c < cols; ++c) mx = fmax2(row[c], mx);
    float s = 0.0f;
    exp_in_place(row, cols, mx, &s);
    max[r] = mx;
    sum[r] = s;
    if (normalize) {
      const float inv = 1.0f / s;
      for (c = 0; c < cols; ++c) row[c] *= inv;
    }
  }
}

void exp_shifted_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* offset) {
  for (int64_t r = 0; r < rows; ++r) exp_in_place(x + r * ld, cols, offset[r], nullptr);
}

void attend_rows(const float* q, int64_t ldq, int64_t rows, int64_t D, const float* kT, int64_t m, int64_t mp,
                 const float* w, int64_t ldw, int64_t Dv, float* out, int64_t ldo, float* lse) {
  alignas(64) float s[kMR][kMaxLandmarksFused];
  for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
    const float* qr[kMR];
    const int n = row_block(q, ldq, r0, rows, qr);
    // logits of the block: (n x m) = q rows · kT (rows >= n repeat row 0's)
    product(qr, kMR, 1, D, kT, mp, mp, &s[0][0], kMaxLandmarksFused);
    softmax_block(&s[0][0], kMaxLandmarksFused, n, m, mp, lse + r0);
    const float* pr[kMR];
    for (int r = 0; r < kMR; ++r) pr[r] = s[r < n ? r : 0];
    // out rows = p · w
    product(pr, n, 1, mp, w, ldw, Dv, out + r0 * ldo, ldo);
  }
}

void key_tile(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,
              const float* qT, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,
              int64_t ldpv) {
  // S = k rows · qT: (rows x mp) in work
  for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
    const float* kr[kMR];
    const int n = row_block(k, ldk, r0, rows, kr);
    product(kr, n, 1, D, qT, mp, mp, work + r0 * mp, mp);
  }
  column_softmax(work, rows, mp, col_max, col_sum);
  // pv (m x Dv) = Pᵀ · v
  product_tn(work, mp, m, rows, v, ldv, Dv, pv, ldpv);
}

void backward_tile(const BackwardTile& t) {
  const int64_t mp = t.mp, m = t.m;
  alignas(64) float g[kMR][kMaxLandmarksFused];
  for (int64_t r0 = 0; r0 < t.rows; r0 += kMR) {
    const float* xr[kMR];
    const float* yr[kMR];
    const int n = row_block(t.x, t.ldx, r0, t.rows, xr);
    row_block(t.y, t.ldy, r0, t.rows, yr);
    float* p = t.pbuf + r0 * mp;
    float* xb = t.xbuf + r0 * mp;
    // P = exp(x · b1 - offset), straight into the tile's P buffer; G = y · b2
    product(xr, n, 1, t.D, t.b1, mp, mp, p, mp);
    product(yr, n, 1, t.Dv, t.b2, mp, mp, &g[0][0], kMaxLandmarksFused);
    const float* pr[kMR];
    for (int r = 0; r < kMR; ++r) pr[r] = xb + (r < n ? r : 0) * mp;
    backward_scores(p, mp, &g[0][0], kMaxLandmarksFused, xb, mp, n, m, mp,
                    t.row_offset != nullptr ? t.row_offset + r0 : nullptr, t.col_offset, t.col_dot);
    // out1 rows = X · c1; out2 rows = P · c2
    product(pr, n, 1, mp, t.c1, t.ldc1, t.D, t.out1 + r0 * t.ldo1, t.ldo1);
    if (t.c2 != nullptr) {
      const float* ppr[kMR];
      for (int r = 0; r < kMR; ++r) ppr[r] = p + (r < n ? r : 0) * mp;
      product(ppr, n, 1, mp, t.c2, t.ldc2, t.Dv, t.out2 + r0 * t.ldo2, t.ldo2);
    }
  }
  // t1 (m x D) = Xᵀ · x and t2 (m x Dv) = Pᵀ · y over the whole tile
  product_tn(t.xbuf, mp, m, t.rows, t.x, t.ldx, t.D, t.t1, t.ldt1);
  if (t.t2 != nullptr) product_tn(t.pbuf, mp, m, t.rows, t.y, t.ldy, t.Dv, t.t2, t.ldt2);
}

void newton_schulz(const float* A, float c, int64_t iterations, int64_t n, float* Z, bool keep_all, float* work) {
  const int64_t nn = n * n;
  float* X = work;
  float* Y3 = work + nn;
  float* Y2 = work + 2 * nn;
  float* Y1 = work + 3 * nn;
  float* tmp = work + 4 * nn;
  float* spare = work + 5 * nn;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) Z[i * n + j] = A[j * n + i] / c;
  float* cur = Z;
  for (int64_t t = 0; t < iterations; ++t) {
    float* next = keep_all ? Z + (t + 1) * nn : (cur == Z ? spare : Z);
    iteration_terms(A, cur, n, X, Y3, Y2, Y1, tmp);
    square_product(cur, false, Y1, false, next, n, nullptr);  // 1/4 cur Y1
    scale(0.25f, next, n);
    cur = next;
  }
  if (!keep_all && cur != Z) std::memcpy(Z, cur, nn * sizeof(float));
}

double newton_schulz_backward(const float* A, float c, const float* Z, int64_t iterations, int64_t n, float* dZ,
                              float* dA, float* work) {
  const int64_t nn = n * n;
  float* X = work;
  float* Y1 = work + nn;
  float* Y2 = work + 2 * nn;
  float* Y3 = work + 3 * nn;
  float* dY1 = work + 4 * nn;
  float* dY2 = work + 5 * nn;
  float* dX = work + 6 * nn;
  float* tmp = work + 7 * nn;
  float* dZt = work + 8 * nn;
  float* tb = work + 9 * nn;
  std::memset(dA, 0, nn * sizeof(float));
  for (int64_t t = iterations - 1; t >= 0; --t) {
    const float* Zt = Z + t * nn;
    iteration_terms(A, Zt, n, X, Y3, Y2, Y1, tmp);
    // Z_{t+1} = 1/4 Zt Y1
    square_product(Zt, true, dZ, false, dY1, n, nullptr);
    scale(0.25f, dY1, n);
    square_product(dZ, false, Y1, true, dZt, n, tb);
    scale(0.25f, dZt, n);
    // back through Y1, Y2, Y3 to X
    square_product(dY1, false, Y2, true, dX, n, tb);
    scale(-1.0f, dX, n);
    square_product(X, true, dY1, false, dY2, n, nullptr);
    scale(-1.0f, dY2, n);
    square_product(dY2, false, Y3, true, tmp, n, tb);
    add_scaled(-1.0f, tmp, dX, n);
    square_product(X, true, dY2, false, tmp, n, nullptr);
    add_scaled(1.0f, tmp, dX, n);
    // X = A Zt
    square_product(dX, false, Zt, true, tmp, n, tb);
    add_scaled(1.0f, tmp, dA, n);
    square_product(A, true, dX, false, tmp, n, nullptr);
    add_scaled(1.0f, tmp, dZt, n);
    std::memcpy(dZ, dZt, nn * sizeof(float));
  }
  // Z_0 = Aᵀ / c
  double dot = 0.0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      dA[j * n + i] += dZ[i * n + j] / c;
      dot += static_cast<double>(dZ[i * n + j]) * Z[i * n + j];
    }
  return -dot / c;
}

}  // namespace nystrom::cpu::fused::NYSTROM_SIMD_NS
