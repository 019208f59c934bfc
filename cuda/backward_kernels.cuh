// Backward kernels (docs/DESIGN.md §7): the query side and the key side of
// the long products, recomputing F and Bm from the saved log-sum-exps, and the
// spread of landmark gradients to the tokens of their segments.
#pragma once

#include "common.cuh"

namespace nystrom::cuda {
namespace kern {

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
  // The tensor-core passes that write gradients in the input dtype
  // (backward_tc_kernels.cuh): the landmark gradients whose shares they add,
  // float32 (B*H, ms, ·): dk̃ and dW (key side), dq̃ (dq pass).
  const void* share1;
  const void* share2;
  // The tensor-core query and key sides: copies of the owner rows in shared
  // memory (1, or 2 to load the next tile during this one; tc_backward_stages).
  int stages = 1;
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
  NYSTROM_DYNAMIC_SHARED(smem_raw);
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
  NYSTROM_DYNAMIC_SHARED(smem_raw);
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
