// Device code of the Nyström attention kernels (see nystrom_cuda.h for the
// launch-level contract). Included by one instantiation file per dtype
// (inst_*.cu), so the four dtypes compile in parallel.
//
// The two long products share one shape, that of flash attention: a thread
// block owns a tile of "owner" rows (queries, or keys in backward), loops over
// the landmark side in chunks of 32 rows staged in shared memory, and keeps
// its running softmax statistics and results in registers. Warps own rows,
// lanes own either one landmark of the chunk (while computing logits) or one
// column of the head dimension (while multiplying), so every row reduction is
// a warp shuffle and no softmax matrix ever reaches global memory.
//
// Everything accumulates in acc_t (float, or double for float64 inputs) and
// every reduction has a fixed order: repeated calls are bitwise equal.
#pragma once

#include "nystrom_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cmath>
#include <cstdint>

namespace nystrom::cuda {
namespace kern {

constexpr int kWarps = 8;               // warps per block of the long-product kernels
constexpr int kThreads = kWarps * 32;   // threads per block
constexpr int kChunk = 32;              // landmark-side rows per chunk: one per lane
constexpr int kMaxBlockHeads = 65535;   // grid y/z limit: heads are launched in slices

// ---------------------------------------------------------------- types ----
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A, typename T> __device__ __forceinline__ A to_acc(T x) { return static_cast<A>(x); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T, typename A> __device__ __forceinline__ T from_acc(A x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }

template <typename A> __device__ __forceinline__ A warp_sum(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <typename A> __device__ __forceinline__ A warp_max(A x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// ------------------------------------------------------------- elements ----
// One batch element after padding is removed (DESIGN.md: empty, exact, Nyström).
struct Elem {
  int Lb, Sb, mq, mk;
  int kind;  // 0 empty, 1 exact, 2 Nyström
};

__device__ __forceinline__ Elem element(const Problem& p, int b) {
  Elem e;
  e.Lb = p.q_count ? p.q_count[b] : p.L;
  e.Sb = p.k_count ? p.k_count[b] : p.S;
  e.mq = min(p.m, e.Lb);
  e.mk = min(p.m, e.Sb);
  e.kind = e.Lb == 0 || e.Sb == 0 ? 0 : (e.Lb <= p.m && e.Sb <= p.m ? 1 : 2);
  return e;
}

__device__ __forceinline__ bool selected(const Elem& e, Only only) {
  if (e.kind == 0) return false;
  if (only == Only::kExact) return e.kind == 1;
  if (only == Only::kNystrom) return e.kind == 2;
  return true;
}

// Position of real row r of element b.
__device__ __forceinline__ int64_t position(const int* index, int npad, int b, int r) {
  return index ? static_cast<int64_t>(index[static_cast<int64_t>(b) * npad + r]) : static_cast<int64_t>(r);
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const RowsView& x, int b, int h, int r) {
  return static_cast<const T*>(x.data) + b * x.sb + h * x.sh + position(x.index, x.npad, b, r) * x.sr;
}

// Segment j of n tokens cut into ms segments: [floor(j n/ms), floor((j+1) n/ms)).
__device__ __forceinline__ int64_t segment_start(int64_t j, int64_t n, int64_t ms) { return j * n / ms; }
// The segment of row r: floor(((r+1) ms - 1) / n).
__device__ __forceinline__ int64_t segment_of(int64_t r, int64_t n, int64_t ms) { return ((r + 1) * ms - 1) / n; }

// ------------------------------------------------------ landmark pooling ----
// One block per (landmark j, head): the mean of the segment's real rows.
// Warps stride over rows, lanes over columns; the eight partial sums are
// added in warp order.
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_kernel(Problem p, int bh0, Side side, Only only, RowsView x, int d,
                                                        typename Acc<T>::type* out) {
  using A = typename Acc<T>::type;
  __shared__ A red[kWarps][kMaxHeadDim];
  const int j = blockIdx.x, bh = bh0 + blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, only)) return;
  const int n = side == Side::kQuery ? e.Lb : e.Sb;
  const int ms = side == Side::kQuery ? e.mq : e.mk;
  if (j >= ms) return;
  const int64_t r0 = segment_start(j, n, ms), r1 = segment_start(j + 1, n, ms);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  A acc[kMaxHeadDim / 32];
#pragma unroll
  for (int t = 0; t < kMaxHeadDim / 32; ++t) acc[t] = A(0);
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    const T* row = row_ptr<T>(x, b, h, static_cast<int>(r));
#pragma unroll
    for (int t = 0; t < kMaxHeadDim / 32; ++t) {
      const int c = lane + 32 * t;
      if (c < d) acc[t] += to_acc<A>(row[c]);
    }
  }
#pragma unroll
  for (int t = 0; t < kMaxHeadDim / 32; ++t) {
    const int c = lane + 32 * t;
    if (c < d) red[warp][c] = acc[t];
  }
  __syncthreads();
  const A inv = A(1) / static_cast<A>(r1 - r0);
  for (int c = threadIdx.x; c < d; c += kThreads) {
    A s = A(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w][c];
    out[(static_cast<int64_t>(bh) * p.ms + j) * d + c] = s * inv;
  }
}

// ------------------------------------------------------ softmax · matrix ----
// Forward long product. kLandmarkPass: owner rows are the query landmarks q̃
// of a Nyström element, the other side is a key range (split) of its real keys
// and values; the block writes unnormalised partials. Otherwise owner rows
// are the real queries, the other side the min(m, S_b) rows of k̃ and W; the
// block writes normalised output rows and their log-sum-exp.
struct ForwardArgs {
  Problem p;
  int bh0;
  RowsView x, y, v;   // owner rows; other side rows and values
  MutRowsView out;    // query pass: output rows
  void* lse;          // query pass: (B, H, L) acc
  void* part_max;     // landmark pass: (B*H, splits, ms)
  void* part_sum;
  void* part_acc;     // landmark pass: (B*H, splits, ms, Dv)
  int splits;
};

template <typename TX, typename TY, typename TO, typename A, int RPW, int NJ, bool kLandmarkPass>
__global__ void __launch_bounds__(kThreads, 1) softmax_matmul_kernel(ForwardArgs a) {
  constexpr int BR = kWarps * RPW;
  const Problem& p = a.p;
  const int D = p.D, Dv = p.Dv;
  const int bh = a.bh0 + blockIdx.z, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, kLandmarkPass ? Only::kNystrom : Only::kAll)) return;
  const int nx = kLandmarkPass ? e.mq : e.Lb;
  const int ny = kLandmarkPass ? e.Sb : e.mk;
  const int x0 = blockIdx.x * BR;
  if (x0 >= nx) return;
  int y0 = 0, y1 = ny;
  if (kLandmarkPass) {
    const int per = ((ny + a.splits - 1) / a.splits + kChunk - 1) / kChunk * kChunk;
    y0 = min(ny, static_cast<int>(blockIdx.y) * per);
    y1 = min(ny, y0 + per);
  }
  extern __shared__ unsigned char smem_raw[];
  A* sx = reinterpret_cast<A*>(smem_raw);     // [BR][D]
  A* sy = sx + BR * D;                         // [kChunk][D + 1]
  A* sv = sy + kChunk * (D + 1);               // [kChunk][Dv]
  A* sp = sv + kChunk * Dv;                    // [BR][kChunk]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const A scale = static_cast<A>(p.scale);

  for (int i = tid; i < BR * D; i += kThreads) {
    const int r = i / D, c = i % D;
    sx[i] = x0 + r < nx ? to_acc<A>(row_ptr<TX>(a.x, b, h, x0 + r)[c]) : A(0);
  }
  A o[RPW][NJ], mrow[RPW], lrow[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    mrow[i] = neg_inf<A>();
    lrow[i] = A(0);
#pragma unroll
    for (int t = 0; t < NJ; ++t) o[i][t] = A(0);
  }

  for (int c0 = y0; c0 < y1; c0 += kChunk) {
    __syncthreads();  // the previous chunk is consumed (and sx is loaded)
    for (int i = tid; i < kChunk * D; i += kThreads) {
      const int r = i / D, c = i % D;
      sy[r * (D + 1) + c] = c0 + r < y1 ? to_acc<A>(row_ptr<TY>(a.y, b, h, c0 + r)[c]) : A(0);
    }
    for (int i = tid; i < kChunk * Dv; i += kThreads) {
      const int r = i / Dv, c = i % Dv;
      sv[i] = c0 + r < y1 ? to_acc<A>(row_ptr<TY>(a.v, b, h, c0 + r)[c]) : A(0);
    }
    __syncthreads();
    const bool valid = c0 + lane < y1;
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int r = warp + kWarps * i;
      A s = neg_inf<A>();
      if (valid) {
        A dot = A(0);
        const A* xr = sx + r * D;
        const A* yr = sy + lane * (D + 1);
        for (int c = 0; c < D; ++c) dot += xr[c] * yr[c];
        s = dot * scale;
      }
      const A mnew = max(mrow[i], warp_max(s));  // finite: lane 0's row is valid
      const A pe = valid ? exp_acc(s - mnew) : A(0);
      const A alpha = exp_acc(mrow[i] - mnew);   // 0 while mrow is -inf
      lrow[i] = lrow[i] * alpha + warp_sum(pe);
      mrow[i] = mnew;
      sp[r * kChunk + lane] = pe;
#pragma unroll
      for (int t = 0; t < NJ; ++t) o[i][t] *= alpha;
    }
    __syncwarp();  // each warp reads back only its own rows of sp
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int r = warp + kWarps * i;
      for (int c = 0; c < kChunk; ++c) {
        const A pc = sp[r * kChunk + c];
#pragma unroll
        for (int t = 0; t < NJ; ++t) {
          const int j = lane + 32 * t;
          if (j < Dv) o[i][t] += pc * sv[c * Dv + j];
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int gr = x0 + warp + kWarps * i;
    if (gr >= nx) continue;
    if (kLandmarkPass) {
      const int64_t slot = (static_cast<int64_t>(bh) * a.splits + blockIdx.y) * p.ms + gr;
      if (lane == 0) {
        static_cast<A*>(a.part_max)[slot] = mrow[i];
        static_cast<A*>(a.part_sum)[slot] = lrow[i];
      }
#pragma unroll
      for (int t = 0; t < NJ; ++t) {
        const int j = lane + 32 * t;
        if (j < Dv) static_cast<A*>(a.part_acc)[slot * Dv + j] = o[i][t];
      }
    } else {
      const int64_t pos = position(a.out.index, a.out.npad, b, gr);
      TO* orow = static_cast<TO*>(a.out.data) + b * a.out.sb + h * a.out.sh + pos * a.out.sr;
      const A inv = A(1) / lrow[i];
#pragma unroll
      for (int t = 0; t < NJ; ++t) {
        const int j = lane + 32 * t;
        if (j < Dv) orow[j] = from_acc<TO>(o[i][t] * inv);
      }
      if (lane == 0) static_cast<A*>(a.lse)[static_cast<int64_t>(bh) * p.L + pos] = mrow[i] + log_acc(lrow[i]);
    }
  }
}

// One block per (landmark row, head): merges the key splits of Bm·V.
template <typename A>
__global__ void __launch_bounds__(kThreads, 1) merge_kernel(Problem p, int bh0, int splits, const A* part_max,
                                                         const A* part_sum, const A* part_acc, A* bv, A* lse_l) {
  const int i = blockIdx.x, bh = bh0 + blockIdx.y, b = bh / p.H;
  const Elem e = element(p, b);
  if (e.kind != 2 || i >= e.mq) return;
  const int64_t base = static_cast<int64_t>(bh) * splits * p.ms + i;  // slot of split s: base + s*ms
  A M = neg_inf<A>();
  for (int s = 0; s < splits; ++s) M = max(M, part_max[base + static_cast<int64_t>(s) * p.ms]);
  A l = A(0);
  for (int s = 0; s < splits; ++s) {
    const int64_t slot = base + static_cast<int64_t>(s) * p.ms;
    if (part_sum[slot] > A(0)) l += part_sum[slot] * exp_acc(part_max[slot] - M);
  }
  const A inv = A(1) / l;
  for (int j = threadIdx.x; j < p.Dv; j += kThreads) {
    A acc = A(0);
    for (int s = 0; s < splits; ++s) {
      const int64_t slot = base + static_cast<int64_t>(s) * p.ms;
      if (part_sum[slot] > A(0)) acc += part_acc[slot * p.Dv + j] * exp_acc(part_max[slot] - M);
    }
    bv[(static_cast<int64_t>(bh) * p.ms + i) * p.Dv + j] = acc * inv;
  }
  if (threadIdx.x == 0) lse_l[static_cast<int64_t>(bh) * p.ms + i] = M + log_acc(l);
}

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
  extern __shared__ unsigned char smem_raw[];
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

// -------------------------------------------------------------- backward ----
struct BackwardArgs {
  Problem p;
  int bh0;
  int groups;
  RowsView x, g;        // owner rows: (q, dO) on the query side, (k, v) on the key side
  const void* lm;       // landmark rows (B*H, ms, D): k̃ (query side) or q̃ (key side)
  const void* lmv;      // landmark values (B*H, ms, Dv): W (query side) or dbv (key side)
  const void* lse;      // query side: lse_q (B*H, L); key side: lse_l (B*H, ms)
  const void* delta;    // key side: rowsum(dbv∘bv) (B*H, ms)
  void* out1;           // dq (query side) or dk (key side), acc, (B*H, n, D)
  void* out2;           // dv (key side), acc, (B*H, S, Dv)
  void* part1;          // part_dkl (query side) or part_dql (key side): (B*H, groups, ms, D)
  void* part2;          // part_dw (query side): (B*H, groups, ms, Dv)
};

// Query side. Per query tile: a first sweep over the landmarks computes
// delta_r = sum_c F dF, the second forms dS = F (dF - delta) and accumulates
// dq in registers; each chunk's landmark-side sums go to the block's own slice
// of the partials (no atomics: deterministic).
template <typename T, typename A, int RPW, int NJ>
__global__ void __launch_bounds__(kThreads, 1) backward_query_kernel(BackwardArgs a) {
  constexpr int BR = kWarps * RPW;
  const Problem& p = a.p;
  const int D = p.D, Dv = p.Dv;
  const int bh = a.bh0 + blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, Only::kAll)) return;
  const int nx = e.Lb, ny = e.mk;
  extern __shared__ unsigned char smem_raw[];
  A* sq = reinterpret_cast<A*>(smem_raw);  // [BR][D]
  A* sg = sq + BR * D;                      // [BR][Dv]
  A* sk = sg + BR * Dv;                     // [kChunk][D + 1]
  A* sw = sk + kChunk * (D + 1);            // [kChunk][Dv + 1]
  A* sp = sw + kChunk * (Dv + 1);           // [BR][kChunk]
  A* sds = sp + BR * kChunk;                // [BR][kChunk]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const A scale = static_cast<A>(p.scale);
  const A* klm = static_cast<const A*>(a.lm) + static_cast<int64_t>(bh) * p.ms * D;
  const A* wlm = static_cast<const A*>(a.lmv) + static_cast<int64_t>(bh) * p.ms * Dv;
  A* part1 = static_cast<A*>(a.part1) + (static_cast<int64_t>(bh) * a.groups + blockIdx.x) * p.ms * D;
  A* part2 = static_cast<A*>(a.part2) + (static_cast<int64_t>(bh) * a.groups + blockIdx.x) * p.ms * Dv;

  auto load_chunk = [&](int c0) {
    __syncthreads();
    for (int i = tid; i < kChunk * D; i += kThreads) {
      const int r = i / D, c = i % D;
      sk[r * (D + 1) + c] = c0 + r < ny ? klm[static_cast<int64_t>(c0 + r) * D + c] : A(0);
    }
    for (int i = tid; i < kChunk * Dv; i += kThreads) {
      const int r = i / Dv, c = i % Dv;
      sw[r * (Dv + 1) + c] = c0 + r < ny ? wlm[static_cast<int64_t>(c0 + r) * Dv + c] : A(0);
    }
    __syncthreads();
  };

  for (int x0 = blockIdx.x * BR; x0 < nx; x0 += a.groups * BR) {
    __syncthreads();  // the previous tile is consumed
    for (int i = tid; i < BR * D; i += kThreads) {
      const int r = i / D, c = i % D;
      sq[i] = x0 + r < nx ? to_acc<A>(row_ptr<T>(a.x, b, h, x0 + r)[c]) : A(0);
    }
    for (int i = tid; i < BR * Dv; i += kThreads) {
      const int r = i / Dv, c = i % Dv;
      sg[i] = x0 + r < nx ? to_acc<A>(row_ptr<T>(a.g, b, h, x0 + r)[c]) : A(0);
    }
    A lse[RPW], delta[RPW];
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int gr = x0 + warp + kWarps * i;
      lse[i] = gr < nx ? static_cast<const A*>(a.lse)[static_cast<int64_t>(bh) * p.L + position(a.x.index, a.x.npad, b, gr)]
                       : A(0);
      delta[i] = A(0);
    }
    // F and dF of (row r, landmark lane) of the staged chunk.
    auto probs = [&](int i, int c0, A* P, A* dP) {
      const int r = warp + kWarps * i;
      const bool valid = c0 + lane < ny && x0 + r < nx;
      A s = A(0), g = A(0);
      if (valid) {
        const A* qr = sq + r * D;
        const A* kr = sk + lane * (D + 1);
        for (int c = 0; c < D; ++c) s += qr[c] * kr[c];
        const A* gr = sg + r * Dv;
        const A* wr = sw + lane * (Dv + 1);
        for (int c = 0; c < Dv; ++c) g += gr[c] * wr[c];
      }
      *P = valid ? exp_acc(s * scale - lse[i]) : A(0);
      *dP = g;
    };
    for (int c0 = 0; c0 < ny; c0 += kChunk) {
      load_chunk(c0);
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        A P, dP;
        probs(i, c0, &P, &dP);
        delta[i] += warp_sum(P * dP);
      }
    }
    A dq[RPW][NJ];
#pragma unroll
    for (int i = 0; i < RPW; ++i)
#pragma unroll
      for (int t = 0; t < NJ; ++t) dq[i][t] = A(0);
    for (int c0 = 0; c0 < ny; c0 += kChunk) {
      load_chunk(c0);
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        A P, dP;
        probs(i, c0, &P, &dP);
        const int r = warp + kWarps * i;
        sp[r * kChunk + lane] = P;
        sds[r * kChunk + lane] = P * (dP - delta[i]);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const int r = warp + kWarps * i;
        for (int c = 0; c < kChunk; ++c) {
          const A ds = sds[r * kChunk + c];
#pragma unroll
          for (int t = 0; t < NJ; ++t) {
            const int d = lane + 32 * t;
            if (d < D) dq[i][t] += ds * sk[c * (D + 1) + d];
          }
        }
      }
      // Landmark side: warp w owns landmarks w, w + 8, ... of the chunk.
      for (int cl = warp; cl < kChunk && c0 + cl < ny; cl += kWarps) {
        A* p1 = part1 + static_cast<int64_t>(c0 + cl) * D;
        A* p2 = part2 + static_cast<int64_t>(c0 + cl) * Dv;
        for (int d = lane; d < D; d += 32) {
          A s = A(0);
          for (int r = 0; r < BR; ++r) s += sds[r * kChunk + cl] * sq[r * D + d];
          p1[d] += scale * s;
        }
        for (int j = lane; j < Dv; j += 32) {
          A s = A(0);
          for (int r = 0; r < BR; ++r) s += sp[r * kChunk + cl] * sg[r * Dv + j];
          p2[j] += s;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int gr = x0 + warp + kWarps * i;
      if (gr >= nx) continue;
      A* out = static_cast<A*>(a.out1) + (static_cast<int64_t>(bh) * p.L + position(a.x.index, a.x.npad, b, gr)) * D;
#pragma unroll
      for (int t = 0; t < NJ; ++t) {
        const int d = lane + 32 * t;
        if (d < D) out[d] = scale * dq[i][t];
      }
    }
  }
}

// Key side (Nyström elements): owner rows are keys; the softmax runs over
// the keys of each landmark row, so its statistics (lse_l, delta) sit on the
// landmark side and arrive with each chunk.
template <typename T, typename A, int RPW, int NJ>
__global__ void __launch_bounds__(kThreads, 1) backward_key_kernel(BackwardArgs a) {
  constexpr int BR = kWarps * RPW;
  const Problem& p = a.p;
  const int D = p.D, Dv = p.Dv;
  const int bh = a.bh0 + blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, Only::kNystrom)) return;
  const int nx = e.Sb, ny = e.mq;
  extern __shared__ unsigned char smem_raw[];
  A* sk = reinterpret_cast<A*>(smem_raw);  // [BR][D]
  A* sv = sk + BR * D;                      // [BR][Dv]
  A* sq = sv + BR * Dv;                     // [kChunk][D + 1]
  A* sg = sq + kChunk * (D + 1);            // [kChunk][Dv + 1]
  A* sp = sg + kChunk * (Dv + 1);           // [BR][kChunk]
  A* sds = sp + BR * kChunk;                // [BR][kChunk]
  A* slse = sds + BR * kChunk;              // [kChunk]
  A* sdel = slse + kChunk;                  // [kChunk]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const A scale = static_cast<A>(p.scale);
  const int64_t lm_row0 = static_cast<int64_t>(bh) * p.ms;
  const A* qlm = static_cast<const A*>(a.lm) + lm_row0 * D;
  const A* dbv = static_cast<const A*>(a.lmv) + lm_row0 * Dv;
  A* part1 = static_cast<A*>(a.part1) + (static_cast<int64_t>(bh) * a.groups + blockIdx.x) * p.ms * D;

  for (int x0 = blockIdx.x * BR; x0 < nx; x0 += a.groups * BR) {
    __syncthreads();
    for (int i = tid; i < BR * D; i += kThreads) {
      const int r = i / D, c = i % D;
      sk[i] = x0 + r < nx ? to_acc<A>(row_ptr<T>(a.x, b, h, x0 + r)[c]) : A(0);
    }
    for (int i = tid; i < BR * Dv; i += kThreads) {
      const int r = i / Dv, c = i % Dv;
      sv[i] = x0 + r < nx ? to_acc<A>(row_ptr<T>(a.g, b, h, x0 + r)[c]) : A(0);
    }
    A dk[RPW][NJ], dv[RPW][NJ];
#pragma unroll
    for (int i = 0; i < RPW; ++i)
#pragma unroll
      for (int t = 0; t < NJ; ++t) dk[i][t] = dv[i][t] = A(0);
    for (int c0 = 0; c0 < ny; c0 += kChunk) {
      __syncthreads();
      for (int i = tid; i < kChunk * D; i += kThreads) {
        const int r = i / D, c = i % D;
        sq[r * (D + 1) + c] = c0 + r < ny ? qlm[static_cast<int64_t>(c0 + r) * D + c] : A(0);
      }
      for (int i = tid; i < kChunk * Dv; i += kThreads) {
        const int r = i / Dv, c = i % Dv;
        sg[r * (Dv + 1) + c] = c0 + r < ny ? dbv[static_cast<int64_t>(c0 + r) * Dv + c] : A(0);
      }
      if (tid < kChunk) {
        const bool ok = c0 + tid < ny;
        slse[tid] = ok ? static_cast<const A*>(a.lse)[lm_row0 + c0 + tid] : A(0);
        sdel[tid] = ok ? static_cast<const A*>(a.delta)[lm_row0 + c0 + tid] : A(0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const int r = warp + kWarps * i;
        const bool valid = c0 + lane < ny && x0 + r < nx;
        A s = A(0), g = A(0);
        if (valid) {
          const A* kr = sk + r * D;
          const A* qr = sq + lane * (D + 1);
          for (int c = 0; c < D; ++c) s += kr[c] * qr[c];
          const A* vr = sv + r * Dv;
          const A* gr = sg + lane * (Dv + 1);
          for (int c = 0; c < Dv; ++c) g += vr[c] * gr[c];
        }
        const A P = valid ? exp_acc(s * scale - slse[lane]) : A(0);
        sp[r * kChunk + lane] = P;
        sds[r * kChunk + lane] = P * (g - sdel[lane]);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < RPW; ++i) {
        const int r = warp + kWarps * i;
        for (int c = 0; c < kChunk; ++c) {
          const A P = sp[r * kChunk + c], ds = sds[r * kChunk + c];
#pragma unroll
          for (int t = 0; t < NJ; ++t) {
            const int d = lane + 32 * t;
            if (d < D) dk[i][t] += ds * sq[c * (D + 1) + d];
            if (d < Dv) dv[i][t] += P * sg[c * (Dv + 1) + d];
          }
        }
      }
      for (int cl = warp; cl < kChunk && c0 + cl < ny; cl += kWarps) {
        A* p1 = part1 + static_cast<int64_t>(c0 + cl) * D;
        for (int d = lane; d < D; d += 32) {
          A s = A(0);
          for (int r = 0; r < BR; ++r) s += sds[r * kChunk + cl] * sk[r * D + d];
          p1[d] += scale * s;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      const int gr = x0 + warp + kWarps * i;
      if (gr >= nx) continue;
      const int64_t row = static_cast<int64_t>(bh) * p.S + position(a.x.index, a.x.npad, b, gr);
      A* ok = static_cast<A*>(a.out1) + row * D;
      A* ov = static_cast<A*>(a.out2) + row * Dv;
#pragma unroll
      for (int t = 0; t < NJ; ++t) {
        const int d = lane + 32 * t;
        if (d < D) ok[d] += scale * dk[i][t];
        if (d < Dv) ov[d] += dv[i][t];
      }
    }
  }
}

// One warp per real row: dst[row] += src[segment of row] / segment size.
template <typename A>
__global__ void __launch_bounds__(kThreads) spread_kernel(Problem p, int bh0, Side side, Only only, const A* src,
                                                          int d, const int* index, A* dst) {
  const int bh = bh0 + blockIdx.y, b = bh / p.H;
  const Elem e = element(p, b);
  if (!selected(e, only)) return;
  const int n = side == Side::kQuery ? e.Lb : e.Sb;
  const int ms = side == Side::kQuery ? e.mq : e.mk;
  const int npad = side == Side::kQuery ? p.L : p.S;
  const int r = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (r >= n) return;
  const int64_t seg = segment_of(r, n, ms);
  const A inv = A(1) / static_cast<A>(segment_start(seg + 1, n, ms) - segment_start(seg, n, ms));
  const A* s = src + (static_cast<int64_t>(bh) * p.ms + seg) * d;
  A* o = dst + (static_cast<int64_t>(bh) * npad + position(index, npad, b, r)) * d;
  for (int c = lane; c < d; c += 32) o[c] += s[c] * inv;
}

}  // namespace kern
}  // namespace nystrom::cuda
