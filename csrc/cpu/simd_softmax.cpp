// AVX2/FMA loops of simd_softmax.h. Compiled with -mavx2 -mfma on x86-64
// (CMakeLists.txt); elsewhere, or without those flags, available() is false
// and the kernels use ATen instead.
#include "simd_softmax.h"

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define NYSTROM_HAVE_AVX2 1
#else
#define NYSTROM_HAVE_AVX2 0
#endif

namespace nystrom::cpu::simd {

#if NYSTROM_HAVE_AVX2
namespace {

// exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-7
// polynomial (Taylor coefficients; truncation error r^8/8! < 6e-8 relative),
// 2^n through the exponent bits. Below -87.3 the result is 0 (e^x would be
// subnormal), so exp(-inf) = 0 as well.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.7f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two for accuracy
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The last (cols % 8) columns, through the same polynomial (no reads past the row).
inline float exp1(float x) {
  alignas(32) float buf[8] = {x, 0, 0, 0, 0, 0, 0, 0};
  _mm256_store_ps(buf, exp8(_mm256_load_ps(buf)));
  return buf[0];
}

}  // namespace

bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld, float* max, float* sum, bool normalize) {
  const int64_t vec = cols - cols % 8;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (int64_t c = 0; c < vec; c += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + c));
    float m = hmax(vm);
    for (int64_t c = vec; c < cols; ++c) m = std::fmax(m, row[c]);
    const __m256 vmax = _mm256_set1_ps(m);
    __m256 vs = _mm256_setzero_ps();
    for (int64_t c = 0; c < vec; c += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + c), vmax));
      _mm256_storeu_ps(row + c, e);
      vs = _mm256_add_ps(vs, e);
    }
    float s = hsum(vs);
    for (int64_t c = vec; c < cols; ++c) {
      row[c] = exp1(row[c] - m);
      s += row[c];
    }
    max[r] = m;
    sum[r] = s;
    if (normalize) {
      const float inv = 1.0f / s;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int64_t c = 0; c < vec; c += 8) _mm256_storeu_ps(row + c, _mm256_mul_ps(_mm256_loadu_ps(row + c), vinv));
      for (int64_t c = vec; c < cols; ++c) row[c] *= inv;
    }
  }
}

void exp_shifted_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* offset) {
  const int64_t vec = cols - cols % 8;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    const __m256 off = _mm256_set1_ps(offset[r]);
    for (int64_t c = 0; c < vec; c += 8) _mm256_storeu_ps(row + c, exp8(_mm256_sub_ps(_mm256_loadu_ps(row + c), off)));
    for (int64_t c = vec; c < cols; ++c) row[c] = exp1(row[c] - offset[r]);
  }
}

#else  // no AVX2/FMA at compile time

bool available() { return false; }
void softmax_rows(float*, int64_t, int64_t, int64_t, float*, float*, bool) {}
void exp_shifted_rows(float*, int64_t, int64_t, int64_t, const float*) {}

#endif

}  // namespace nystrom::cpu::simd
