// Tensor-core backward kernels for float16 / bfloat16 inputs (WMMA, sm_80+):
// the query side and the key side of the long products (docs/DESIGN.md §7)
// where the tensor-core forward serves the shape (D, Dv in {64, 128}, every
// element with at most 64 landmarks). Same contracts as backward_query_kernel
// and backward_key_kernel (backward_kernels.cuh), which serve every other
// case and NYSTROM_CUDA_TC_BACKWARD=0.
//
// Each warp owns 16 owner rows, the block 64; the landmark side (at most 64
// rows) is staged once per block. Every product runs on the tensor cores with
// float32 accumulation: logits S = X·Yᵀ and dF = G·Vᵀ (16 x 64), the owner-row
// gradient dS·Y (16 x D), and the landmark-side partials dSᵀ·X over the
// block's 64 rows (64 x D), accumulated in float32 in shared memory across the
// block's tiles and written once to the block's own slice (no atomics). The
// softmax statistics (saved lse, delta) and P, dS are computed in float32;
// what is rounded to the input dtype T: the float32 landmark operands (k̃, W
// on the query side, q̃, dbv on the key side) once per block, as the forward
// does, and P and dS as left operands of the products (as the forward rounds
// P). The bound this gives, and its test: docs/DESIGN.md §7.
//
// The gradients are written once, in T (docs/DESIGN.md §7, "gradients in the
// input dtype"): the key side writes dk and dv of every element, the share
// dk̃ / segment size of each key's landmark added in float32 before the one
// rounding (exact elements: dk̃ and dW of their single-token segments; padded
// and empty rows: zeros). dq needs dq̃, which is complete only after the key
// side: the query side stores its rounded dS rows (T, 64 columns, what the dq
// product multiplies anyway) and tc_backward_dq_kernel, the last pass, forms
// dq = scale·dS·k̃ + dq̃ / segment size and rounds it once.
#pragma once

#include "backward_kernels.cuh"
#include "forward_tc_kernels.cuh"

namespace nystrom::cuda {
namespace kern {

// Shared memory of both backward kernels, in bytes. Per warp and stage: the
// owner rows (16 x D and 16 x DV of T); per warp: two float 16 x 64 logit
// tiles (reused as the 16 x D float product, D <= 128) and P, dS in T.
// `stages` (1 or 2, BackwardArgs::stages) copies of the owner rows: with 2 the
// next tile's rows are in flight (cp.async) while the warps work on this one.
// Every tile's lines are padded by kTcPad elements (tc_ld, kTcLdS: no bank
// conflicts, forward_tc_kernels.cuh).
// Elements of one warp's owner rows in one stage: 16 lines of x, then 16 of g.
constexpr size_t tc_backward_row_elems(int D, int DV) { return kTcRows * (tc_ld(D) + tc_ld(DV)); }
template <typename T>
constexpr size_t tc_backward_rows_smem(int D, int DV) {
  return sizeof(T) * tc_backward_row_elems(D, DV);
}
template <typename T>
constexpr size_t tc_backward_scratch_smem() {
  return 2 * sizeof(float) * kTcRows * kTcLdS + 2 * sizeof(T) * kTcRows * kTcLdS;
}
// Block: the landmark rows in T (64 x (D + DV)), the float partials, the warps.
template <typename T>
constexpr size_t tc_backward_query_smem(int D, int DV, int stages) {
  return sizeof(T) * kTcSlots * (tc_ld(D) + tc_ld(DV)) + sizeof(float) * kTcSlots * (tc_ld(D) + tc_ld(DV)) +
         kTcWarps * (stages * tc_backward_rows_smem<T>(D, DV) + tc_backward_scratch_smem<T>());
}
template <typename T>
constexpr size_t tc_backward_key_smem(int D, int DV, int stages) {
  return sizeof(T) * kTcSlots * (tc_ld(D) + tc_ld(DV)) + sizeof(float) * kTcSlots * tc_ld(D) +
         2 * sizeof(float) * kTcSlots + kTcWarps * (stages * tc_backward_rows_smem<T>(D, DV) + tc_backward_scratch_smem<T>());
}

// The owner rows of a tile into stage buffer `dst` (16 x D rows of x, then
// 16 x DV of g, per warp) with asynchronous copies, committed as one batch.
template <typename T, int D, int DV>
__device__ __forceinline__ void tc_stage_owner_rows(T* dst, const BackwardArgs& a, int b, int h, int x0, int nx) {
  const int lane = threadIdx.x % 32;
  tc_stage_rows_async<T, D, kTcRows, 32>(dst, a.x, b, h, x0, nx, lane);
  tc_stage_rows_async<T, DV, kTcRows, 32>(dst + kTcRows * tc_ld(D), a.g, b, h, x0, nx, lane);
  __pipeline_commit();
}

// The pipeline of the owner rows over a block's tiles xb = first, first +
// step, ... < nx. 1 stage: each tile's rows are loaded at its start and
// waited for at once. 2 stages: the first tile's rows are issued before the
// loop (prologue), and at each tile the next tile's into the other buffer
// (free: the previous tile's trailing barrier) before waiting for this one's;
// the last tile commits an empty batch so that one wait rule serves all.
// Returns the buffer that holds tile xb's rows, complete for this thread;
// the caller's __syncwarp publishes them to the warp.
template <typename T, int D, int DV>
__device__ __forceinline__ int tc_owner_rows_ready(T* rows, const BackwardArgs& a, int b, int h, int xb, int step,
                                                   int nx, int tile) {
  constexpr size_t kStage = kTcWarps * tc_backward_row_elems(D, DV);  // elements per stage buffer
  const int warp = threadIdx.x / 32;
  T* mine = rows + warp * tc_backward_row_elems(D, DV);
  if (a.stages == 2) {
    const int buf = tile & 1;
    if (tile == 0) tc_stage_owner_rows<T, D, DV>(mine, a, b, h, xb + warp * kTcRows, nx);
    if (xb + step < nx) {
      tc_stage_owner_rows<T, D, DV>(mine + (buf ^ 1) * kStage, a, b, h, xb + step + warp * kTcRows, nx);
    } else {
      __pipeline_commit();
    }
    __pipeline_wait_prior(1);
    return buf;
  }
  tc_stage_owner_rows<T, D, DV>(mine, a, b, h, xb + warp * kTcRows, nx);
  __pipeline_wait_prior(0);
  return 0;
}

// acc (64 x W, float, ld tc_ld(W)) += Σ_warps Lᵀ·R over the block's 64 owner
// rows: L is each warp's 16 x 64 left factor (dS or P, ld kTcLdS) read as a
// col_major matrix_a (its transpose), R its 16 x W owner rows (ld tc_ld(W)).
// Warp w owns the output tiles of the column blocks tj = w, w + 4, ... (W/64
// of them) in all 4 row blocks ti: W/16 tiles, no race. Their accumulators
// stay live across the 4 warps' contributions, so per contribution the warp
// loads 4 L fragments and W/64 R fragments (at W = 128: 24 loads per call
// against 64 when each tile loaded both operands); each tile sums the
// contributions in warp order, as before.
template <typename T, int W>
__device__ __forceinline__ void tc_landmark_partials(float* acc, const T* L0, size_t l_stride, const T* R0,
                                                     size_t r_stride) {
  static_assert(W % (16 * kTcWarps) == 0, "whole column blocks per warp");
  constexpr int kRowBlocks = kTcSlots / 16, kColBlocks = W / (16 * kTcWarps);
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c[kRowBlocks][kColBlocks];
#pragma unroll
  for (int ti = 0; ti < kRowBlocks; ++ti)
#pragma unroll
    for (int q = 0; q < kColBlocks; ++q) {
      const int tj = warp + kTcWarps * q;
      wmma::load_matrix_sync(c[ti][q], acc + 16 * ti * tc_ld(W) + 16 * tj, tc_ld(W), wmma::mem_row_major);
    }
#pragma unroll
  for (int s = 0; s < kTcWarps; ++s) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[kColBlocks];
#pragma unroll
    for (int q = 0; q < kColBlocks; ++q)
      wmma::load_matrix_sync(bf[q], R0 + s * r_stride + 16 * (warp + kTcWarps * q), tc_ld(W));
#pragma unroll
    for (int ti = 0; ti < kRowBlocks; ++ti) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
      wmma::load_matrix_sync(a, L0 + s * l_stride + 16 * ti, kTcLdS);
#pragma unroll
      for (int q = 0; q < kColBlocks; ++q) wmma::mma_sync(c[ti][q], a, bf[q], c[ti][q]);
    }
  }
#pragma unroll
  for (int ti = 0; ti < kRowBlocks; ++ti)
#pragma unroll
    for (int q = 0; q < kColBlocks; ++q) {
      const int tj = warp + kTcWarps * q;
      wmma::store_matrix_sync(acc + 16 * ti * tc_ld(W) + 16 * tj, c[ti][q], tc_ld(W), wmma::mem_row_major);
    }
}

// The landmark share of token r of n cut into ms segments: 1 / its segment's
// size, and the segment (the spread_kernel's arithmetic).
__device__ __forceinline__ float tc_segment_share(int r, int n, int ms, int64_t* seg) {
  *seg = segment_of(r, n, ms);
  return 1.0f / static_cast<float>(segment_start(*seg + 1, n, ms) - segment_start(*seg, n, ms));
}

// A warp's 16 x W float product rows (ld tc_ld(W)) to T rows of a head's contiguous
// (npad, W) gradient at the rows' positions: mul·src, plus, where share is
// given, the row's landmark row share[segment] (ms segments of the n real rows)
// / segment size, in float32; rounded to T once. 16 bytes per lane and store.
template <typename T, int W>
__device__ __forceinline__ void tc_store_rows(T* dst, const float* src, float mul, const float* share, int ms,
                                              const int* index, int npad, int b, int x0, int n) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int it = 0; it < kTcRows * W / 8 / 32; ++it) {
    const int i = lane + 32 * it;
    const int rr = i / (W / 8), c8 = (i % (W / 8)) * 8;
    const int r = x0 + rr;
    if (r < n) {
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = mul * src[rr * tc_ld(W) + c8 + j];
      if (share) {
        int64_t seg;
        const float inv = tc_segment_share(r, n, ms, &seg);
        const float* s = share + seg * W + c8;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] += s[j] * inv;
      }
      store8(dst + position(index, npad, b, r) * W + c8, v);
    }
  }
}

// Rows n .. npad - 1 of a head's contiguous (npad, W) gradient, at their
// positions (the index list holds the padded positions after the real ones),
// to zero; the blocks of the head (blockIdx.x < groups) share the rows.
template <typename T, int W>
__device__ __forceinline__ void tc_zero_rows(T* dst, const int* index, int npad, int b, int n, int groups) {
  const int64_t chunks = static_cast<int64_t>(npad - n) * (W / 8);
  const int64_t step = static_cast<int64_t>(groups) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks; i += step) {
    const int r = n + static_cast<int>(i / (W / 8)), c8 = static_cast<int>(i % (W / 8)) * 8;
    zero8(dst + position(index, npad, b, r) * W + c8);
  }
}

// The n real rows of a head's contiguous (npad, W) gradient = src[segment] /
// segment size (ms segments): the gradient of exact elements' k̃ (= k) and W
// (= v), whose segments are single tokens. The blocks of the head share the rows.
template <typename T, int W>
__device__ __forceinline__ void tc_spread_rows(T* dst, const float* src, int ms, const int* index, int npad, int b,
                                               int n, int groups) {
  const int64_t step = static_cast<int64_t>(groups) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < static_cast<int64_t>(n) * W;
       i += step) {
    const int r = static_cast<int>(i / W), c = static_cast<int>(i % W);
    int64_t seg;
    const float inv = tc_segment_share(r, n, ms, &seg);
    dst[position(index, npad, b, r) * W + c] = from_acc<T>(src[seg * W + c] * inv);
  }
}

// A warp's 16 rounded dS rows (T, ld kTcLdS) to rows x0 .. of a head's (L, 64)
// buffer in real-row order (rows >= n not written: the dq pass reads zeros).
template <typename T>
__device__ __forceinline__ void tc_write_ds(T* dst, const T* sDS, int x0, int n) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int it = 0; it < kTcRows * kTcSlots / 8 / 32; ++it) {
    const int i = lane + 32 * it;
    const int rr = i / (kTcSlots / 8), c8 = (i % (kTcSlots / 8)) * 8;
    if (x0 + rr < n) copy8(dst + static_cast<int64_t>(x0 + rr) * kTcSlots + c8, sDS + rr * kTcLdS + c8);
  }
}

// The n real rows of a float partial (ld tc_ld(W)) times mul to dst (n x W, contiguous).
template <int W>
__device__ __forceinline__ void tc_write_partial(float* dst, const float* acc, float mul, int n) {
  for (int i = threadIdx.x; i < n * W; i += kTcWarps * 32) dst[i] = mul * acc[(i / W) * tc_ld(W) + i % W];
}

// Query side, every non-empty element. Per warp and tile: S = q k̃ᵀ, dF = dO Wᵀ,
// F = exp(scale S - lse), delta = Σ F dF, dS = F (dF - delta), whose rows
// (rounded to T) go to the dS buffer a.out1 (B*H, L, 64) for the dq pass;
// then, for the block's 64 rows, dk̃ += scale dSᵀ q and dW += Fᵀ dO.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(kTcWarps * 32, 1) tc_backward_query_kernel(BackwardArgs a) {
  constexpr int BR = kTcWarps * kTcRows;
  const Problem& p = a.p;
  const int bh = a.bh0 + blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, Only::kAll)) return;
  const int nx = e.Lb, ny = e.mk;
  if (static_cast<int>(blockIdx.x) * BR >= nx) return;  // no tile: the slice keeps its zeros
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  // Every line padded: ld tc_ld(width), kTcLdS for the 64-wide tiles.
  T* sK = reinterpret_cast<T*>(smem_raw);          // [64][D] k̃
  T* sW = sK + kTcSlots * tc_ld(D);                 // [64][DV] W
  float* accK = reinterpret_cast<float*>(sW + kTcSlots * tc_ld(DV));  // [64][D]
  float* accW = accK + kTcSlots * tc_ld(D);                            // [64][DV]
  T* rows = reinterpret_cast<T*>(accW + kTcSlots * tc_ld(DV));         // [stages][warps][16][D], [16][DV]: q, dO
  constexpr size_t kRows = tc_backward_row_elems(D, DV);  // elements of a warp's owner rows
  unsigned char* scratch0 = reinterpret_cast<unsigned char*>(rows + a.stages * kTcWarps * kRows);
  constexpr size_t kScratch = tc_backward_scratch_smem<T>();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float* sS = reinterpret_cast<float*>(scratch0 + warp * kScratch);  // [16][64] S, then F
  float* sF = sS + kTcRows * kTcLdS;                                 // [16][64] dF
  T* sP = reinterpret_cast<T*>(sF + kTcRows * kTcLdS);               // [16][64]
  T* sDS = sP + kTcRows * kTcLdS;                                    // [16][64]

  const int64_t lm0 = static_cast<int64_t>(bh) * p.ms;
  tc_stage_landmarks<T, D>(sK, static_cast<const float*>(a.lm) + lm0 * D, ny);
  tc_stage_landmarks<T, DV>(sW, static_cast<const float*>(a.lmv) + lm0 * DV, ny);
  for (int i = tid; i < kTcSlots * (tc_ld(D) + tc_ld(DV)); i += kTcWarps * 32) accK[i] = 0.0f;  // accK, accW
  __syncthreads();
  const float scale = static_cast<float>(p.scale);
  const int r = lane >> 1, half = lane & 1;  // elementwise work: a lane pair per row (tc_column)
  const float* lse = static_cast<const float*>(a.lse) + static_cast<int64_t>(bh) * p.L;
  T* ds = static_cast<T*>(a.out1) + static_cast<int64_t>(bh) * p.L * kTcSlots;
  const int step = a.groups * BR;

  int tile = 0;
  for (int xb = blockIdx.x * BR; xb < nx; xb += step, ++tile) {
    const int x0 = xb + warp * kTcRows;  // this warp's rows (all padding past nx: zeros, F = 0)
    const bool row_ok = x0 + r < nx;
    const float lse_r = row_ok ? lse[position(a.x.index, a.x.npad, b, x0 + r)] : 0.0f;
    const int buf = tc_owner_rows_ready<T, D, DV>(rows, a, b, h, xb, step, nx, tile);
    T* const rows0 = rows + buf * kTcWarps * kRows;  // warp 0's rows of this tile
    const T* sQ = rows0 + warp * kRows;              // [16][D]
    const T* sG = sQ + kTcRows * tc_ld(D);           // [16][DV] dO
    __syncwarp();
    tc_logits<T, D, 4>(sQ, sK, sS);
    tc_logits<T, DV, 4>(sG, sW, sF);
    __syncwarp();
    float delta = 0.0f;
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      const float f = row_ok && c < ny ? expf(sS[r * kTcLdS + c] * scale - lse_r) : 0.0f;
      sS[r * kTcLdS + c] = f;
      delta += f * sF[r * kTcLdS + c];
    }
    delta += __shfl_xor_sync(0xffffffffu, delta, 1);
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      const float f = sS[r * kTcLdS + c];
      sP[r * kTcLdS + c] = from_acc<T>(f);
      sDS[r * kTcLdS + c] = from_acc<T>(f * (sF[r * kTcLdS + c] - delta));
    }
    __syncwarp();
    tc_write_ds<T>(ds, sDS, x0, nx);
    __syncthreads();  // every warp's dS, P, q and dO rows are staged
    const size_t stride = kScratch / sizeof(T);
    const T* p0 = reinterpret_cast<const T*>(reinterpret_cast<const float*>(scratch0) + 2 * kTcRows * kTcLdS);
    const T* ds0 = p0 + kTcRows * kTcLdS;
    tc_landmark_partials<T, D>(accK, ds0, stride, rows0, kRows);
    tc_landmark_partials<T, DV>(accW, p0, stride, rows0 + kTcRows * tc_ld(D), kRows);
    __syncthreads();  // consumed before the next tile overwrites the warps' rows
  }
  const int64_t slot = static_cast<int64_t>(bh) * a.groups + blockIdx.x;
  tc_write_partial<D>(static_cast<float*>(a.part1) + slot * p.ms * D, accK, scale, ny);
  tc_write_partial<DV>(static_cast<float*>(a.part2) + slot * p.ms * DV, accW, 1.0f, ny);
}

// Key side, Nyström elements. Owner rows are keys (and their values); the
// softmax runs over the keys of each landmark row, so its statistics (lse_l,
// delta = rowsum(dbv∘bv)) arrive per landmark column. Per warp and tile:
// S = k q̃ᵀ, G = v dbvᵀ, F = exp(scale S - lse_l), dS = F (G - delta);
// dk = scale dS q̃ + dk̃[segment] / segment size, dv = F dbv, each rounded to T
// once; for the block's 64 rows dq̃ += scale dSᵀ k. Every element's dk and dv
// (T, contiguous (B*H, S, ·)) are written here and nowhere else: exact
// elements' rows get the shares of dk̃ and dW (a.share1, a.share2: their
// landmarks are their keys and values), padded rows and empty elements zeros.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(kTcWarps * 32, 1) tc_backward_key_kernel(BackwardArgs a) {
  static_assert(tc_ld(D) <= 2 * kTcLdS && tc_ld(DV) <= 2 * kTcLdS, "the float products reuse the two logit tiles");
  constexpr int BR = kTcWarps * kTcRows;
  const Problem& p = a.p;
  const int bh = a.bh0 + blockIdx.y, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  T* dk = static_cast<T*>(a.out1) + static_cast<int64_t>(bh) * p.S * D;
  T* dv = static_cast<T*>(a.out2) + static_cast<int64_t>(bh) * p.S * DV;
  const int64_t lm0 = static_cast<int64_t>(bh) * p.ms;
  const int nx = selected(e, Only::kAll) ? e.Sb : 0, ny = e.mq;
  tc_zero_rows<T, D>(dk, a.x.index, p.S, b, nx, a.groups);
  tc_zero_rows<T, DV>(dv, a.x.index, p.S, b, nx, a.groups);
  if (e.kind == ElementKind::kExact) {
    tc_spread_rows<T, D>(dk, static_cast<const float*>(a.share1) + lm0 * D, e.mk, a.x.index, p.S, b, nx, a.groups);
    tc_spread_rows<T, DV>(dv, static_cast<const float*>(a.share2) + lm0 * DV, e.mk, a.x.index, p.S, b, nx,
                          a.groups);
  }
  if (e.kind != ElementKind::kNystrom) return;
  if (static_cast<int>(blockIdx.x) * BR >= nx) return;
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  // Every line padded: ld tc_ld(width), kTcLdS for the 64-wide tiles.
  T* sL = reinterpret_cast<T*>(smem_raw);          // [64][D] q̃
  T* sB = sL + kTcSlots * tc_ld(D);                 // [64][DV] dbv
  float* acc = reinterpret_cast<float*>(sB + kTcSlots * tc_ld(DV));  // [64][D]
  float* slse = acc + kTcSlots * tc_ld(D);                            // [64]
  float* sdel = slse + kTcSlots;                                      // [64]
  T* rows = reinterpret_cast<T*>(sdel + kTcSlots);                    // [stages][warps][16][D], [16][DV]: k, v
  constexpr size_t kRows = tc_backward_row_elems(D, DV);
  unsigned char* scratch0 = reinterpret_cast<unsigned char*>(rows + a.stages * kTcWarps * kRows);
  constexpr size_t kScratch = tc_backward_scratch_smem<T>();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  float* sS = reinterpret_cast<float*>(scratch0 + warp * kScratch);  // [16][64]
  float* sG = sS + kTcRows * kTcLdS;                                 // [16][64]
  float* sO = sS;                                                    // [16][D] or [16][DV], over sS and sG
  T* sP = reinterpret_cast<T*>(sG + kTcRows * kTcLdS);
  T* sDS = sP + kTcRows * kTcLdS;

  tc_stage_landmarks<T, D>(sL, static_cast<const float*>(a.lm) + lm0 * D, ny);
  tc_stage_landmarks<T, DV>(sB, static_cast<const float*>(a.lmv) + lm0 * DV, ny);
  for (int i = tid; i < kTcSlots * tc_ld(D); i += kTcWarps * 32) acc[i] = 0.0f;
  if (tid < kTcSlots) {
    const bool ok = tid < ny;
    slse[tid] = ok ? static_cast<const float*>(a.lse)[lm0 + tid] : 0.0f;
    sdel[tid] = ok ? static_cast<const float*>(a.delta)[lm0 + tid] : 0.0f;
  }
  __syncthreads();
  const float scale = static_cast<float>(p.scale);
  const int r = lane >> 1, half = lane & 1;
  const float* dkl = static_cast<const float*>(a.share1) + lm0 * D;
  const int step = a.groups * BR;

  int tile = 0;
  for (int xb = blockIdx.x * BR; xb < nx; xb += step, ++tile) {
    const int x0 = xb + warp * kTcRows;
    const bool row_ok = x0 + r < nx;
    const int buf = tc_owner_rows_ready<T, D, DV>(rows, a, b, h, xb, step, nx, tile);
    T* const rows0 = rows + buf * kTcWarps * kRows;
    const T* sK = rows0 + warp * kRows;  // [16][D]
    const T* sV = sK + kTcRows * tc_ld(D);  // [16][DV]
    __syncwarp();
    tc_logits<T, D, 4>(sK, sL, sS);
    tc_logits<T, DV, 4>(sV, sB, sG);
    __syncwarp();
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      const float f = row_ok && c < ny ? expf(sS[r * kTcLdS + c] * scale - slse[c]) : 0.0f;
      sP[r * kTcLdS + c] = from_acc<T>(f);
      sDS[r * kTcLdS + c] = from_acc<T>(f * (sG[r * kTcLdS + c] - sdel[c]));
    }
    __syncwarp();
    tc_product<T, D>(sDS, sL, sO, /*accumulate=*/false);
    __syncwarp();
    tc_store_rows<T, D>(dk, sO, scale, dkl, e.mk, a.x.index, p.S, b, x0, nx);
    __syncwarp();
    tc_product<T, DV>(sP, sB, sO, /*accumulate=*/false);
    __syncwarp();
    tc_store_rows<T, DV>(dv, sO, 1.0f, nullptr, e.mk, a.x.index, p.S, b, x0, nx);
    __syncthreads();
    const size_t stride = kScratch / sizeof(T);
    const T* ds0 = reinterpret_cast<const T*>(reinterpret_cast<const float*>(scratch0) + 2 * kTcRows * kTcLdS) +
                   kTcRows * kTcLdS;
    tc_landmark_partials<T, D>(acc, ds0, stride, rows0, kRows);
    __syncthreads();
  }
  const int64_t slot = static_cast<int64_t>(bh) * a.groups + blockIdx.x;
  tc_write_partial<D>(static_cast<float*>(a.part1) + slot * p.ms * D, acc, scale, ny);
}

// The dq pass, after the key side (dq̃ complete), every element: dq =
// scale·dS·k̃ from the query side's rounded dS rows (a.lmv, (B*H, L, 64) in T)
// and k̃ (a.lm, converted once per block as the query side does), plus, for
// Nyström elements, dq̃[segment] / segment size (a.share1); rounded to T once
// into the contiguous (B*H, L, D) dq (a.out1). Padded rows and elements off
// every path: zeros. a.x: the query rows' view (only its index list is read).
template <typename T>
constexpr size_t tc_backward_dq_smem(int D) {
  return sizeof(T) * kTcSlots * tc_ld(D) + kTcWarps * (sizeof(T) * kTcRows * kTcLdS + sizeof(float) * kTcRows * tc_ld(D));
}
template <typename T, int D>
__global__ void __launch_bounds__(kTcWarps * 32) tc_backward_dq_kernel(BackwardArgs a) {
  constexpr int BR = kTcWarps * kTcRows;
  const Problem& p = a.p;
  const int bh = a.bh0 + blockIdx.y, b = bh / p.H;
  const Elem e = element(p, b);
  T* dq = static_cast<T*>(a.out1) + static_cast<int64_t>(bh) * p.L * D;
  const int nx = selected(e, Only::kAll) ? e.Lb : 0, ny = e.mk;
  tc_zero_rows<T, D>(dq, a.x.index, p.L, b, nx, a.groups);
  if (static_cast<int>(blockIdx.x) * BR >= nx) return;
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  T* sK = reinterpret_cast<T*>(smem_raw);                                      // [64][D] k̃ (lines padded)
  T* sDS = sK + kTcSlots * tc_ld(D) + warp * kTcRows * kTcLdS;                 // [16][64] this warp's dS
  float* sO =
      reinterpret_cast<float*>(sK + kTcSlots * tc_ld(D) + kTcWarps * kTcRows * kTcLdS) + warp * kTcRows * tc_ld(D);
  const int64_t lm0 = static_cast<int64_t>(bh) * p.ms;
  tc_stage_landmarks<T, D>(sK, static_cast<const float*>(a.lm) + lm0 * D, ny);
  __syncthreads();
  const float scale = static_cast<float>(p.scale);
  const T* ds = static_cast<const T*>(a.lmv) + static_cast<int64_t>(bh) * p.L * kTcSlots;
  const float* dql = e.kind == ElementKind::kNystrom ? static_cast<const float*>(a.share1) + lm0 * D : nullptr;
  for (int xb = blockIdx.x * BR; xb < nx; xb += a.groups * BR) {
    const int x0 = xb + warp * kTcRows;
#pragma unroll
    for (int it = 0; it < kTcRows * kTcSlots / 8 / 32; ++it) {
      const int i = lane + 32 * it;
      const int rr = i / (kTcSlots / 8), c8 = (i % (kTcSlots / 8)) * 8;
      if (x0 + rr < nx) {
        copy8(sDS + rr * kTcLdS + c8, ds + static_cast<int64_t>(x0 + rr) * kTcSlots + c8);
      } else {
        zero8(sDS + rr * kTcLdS + c8);
      }
    }
    __syncwarp();
    tc_product<T, D>(sDS, sK, sO, /*accumulate=*/false);
    __syncwarp();
    tc_store_rows<T, D>(dq, sO, scale, dql, e.mq, a.x.index, p.L, b, x0, nx);
    __syncwarp();  // sDS and sO are consumed before the next tile
  }
}

}  // namespace kern
}  // namespace nystrom::cuda
