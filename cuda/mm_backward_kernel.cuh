// The m x m part of the backward as one fused kernel per head (docs/DESIGN.md
// §7, backward step 3): the group sums of the query side's partials, A =
// softmax(scale q̃ k̃ᵀ), the Newton–Schulz iterates Z_0 .. Z_T, dbv, δ, and the
// exact derivative back through every iteration, Z_0 = Aᵀ/c, c (the largest
// column sum) and A's softmax, to dq̃ and dk̃. It replaces some 250 batched ATen
// launches with one (two with pinv_init="original", whose c is shared by every
// head: mm_backward_original_kernel adds the summed dc to the one head that
// attains it).
//
// One block per (b, h), MP = ms rounded up to 32 or 64, (MP/4)^2 threads, each
// owning a 4x4 tile of every MP x MP matrix. Eight MP x MP matrices live in
// shared memory with a row stride of MP + 1: a warp's 32 threads cover two
// tile rows (r0, r0 + 4) and sixteen tile columns (q0 = 0, 4, .., 60), so an
// operand read along a row (L[r0+i][k]) touches two addresses in banks
// (4·65·x + k) mod 32, which differ, and a transposed read (R[q0+j][k]) sixteen
// addresses in banks (q0 + j + k) mod 32: 2-way, where a stride of MP would be
// 16-way. The iterates are written to a global workspace (B*H, T + 2, MP, MP)
// (slot 0 A, slot 1 + t Z_t) in the forward sweep and read back one per step
// of the backward sweep. dA is accumulated in registers. Everything is acc
// arithmetic (float, or double for float64 inputs): no tensor cores, no TF32.
// The formulation is that of csrc/newton_schulz.h (X = A Z, Y3 = 7I - X,
// Y2 = 15I - X Y3, Y1 = 13I - X Y2, Z' = Z Y1 / 4) and its backward, product
// for product, so the two paths differ by summation order only.
#pragma once

#include "common.cuh"

namespace nystrom::cuda {
namespace kern {

struct MmBackwardArgs {
  Problem p;
  int bh0;
  int iterations;
  int groups;              // slices of the query side's partials
  bool original;           // pinv_init == "original": dc goes to mm_backward_original_kernel
  const void* q_lm;        // (B*H, ms, D) q̃
  const void* k_lm;        // (B*H, ms, D) k̃
  const void* bv;          // (B*H, ms, Dv)
  const void* c;           // (B*H) pinv_scale (c of Nyström heads)
  const void* part_dkl;    // (B*H, groups, ms, D) query side: scale·dSᵀq
  const void* part_dw;     // (B*H, groups, ms, Dv) query side: Fᵀ dO
  void* dw;                // out (B*H, ms, Dv): dW summed over groups, every head
  void* dkl;               // out (B*H, ms, D): dk̃ (query side + the m x m part), every head
  void* dql;               // out (B*H, ms, D): scale·dS_A·k̃ (0 off the Nyström path)
  void* dbv;               // out (B*H, ms, Dv): Z_Tᵀ dW (0 off the Nyström path)
  void* delta;             // out (B*H, ms): rowsum(dbv∘bv)
  void* aux;               // out (B*H, 3): dc, the largest column sum (-1 off the Nyström path), its column
  void* work;              // (B*H, T + 2, MP, MP) workspace
};

template <int MP> constexpr int mm_threads() { return (MP / 4) * (MP / 4); }
template <int MP> constexpr int mm_ld() { return MP + 1; }

// Shared memory of mm_backward_kernel<A, MP>: eight padded matrices and a
// scratch of threads + MP + 2 values.
template <typename A, int MP>
constexpr size_t mm_backward_smem_bytes() {
  return sizeof(A) * (8 * MP * mm_ld<MP>() + mm_threads<MP>() + MP + 2);
}

// t = op(L)·op(R) over k < n, for the tile (r0.., q0..): op(L)[r][k] =
// L[k][r] if LT else L[r][k], op(R)[k][q] = R[q][k] if RT else R[k][q]; both
// in shared memory with row stride MP + 1.
template <typename A, int MP, bool LT, bool RT>
__device__ __forceinline__ void mm_tile(const A* L, const A* R, int n, int r0, int q0, A t[4][4]) {
  constexpr int LD = mm_ld<MP>();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) t[i][j] = A(0);
  for (int k = 0; k < n; ++k) {
    A l[4], r[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) l[i] = LT ? L[k * LD + r0 + i] : L[(r0 + i) * LD + k];
#pragma unroll
    for (int j = 0; j < 4; ++j) r[j] = RT ? R[(q0 + j) * LD + k] : R[k * LD + q0 + j];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) t[i][j] += l[i] * r[j];
  }
}

// dst tile = f(i, j, t[i][j]) at (r0 + i, q0 + j).
template <typename A, int MP, typename F>
__device__ __forceinline__ void mm_store(A* dst, int r0, int q0, const A t[4][4], F&& f) {
  constexpr int LD = mm_ld<MP>();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) dst[(r0 + i) * LD + q0 + j] = f(r0 + i, q0 + j, t[i][j]);
}

// The thread's 4 x 4 tile of out (ld LD) = mul · X·Yᵀ over K columns, from
// global rows X (rows x K) and Y (cols x K); entries off rows x cols are 0.
template <typename A>
__device__ __forceinline__ void row_products_tile(A* out, int LD, int r0, int q0, int rows, int cols, const A* X,
                                                  const A* Y, int K, A mul) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + i, q = q0 + j;
      A s = A(0);
      if (r < rows && q < cols)
        for (int k = 0; k < K; ++k) s += X[static_cast<int64_t>(r) * K + k] * Y[static_cast<int64_t>(q) * K + k];
      out[r * LD + q] = s * mul;
    }
}

template <typename A, int MP>
__global__ void __launch_bounds__(mm_threads<MP>()) mm_backward_kernel(MmBackwardArgs a) {
  constexpr int NT = mm_threads<MP>(), LD = mm_ld<MP>(), TPR = MP / 4;
  const Problem& p = a.p;
  const int bh = a.bh0 + blockIdx.x, b = bh / p.H;
  const int ms = p.ms, D = p.D, Dv = p.Dv, T = a.iterations;
  const int tid = threadIdx.x, r0 = (tid / TPR) * 4, q0 = (tid % TPR) * 4;
  const Elem e = element(p, b);
  const bool nys = e.kind == ElementKind::kNystrom;

  // The query side's partials summed over its groups (every head: exact
  // elements take dv from dW, and every element's dk̃ reaches its keys).
  const A* pw = static_cast<const A*>(a.part_dw) + static_cast<int64_t>(bh) * a.groups * ms * Dv;
  const A* pk = static_cast<const A*>(a.part_dkl) + static_cast<int64_t>(bh) * a.groups * ms * D;
  A* dw = static_cast<A*>(a.dw) + static_cast<int64_t>(bh) * ms * Dv;
  A* dkl = static_cast<A*>(a.dkl) + static_cast<int64_t>(bh) * ms * D;
  for (int i = tid; i < ms * Dv; i += NT) {
    A s = A(0);
    for (int g = 0; g < a.groups; ++g) s += pw[static_cast<int64_t>(g) * ms * Dv + i];
    dw[i] = s;
  }
  for (int i = tid; i < ms * D; i += NT) {
    A s = A(0);
    for (int g = 0; g < a.groups; ++g) s += pk[static_cast<int64_t>(g) * ms * D + i];
    dkl[i] = s;
  }
  A* dql = static_cast<A*>(a.dql) + static_cast<int64_t>(bh) * ms * D;
  A* dbv = static_cast<A*>(a.dbv) + static_cast<int64_t>(bh) * ms * Dv;
  A* delta = static_cast<A*>(a.delta) + static_cast<int64_t>(bh) * ms;
  A* aux = static_cast<A*>(a.aux) + static_cast<int64_t>(bh) * 3;
  if (!nys) {  // block-uniform: no A, no iterates; zero landmark gradients
    for (int i = tid; i < ms * D; i += NT) dql[i] = A(0);
    for (int i = tid; i < ms * Dv; i += NT) dbv[i] = A(0);
    for (int i = tid; i < ms; i += NT) delta[i] = A(0);
    if (tid == 0) {
      aux[0] = A(0);
      aux[1] = A(-1);
      aux[2] = A(0);
    }
    return;
  }

  NYSTROM_DYNAMIC_SHARED(smem_raw);
  A* sA = reinterpret_cast<A*>(smem_raw);
  A* sZ = sA + MP * LD;
  A* sX = sZ + MP * LD;
  A* sY2 = sX + MP * LD;
  A* sY1 = sY2 + MP * LD;  // Y3, then Y1, then dX
  A* sG = sY1 + MP * LD;   // dY1, then dY2
  A* sdZ = sG + MP * LD;
  A* sN = sdZ + MP * LD;   // the next dZ
  A* sR = sN + MP * LD;    // [NT] partial sums, [MP] row values, dc, col
  A* work = static_cast<A*>(a.work) + static_cast<int64_t>(bh) * (T + 2) * MP * MP;
  const A* qlm = static_cast<const A*>(a.q_lm) + static_cast<int64_t>(bh) * ms * D;
  const A* klm = static_cast<const A*>(a.k_lm) + static_cast<int64_t>(bh) * ms * D;
  const A* bvh = static_cast<const A*>(a.bv) + static_cast<int64_t>(bh) * ms * Dv;
  const A scale = static_cast<A>(p.scale);
  const int mq = e.mq, mk = e.mk;
  A t[4][4], u[4][4];

  // A = softmax(scale q̃ k̃ᵀ) over the mk real columns, rows >= mq zero.
  row_products_tile<A>(sA, LD, r0, q0, mq, mk, qlm, klm, D, scale);
  __syncthreads();
  if (tid < MP) {
    A* row = sA + tid * LD;
    if (tid < mq) {
      A mx = neg_inf<A>();
      for (int q = 0; q < mk; ++q) mx = max(mx, row[q]);
      A sum = A(0);
      for (int q = 0; q < mk; ++q) {
        row[q] = exp_acc(row[q] - mx);
        sum += row[q];
      }
      for (int q = 0; q < mk; ++q) row[q] /= sum;
      for (int q = mk; q < MP; ++q) row[q] = A(0);
    } else {
      for (int q = 0; q < MP; ++q) row[q] = A(0);
    }
  }
  __syncthreads();
  // Column sums, the first maximal column, Z_0 = Aᵀ/c; A and Z_0 to the workspace.
  if (tid < MP) {
    A s = A(0);
    for (int r = 0; r < ms; ++r) s += sA[r * LD + tid];
    sR[NT + tid] = s;
  }
  const A c = static_cast<const A*>(a.c)[bh];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = r0 + i, q = q0 + j;
      const A z = sA[q * LD + r] / c;
      sZ[r * LD + q] = z;
      work[r * MP + q] = sA[r * LD + q];
      work[MP * MP + r * MP + q] = z;
    }
  __syncthreads();
  if (tid == 0) {
    int col = 0;
    for (int q = 1; q < ms; ++q)
      if (sR[NT + q] > sR[NT + col]) col = q;
    sR[NT + MP + 1] = static_cast<A>(col);
    aux[1] = sR[NT + col];
    aux[2] = static_cast<A>(col);
  }

  auto eye = [](int r, int q, A x) { return r == q ? x : A(0); };
  // Y3, Y2 and Y1 of the iterate in sZ (X = A·Z in sX).
  auto horner = [&]() {
    mm_tile<A, MP, false, false>(sA, sZ, ms, r0, q0, t);
    mm_store<A, MP>(sX, r0, q0, t, [](int, int, A x) { return x; });
    mm_store<A, MP>(sY1, r0, q0, t, [&](int r, int q, A x) { return eye(r, q, A(7)) - x; });
    __syncthreads();
    mm_tile<A, MP, false, false>(sX, sY1, ms, r0, q0, t);
    mm_store<A, MP>(sY2, r0, q0, t, [&](int r, int q, A x) { return eye(r, q, A(15)) - x; });
    __syncthreads();
    mm_tile<A, MP, false, false>(sX, sY2, ms, r0, q0, t);  // Y3 (in sY1) is no operand: Y1 replaces it
    mm_store<A, MP>(sY1, r0, q0, t, [&](int r, int q, A x) { return eye(r, q, A(13)) - x; });
    __syncthreads();
  };

  // Forward sweep: Z_{t+1} = Z_t Y1 / 4, each iterate to the workspace.
  for (int it = 0; it < T; ++it) {
    horner();
    mm_tile<A, MP, false, false>(sZ, sY1, ms, r0, q0, t);
    __syncthreads();  // every thread has read Z
    A* wz = work + static_cast<int64_t>(2 + it) * MP * MP;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const A z = t[i][j] * A(0.25);
        sZ[(r0 + i) * LD + q0 + j] = z;
        wz[(r0 + i) * MP + q0 + j] = z;
      }
    __syncthreads();
  }

  // dbv = Z_Tᵀ dW, δ = rowsum(dbv∘bv), dZ_T = dW bvᵀ.
  for (int i = tid; i < ms * Dv; i += NT) {
    const int r = i / Dv, j = i % Dv;
    A s = A(0);
    for (int k = 0; k < ms; ++k) s += sZ[k * LD + r] * dw[static_cast<int64_t>(k) * Dv + j];
    dbv[i] = s;
  }
  row_products_tile<A>(sdZ, LD, r0, q0, ms, ms, dw, bvh, Dv, A(1));
  __syncthreads();  // dbv is written (global, read back by this block)
  for (int r = tid; r < ms; r += NT) {
    A s = A(0);
    for (int j = 0; j < Dv; ++j) s += dbv[static_cast<int64_t>(r) * Dv + j] * bvh[static_cast<int64_t>(r) * Dv + j];
    delta[r] = s;
  }

  // Backward sweep, t = T-1 .. 0 (newton_schulz_backward, product for product).
  A dA[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) dA[i][j] = A(0);
  for (int it = T - 1; it >= 0; --it) {
    const A* wz = work + static_cast<int64_t>(1 + it) * MP * MP;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sZ[(r0 + i) * LD + q0 + j] = wz[(r0 + i) * MP + q0 + j];
    __syncthreads();
    horner();  // X, Y2, Y1 of Z_t; Y3 = 7I - X is recomputed from X where needed
    mm_tile<A, MP, true, false>(sZ, sdZ, ms, r0, q0, t);  // dY1 = Z_tᵀ dZ / 4
    mm_store<A, MP>(sG, r0, q0, t, [](int, int, A x) { return x * A(0.25); });
    mm_tile<A, MP, false, true>(sdZ, sY1, ms, r0, q0, t);  // dZ_t = dZ Y1ᵀ / 4
    mm_store<A, MP>(sN, r0, q0, t, [](int, int, A x) { return x * A(0.25); });
    __syncthreads();
    mm_tile<A, MP, false, true>(sG, sY2, ms, r0, q0, t);  // dX = -dY1 Y2ᵀ
    mm_tile<A, MP, true, false>(sX, sG, ms, r0, q0, u);   // dY2 = -Xᵀ dY1
    __syncthreads();                                      // Y1 and dY1 are read
    mm_store<A, MP>(sY1, r0, q0, t, [](int, int, A x) { return -x; });
    mm_store<A, MP>(sG, r0, q0, u, [](int, int, A x) { return -x; });
    __syncthreads();
    // dX -= dY2 Y3ᵀ (Y3ᵀ[k][q] = 7 [k = q] - X[q][k]); dX += Xᵀ dY2.
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) t[i][j] = u[i][j] = A(0);
    for (int k = 0; k < ms; ++k) {
      A g[4], y3[4], xt[4], g2[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        g[i] = sG[(r0 + i) * LD + k];
        xt[i] = sX[k * LD + r0 + i];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        y3[j] = (k == q0 + j ? A(7) : A(0)) - sX[(q0 + j) * LD + k];
        g2[j] = sG[k * LD + q0 + j];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          t[i][j] += g[i] * y3[j];
          u[i][j] += xt[i] * g2[j];
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        A& x = sY1[(r0 + i) * LD + q0 + j];
        x = (x - t[i][j]) + u[i][j];
      }
    __syncthreads();
    mm_tile<A, MP, false, true>(sY1, sZ, ms, r0, q0, t);  // dA += dX Z_tᵀ
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dA[i][j] += t[i][j];
    mm_tile<A, MP, true, false>(sA, sY1, ms, r0, q0, t);  // dZ_t += Aᵀ dX
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sN[(r0 + i) * LD + q0 + j] += t[i][j];
    __syncthreads();
    A* tmp = sdZ;
    sdZ = sN;
    sN = tmp;
  }
  // Z_0 = Aᵀ/c (sZ holds Z_0): dA += dZᵀ/c, dc = -sum(dZ∘Z_0)/c.
  A part = A(0);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      dA[i][j] += sdZ[(q0 + j) * LD + r0 + i] / c;
      part += sdZ[(r0 + i) * LD + q0 + j] * sZ[(r0 + i) * LD + q0 + j];
    }
  sR[tid] = part;
  __syncthreads();
  if (tid == 0) {
    A s = A(0);
    for (int i = 0; i < NT; ++i) s += sR[i];
    const A dc = -s / c;
    sR[NT + MP] = dc;
    aux[0] = dc;
  }
  __syncthreads();
  // c's gradient to its column (pinv_init="per_head"; "original" sums every
  // head's dc first: mm_backward_original_kernel).
  if (!a.original) {
    const int col = static_cast<int>(sR[NT + MP + 1]);
    const A dc = sR[NT + MP];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (q0 + j == col) dA[i][j] += dc;
  }
  // dS_A = A∘(dA - rowsum(A∘dA)), into sX.
  mm_store<A, MP>(sX, r0, q0, dA, [](int, int, A x) { return x; });
  __syncthreads();
  if (tid < MP) {
    A s = A(0);
    for (int q = 0; q < ms; ++q) s += sA[tid * LD + q] * sX[tid * LD + q];
    sR[NT + tid] = s;
  }
  __syncthreads();
  mm_store<A, MP>(sX, r0, q0, dA, [&](int r, int q, A x) { return sA[r * LD + q] * (x - sR[NT + r]); });
  __syncthreads();
  // dq̃ = scale dS_A k̃; dk̃ += scale dS_Aᵀ q̃.
  for (int i = tid; i < ms * D; i += NT) {
    const int r = i / D, d = i % D;
    A s = A(0), s2 = A(0);
    for (int k = 0; k < ms; ++k) {
      s += sX[r * LD + k] * klm[static_cast<int64_t>(k) * D + d];
      s2 += sX[k * LD + r] * qlm[static_cast<int64_t>(k) * D + d];
    }
    dql[i] = s * scale;
    dkl[i] += s2 * scale;
  }
}

// pinv_init="original": c is one maximum over the Nyström heads, so the sum
// of every head's dc reaches the first head attaining it (in b·H + h order),
// within it its first maximal column: dS = dc·A∘(e_col - A[:, col]), added to
// that head's dq̃ and dk̃. One block; aux and the workspace's A come from
// mm_backward_kernel.
template <typename A, int MP>
__global__ void __launch_bounds__(256) mm_backward_original_kernel(MmBackwardArgs a) {
  const Problem& p = a.p;
  const int heads = p.B * p.H, ms = p.ms, D = p.D, T = a.iterations;
  const int tid = threadIdx.x;
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  A* sS = reinterpret_cast<A*>(smem_raw);  // [MP][MP]
  A* sV = sS + MP * MP;                    // best head, its column, the summed dc
  const A* aux = static_cast<const A*>(a.aux);
  if (tid == 0) {
    int best = 0;
    A total = A(0);
    for (int h = 0; h < heads; ++h) {
      total += aux[3 * h];
      if (aux[3 * h + 1] > aux[3 * best + 1]) best = h;
    }
    sV[0] = static_cast<A>(best);
    sV[1] = aux[3 * best + 2];
    sV[2] = total;
    sV[3] = aux[3 * best + 1];
  }
  __syncthreads();
  if (sV[3] < A(0)) return;  // no head on the Nyström path (block-uniform)
  const int bh = static_cast<int>(sV[0]), col = static_cast<int>(sV[1]);
  const A total = sV[2];
  const A* Ah = static_cast<const A*>(a.work) + static_cast<int64_t>(bh) * (T + 2) * MP * MP;
  for (int i = tid; i < MP * MP; i += 256) {
    const int r = i / MP, q = i % MP;
    const A x = Ah[i];
    sS[i] = total * x * ((q == col ? A(1) : A(0)) - Ah[r * MP + col]);
  }
  __syncthreads();
  const A scale = static_cast<A>(p.scale);
  const A* qlm = static_cast<const A*>(a.q_lm) + static_cast<int64_t>(bh) * ms * D;
  const A* klm = static_cast<const A*>(a.k_lm) + static_cast<int64_t>(bh) * ms * D;
  A* dql = static_cast<A*>(a.dql) + static_cast<int64_t>(bh) * ms * D;
  A* dkl = static_cast<A*>(a.dkl) + static_cast<int64_t>(bh) * ms * D;
  for (int i = tid; i < ms * D; i += 256) {
    const int r = i / D, d = i % D;
    A s = A(0), s2 = A(0);
    for (int k = 0; k < ms; ++k) {
      s += sS[r * MP + k] * klm[static_cast<int64_t>(k) * D + d];
      s2 += sS[k * MP + r] * qlm[static_cast<int64_t>(k) * D + d];
    }
    dql[i] += s * scale;
    dkl[i] += s2 * scale;
  }
}

}  // namespace kern
}  // namespace nystrom::cuda
