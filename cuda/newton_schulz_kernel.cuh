// The fused Newton–Schulz kernel of the forward (docs/DESIGN.md §2 step 4, §7).
#pragma once

#include "common.cuh"

namespace nystrom::cuda {
namespace kern {

// ---------------------------------------------------------- Newton–Schulz ----
// One block per head, MP = ms rounded up to 32, 64 or 128, (MP/4)^2 threads,
// each owning a 4x4 tile of the MP x MP iterates. With G = Z·A the iteration
// Z <- 1/4 Z (13I - AZ(15I - AZ(7I - AZ))) equals 1/4 (13Z - G(15Z - G(7Z - GZ)))
// (Z (AZ)^k = (ZA)^k Z), three products with G and one with A. Z, G and the
// Horner term W live in shared memory; A is read through the L1 cache. A
// product's tile is held in registers until every thread has read its
// operands, then written in place. Zero padding outside the element's
// (mq x mk) block stays zero through every step.
template <typename A, int MP>
__global__ void __launch_bounds__((MP / 4) * (MP / 4)) newton_schulz_kernel(int bh0, int ms, int Dv, int iterations,
                                                                            const A* Amat, const A* cvec, const A* bv,
                                                                            A* zbv) {
  constexpr int TPR = MP / 4;  // threads per tile row
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  A* Z = reinterpret_cast<A*>(smem_raw);  // [MP][MP]
  A* G = Z + MP * MP;
  A* W = G + MP * MP;
  const int bh = bh0 + blockIdx.x;
  const int tid = threadIdx.x, r0 = (tid / TPR) * 4, q0 = (tid % TPR) * 4;
  const A* Ah = Amat + static_cast<int64_t>(bh) * ms * ms;
  const A inv_c = A(1) / cvec[bh];
  for (int i = tid; i < MP * MP; i += TPR * TPR) {
    const int r = i / MP, c = i % MP;
    Z[i] = r < ms && c < ms ? Ah[c * ms + r] * inv_c : A(0);
  }
  __syncthreads();
  A t[4][4];
  for (int it = 0; it < iterations; ++it) {
    // G = Z·A
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) t[i][j] = A(0);
    for (int k = 0; k < ms; ++k) {
      A a[4], z[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) a[j] = q0 + j < ms ? __ldg(Ah + k * ms + q0 + j) : A(0);
#pragma unroll
      for (int i = 0; i < 4; ++i) z[i] = Z[(r0 + i) * MP + k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) t[i][j] += z[i] * a[j];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        G[(r0 + i) * MP + q0 + j] = t[i][j];
        W[(r0 + i) * MP + q0 + j] = Z[(r0 + i) * MP + q0 + j];
      }
    __syncthreads();
    const A coef[3] = {A(7), A(15), A(13)};
#pragma unroll
    for (int step = 0; step < 3; ++step) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) t[i][j] = A(0);
      for (int k = 0; k < ms; ++k) {
        A g[4], w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) g[i] = G[(r0 + i) * MP + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = W[k * MP + q0 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) t[i][j] += g[i] * w[j];
      }
      __syncthreads();  // every thread has read W
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int at = (r0 + i) * MP + q0 + j;
          W[at] = coef[step] * Z[at] - t[i][j];
        }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int at = (r0 + i) * MP + q0 + j;
        Z[at] = A(0.25) * W[at];
      }
    __syncthreads();
  }
  // zbv = Z·bv
  const A* bvh = bv + static_cast<int64_t>(bh) * ms * Dv;
  A* out = zbv + static_cast<int64_t>(bh) * ms * Dv;
  for (int i = tid; i < ms * Dv; i += TPR * TPR) {
    const int r = i / Dv, j = i % Dv;
    A s = A(0);
    for (int k = 0; k < ms; ++k) s += Z[r * MP + k] * bvh[k * Dv + j];
    out[i] = s;
  }
}

}  // namespace kern
}  // namespace nystrom::cuda
