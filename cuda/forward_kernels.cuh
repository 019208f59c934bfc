// Forward kernels (docs/DESIGN.md §7): landmark pooling (segment means),
// the softmax-times-matrix kernel of the two long products, and the merge of
// the key splits of Bm·V. The tensor-core variants: forward_tc_kernels.cuh.
#pragma once

#include "common.cuh"

namespace nystrom::cuda {
namespace kern {

// ------------------------------------------------------ landmark pooling ----
// One block per (landmark j, head): the mean of the segment's real rows.
// A row is read in 16-byte chunks of V = 16 / sizeof(T) elements (8 in half
// precision): `lpr` lanes cover it (the power of two >= its chunks, at most
// 32), so a warp reads 32 / lpr rows per load instruction (2 at D = 128 in
// half precision, 512 bytes; 2-byte loads per lane took 64 bytes per
// instruction and 8x the instructions). Lane (g, c) of a warp adds rows
// warp·G + g + 8·G·i (G = 32 / lpr), chunks c, c + lpr, ...: kMaxHeadDim / 32
// accumulators whatever the dtype. A row that is not 16-byte aligned, and a
// last chunk that runs past d (d not a multiple of V), are read element by
// element into the same accumulators. Sums: each lane over its rows in row
// order, the G row groups of a warp by a fixed shuffle tree, then the 8 warps
// in warp order: the same bits on every call.
template <typename T>
__global__ void __launch_bounds__(kThreads) pool_kernel(Problem p, int bh0, Side side, Only only, RowsView x, int d,
                                                        typename Acc<T>::type* out) {
  using A = typename Acc<T>::type;
  constexpr int V = 16 / sizeof(T);
  constexpr int NT = kMaxHeadDim / V >= 32 ? kMaxHeadDim / V / 32 : 1;  // chunks per lane, at most
  static_assert(NT * V == kMaxHeadDim / 32, "kMaxHeadDim / 32 accumulators per lane");
  NYSTROM_SHARED(A, red, [kWarps][kMaxHeadDim]);
  const int j = blockIdx.x, bh = bh0 + blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, only)) return;
  const int n = side == Side::kQuery ? e.Lb : e.Sb;
  const int ms = side == Side::kQuery ? e.mq : e.mk;
  if (j >= ms) return;
  const int64_t r0 = segment_start(j, n, ms), r1 = segment_start(j + 1, n, ms);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int chunks = (d + V - 1) / V;
  int lpr = 1;
  while (lpr < chunks && lpr < 32) lpr *= 2;
  const int groups = 32 / lpr, g = lane / lpr, cl = lane % lpr;
  A acc[NT][V];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int u = 0; u < V; ++u) acc[t][u] = A(0);
#pragma unroll 2
  for (int64_t r = r0 + warp * groups + g; r < r1; r += kWarps * groups) {
    const T* row = row_ptr<T>(x, b, h, static_cast<int>(r));
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int c0 = (cl + lpr * t) * V;
      if (c0 + V <= d && aligned16(row + c0)) {
        T vals[V];
        load16(vals, row + c0);
#pragma unroll
        for (int u = 0; u < V; ++u) acc[t][u] += to_acc<A>(vals[u]);
      } else {
#pragma unroll
        for (int u = 0; u < V; ++u)
          if (c0 + u < d) acc[t][u] += to_acc<A>(row[c0 + u]);
      }
    }
  }
  for (int o = lpr; o < 32; o *= 2) {  // warp-uniform: the row groups, lane g ^ (o / lpr) of the same chunks
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int u = 0; u < V; ++u) acc[t][u] += __shfl_xor_sync(0xffffffffu, acc[t][u], o);
  }
  if (g == 0) {
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int u = 0; u < V; ++u) {
        const int c = (cl + lpr * t) * V + u;
        if (c < d) red[warp][c] = acc[t][u];
      }
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
  void* part_klm;     // tensor-core landmark pass: key segment sums (B*H, splits, ms, D) float, or null
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
  NYSTROM_DYNAMIC_SHARED(smem_raw);
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
  if (e.kind != ElementKind::kNystrom || i >= e.mq) return;
  const int64_t base = static_cast<int64_t>(bh) * splits * p.ms + i;  // slot of split s: base + s*ms
  A M = neg_inf<A>();
  for (int s = 0; s < splits; ++s) M = max(M, part_max[base + static_cast<int64_t>(s) * p.ms]);
  // A split without keys has sum 0 (and maximum -inf) and is left out; a
  // split with keys has a sum of at least 1. Every other split takes part,
  // also one whose sum is NaN (a NaN among its logits: its maximum may then
  // be -inf too): the result carries the NaN, as on the CPU.
  A l = A(0);
  for (int s = 0; s < splits; ++s) {
    const int64_t slot = base + static_cast<int64_t>(s) * p.ms;
    if (part_sum[slot] != A(0)) l += part_sum[slot] * exp_acc(part_max[slot] - M);
  }
  const A inv = A(1) / l;
  for (int j = threadIdx.x; j < p.Dv; j += kThreads) {
    A acc = A(0);
    for (int s = 0; s < splits; ++s) {
      const int64_t slot = base + static_cast<int64_t>(s) * p.ms;
      if (part_sum[slot] != A(0)) acc += part_acc[slot * p.Dv + j] * exp_acc(part_max[slot] - M);
    }
    bv[(static_cast<int64_t>(bh) * p.ms + i) * p.Dv + j] = acc * inv;
  }
  if (threadIdx.x == 0) lse_l[static_cast<int64_t>(bh) * p.ms + i] = M + log_acc(l);
}

}  // namespace kern
}  // namespace nystrom::cuda
