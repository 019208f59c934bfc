// The CPU tile product c = aᵀ·b of the fused kernels (csrc/cpu/fused_simd.h:
// product_tn, the forward key tile's Pᵀ·v and the backward's landmark-side
// sums) alone, on one core: GMAC/s for a K-row tile, m = cols = 64.
//
//   g++ -O2 -std=c++20 -mavx512f -mavx512bw -mavx512vl -mfma -mf16c -Icsrc \
//       benchmarks/micro/product_tn.cpp -o /tmp/product_tn
//   taskset -c 1 /tmp/product_tn 2048 500      # K, repetitions
//
// (-mavx2 -mfma -mf16c and NYSTROM_MICRO_WIDTH=8 for the AVX2 copy.) Best of
// five timed runs; the operands stay in L2 for K <= 2048, as in the kernels,
// which run a tile right after writing it.
#ifndef NYSTROM_MICRO_WIDTH
#define NYSTROM_MICRO_WIDTH 16
#endif
#define NYSTROM_SIMD_NS micro
#define NYSTROM_SIMD_WIDTH NYSTROM_MICRO_WIDTH
#include "cpu/fused_simd.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s K repetitions\n", argv[0]);
    return 2;
  }
  const int64_t K = std::atoll(argv[1]), reps = std::atoll(argv[2]), m = 64, cols = 64;
  if (K <= 0 || reps <= 0) {
    std::fprintf(stderr, "K and repetitions must be positive\n");
    return 2;
  }
  std::vector<float> a(K * m), b(K * cols), c(m * cols);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<float>(i % 7) * 0.1f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 5) * 0.2f;
  double best = 1e30;
  for (int t = 0; t < 5; ++t) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < reps; ++r)
      nystrom::cpu::fused::micro::product_tn(a.data(), m, m, K, b.data(), cols, cols, c.data(), cols);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  // c[0][0] printed so that the products are not optimised away
  std::printf("K=%lld m=%lld cols=%lld: %.1f GMAC/s (c[0][0] = %g)\n", static_cast<long long>(K),
              static_cast<long long>(m), static_cast<long long>(cols), double(K) * m * cols * reps / best / 1e9,
              static_cast<double>(c[0]));
  return 0;
}
