// Run-time choice among the fused kernels of simd_attend.h. Compiled without
// any ISA flag: it only reads the CPU's features and forwards the calls.
#include "cpu/simd_attend.h"

#include <cstdlib>
#include <string>

namespace nystrom::cpu::simd {

int fused_width() {
  static const int width = [] {
#if defined(NYSTROM_X86_SIMD)
    const char* env = std::getenv("NYSTROM_CPU_SIMD");
    const std::string want = env == nullptr ? "" : env;
    if (want == "0") return 0;
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
    if (avx512 && want != "avx2") return 16;
    return avx2 ? 8 : 0;
#else
    return 0;
#endif
  }();
  return width;
}

void attend_rows(const float* q, int64_t ldq, int64_t rows, int64_t D, const float* kT, int64_t m, int64_t mp,
                 const float* w, int64_t ldw, int64_t Dv, float* out, int64_t ldo, float* lse) {
#if defined(NYSTROM_X86_SIMD)
  if (fused_width() == 16) return avx512::attend_rows(q, ldq, rows, D, kT, m, mp, w, ldw, Dv, out, ldo, lse);
  if (fused_width() == 8) return avx2::attend_rows(q, ldq, rows, D, kT, m, mp, w, ldw, Dv, out, ldo, lse);
#endif
  std::abort();  // callers check fused_width() first
}

void key_tile(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,
              const float* qT, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,
              int64_t ldpv) {
#if defined(NYSTROM_X86_SIMD)
  if (fused_width() == 16)
    return avx512::key_tile(k, ldk, v, ldv, rows, D, Dv, qT, m, mp, work, col_max, col_sum, pv, ldpv);
  if (fused_width() == 8)
    return avx2::key_tile(k, ldk, v, ldv, rows, D, Dv, qT, m, mp, work, col_max, col_sum, pv, ldpv);
#endif
  std::abort();
}

void backward_tile(const BackwardTile& t) {
#if defined(NYSTROM_X86_SIMD)
  if (fused_width() == 16) return avx512::backward_tile(t);
  if (fused_width() == 8) return avx2::backward_tile(t);
#endif
  std::abort();
}

void newton_schulz(const float* A, float c, int64_t iterations, int64_t n, float* Z, bool keep_all, float* work) {
#if defined(NYSTROM_X86_SIMD)
  if (fused_width() == 16) return avx512::newton_schulz(A, c, iterations, n, Z, keep_all, work);
  if (fused_width() == 8) return avx2::newton_schulz(A, c, iterations, n, Z, keep_all, work);
#endif
  std::abort();
}

double newton_schulz_backward(const float* A, float c, const float* Z, int64_t iterations, int64_t n, float* dZ,
                              float* dA, float* work) {
#if defined(NYSTROM_X86_SIMD)
  if (fused_width() == 16) return avx512::newton_schulz_backward(A, c, Z, iterations, n, dZ, dA, work);
  if (fused_width() == 8) return avx2::newton_schulz_backward(A, c, Z, iterations, n, dZ, dA, work);
#endif
  std::abort();
}

}  // namespace nystrom::cpu::simd
