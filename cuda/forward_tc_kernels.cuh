// Tensor-core forward kernels for float16 / bfloat16 inputs (WMMA, sm_80+):
// the two long products of the forward when the head dims are 64 or 128 and
// every element has at most 64 landmarks (ms <= 64). Each warp owns 16 owner
// rows; logits and products run on the tensor cores in the input dtype with
// float32 accumulation; softmax statistics stay in float32 (the
// probabilities are rounded to the input dtype only as the left operand of
// the second product, as flash attention does). Same contracts as the
// generic kernels in forward_kernels.cuh, which serve every other case.
#pragma once

#include "forward_kernels.cuh"

#include <mma.h>
#if defined(__CUDACC__)
#include <cuda_pipeline_primitives.h>  // cp.async; the emulation declares the same calls (cuda/emu/device.h)
#endif

#include <cstring>

namespace nystrom::cuda {
namespace kern {

namespace wmma = nvcuda::wmma;

constexpr int kTcWarps = 4;   // warps per block
constexpr int kTcRows = 16;   // owner rows per warp
constexpr int kTcSlots = 64;  // landmark (or key-chunk) rows per step

// Every shared-memory tile that WMMA loads or stores has lines of its width
// plus kTcPad elements: a line pitch of 64 or 128 elements is a multiple of
// 128 bytes, which puts the 8 lines one instruction of a fragment load touches
// on the same banks (8-way conflicts for 16-bit tiles, 4-way in each half warp
// for float ones; the emulator's model, cuda/emu/wmma.h, measured 6.9-7.4x the
// conflict-free wavefronts in every tensor-core kernel before the pad). 8 more
// elements (16 bytes of a 16-bit line, 32 of a float one) shift consecutive
// lines by 4 (8) banks: conflict-free. The pad keeps lines 16-byte aligned and
// 16-line tiles 32-byte aligned, as WMMA and the 16-byte copies need.
constexpr int kTcPad = 8;
constexpr int tc_ld(int width) { return width + kTcPad; }
constexpr int kTcLdS = kTcSlots + kTcPad;  // the 64-wide tiles: logits, P, dS

inline bool tc_shape_supported(int D, int Dv, int ms) {
  return (D == 64 || D == 128) && (Dv == 64 || Dv == 128) && ms <= kTcSlots;
}

// Shared memory per block, in bytes.
template <typename T>
constexpr size_t tc_query_warp_smem(int D, int DV) {
  return sizeof(T) * kTcRows * tc_ld(D) + sizeof(float) * kTcRows * kTcLdS + sizeof(T) * kTcRows * kTcLdS +
         sizeof(float) * kTcRows * tc_ld(DV);
}
template <typename T>
constexpr size_t tc_query_smem(int D, int DV) {
  return sizeof(T) * kTcSlots * (tc_ld(D) + tc_ld(DV)) + kTcWarps * tc_query_warp_smem<T>(D, DV);
}
template <typename T>
constexpr size_t tc_landmark_warp_smem(int DV) {
  return sizeof(float) * kTcRows * kTcLdS + sizeof(T) * kTcRows * kTcLdS + sizeof(float) * kTcRows * tc_ld(DV) +
         sizeof(float) * kTcRows;
}
template <typename T>
constexpr size_t tc_landmark_smem(int D, int DV) {
  return sizeof(T) * kTcSlots * (2 * tc_ld(D) + tc_ld(DV)) + kTcWarps * tc_landmark_warp_smem<T>(DV);
}

// Rows move between global and shared memory 16 bytes (8 half elements) at a
// time: a warp's load of 16 rows x D takes D/8 x 16 / 32 vector loads per lane
// instead of D/2 two-byte loads, all independent (8 per lane at D = 128), so
// a warp has 8x the bytes in flight per instruction. A row whose address or
// the chunk's is not 16-byte aligned (a tensor sliced at an odd offset, a row
// stride that is not a multiple of 8) is moved element by element; the check
// is per row, so aligned rows keep the vector path. Consecutive lanes touch
// consecutive 16-byte chunks of a row: shared-memory stores without bank
// conflicts (each quarter warp covers 128 contiguous bytes).
// (Pack16, aligned16: common.cuh.)
template <typename T>
__device__ __forceinline__ void copy8(T* dst, const T* src) {  // dst 16-byte aligned (shared memory)
  if (aligned16(src)) {
#if defined(__CUDACC__)
    *reinterpret_cast<Pack16*>(dst) = *reinterpret_cast<const Pack16*>(src);
#else
    __builtin_memcpy(dst, src, 16);  // the emulation: no type punning
#endif
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) dst[j] = src[j];
  }
}
template <typename T>
__device__ __forceinline__ void zero8(T* dst) {
#pragma unroll
  for (int j = 0; j < 8; ++j) dst[j] = from_acc<T>(0.0f);
}
// 8 floats of shared memory, rounded to T, to a global row (two T per 32-bit
// word, built in registers: no local array).
template <typename T>
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
  const T a = from_acc<T>(lo), b = from_acc<T>(hi);
  unsigned short x, y;
  memcpy(&x, &a, 2);
  memcpy(&y, &b, 2);
  return static_cast<unsigned int>(x) | (static_cast<unsigned int>(y) << 16);
}
template <typename T>
__device__ __forceinline__ void store8(T* dst, const float* src) {
  if (aligned16(dst)) {
    Pack16 v;
#pragma unroll
    for (int j = 0; j < 4; ++j) v.w[j] = pack2<T>(src[2 * j], src[2 * j + 1]);
#if defined(__CUDACC__)
    *reinterpret_cast<Pack16*>(dst) = v;
#else
    __builtin_memcpy(static_cast<void*>(dst), &v, 16);
#endif
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) dst[j] = from_acc<T>(src[j]);
  }
}

// 64 float landmark rows of width W (k̃, q̃, W or Z·W of one head: rows of W
// floats, contiguous; rows >= n zero) to T in shared memory (ld tc_ld(W)), by
// the block's threads: 4 floats per 16-byte load and 8-byte store, all of a
// thread's loads (8 at W = 64, 16 at 128) independent. The copy once took a
// 4-byte load per element (128 per thread at W = 128, from L2), a few
// tiles' time in each block of the query pass. A source row not 16-byte
// aligned (a caller of the backward op passing landmarks at an odd offset)
// is read element by element.
template <typename T, int W>
__device__ __forceinline__ void tc_stage_landmarks(T* dst, const float* src, int n) {
  constexpr int kBlockThreads = kTcWarps * 32;
  static_assert((kTcSlots * W / 4) % kBlockThreads == 0, "whole 4-float groups per thread");
#pragma unroll
  for (int it = 0; it < kTcSlots * W / 4 / kBlockThreads; ++it) {
    const int i = threadIdx.x + kBlockThreads * it;
    const int r = i / (W / 4), c = (i % (W / 4)) * 4;
    float f[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (r < n) {
      const float* s = src + static_cast<int64_t>(r) * W + c;
      if (aligned16(s)) {
        load16(f, s);
      } else {
#pragma unroll
        for (int u = 0; u < 4; ++u) f[u] = s[u];
      }
    }
    // 8-byte aligned: the pitch is a multiple of 16 bytes, c of 4 elements
#if defined(__CUDACC__)
    *reinterpret_cast<uint2*>(dst + r * tc_ld(W) + c) = make_uint2(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]));
#else
    const unsigned int w2[2] = {pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3])};
    __builtin_memcpy(static_cast<void*>(dst + r * tc_ld(W) + c), w2, 8);
#endif
  }
}

// ROWS owner rows x0 .. x0 + ROWS - 1 of width W into dst (ld tc_ld(W)), rows >= n
// zero, 16 bytes at a time by THREADS threads (t: this thread's index among
// them; a warp's 16 rows with t = lane, a block's 64 with t = threadIdx.x).
// The trip count is known at compile time (W / 16 chunks per thread for a
// warp's rows): all of a thread's loads are issued before the first is used.
// ASYNC: the aligned chunks go by cp.async (sm_80+) and land by the caller's
// __pipeline_wait_prior (the caller commits the batch); padding rows and rows
// that are not 16-byte aligned are written at once with plain stores, so the
// caller's wait and barrier publish every chunk alike.
template <typename T, int W, int ROWS, int THREADS, bool ASYNC = false>
__device__ __forceinline__ void tc_stage_rows(T* dst, const RowsView& x, int b, int h, int x0, int n, int t) {
  static_assert((ROWS * W / 8) % THREADS == 0, "whole 16-byte chunks per thread");
#pragma unroll
  for (int it = 0; it < ROWS * W / 8 / THREADS; ++it) {
    const int i = t + THREADS * it;
    const int rr = i / (W / 8), c8 = (i % (W / 8)) * 8;
    if (x0 + rr < n) {
      const T* src = row_ptr<T>(x, b, h, x0 + rr) + c8;
      if (ASYNC && aligned16(src)) {
        __pipeline_memcpy_async(dst + rr * tc_ld(W) + c8, src, 16);
      } else {
        copy8(dst + rr * tc_ld(W) + c8, src);
      }
    } else {
      zero8(dst + rr * tc_ld(W) + c8);
    }
  }
}
template <typename T, int W, int ROWS, int THREADS>
__device__ __forceinline__ void tc_stage_rows_async(T* dst, const RowsView& x, int b, int h, int x0, int n, int t) {
  tc_stage_rows<T, W, ROWS, THREADS, true>(dst, x, b, h, x0, n, t);
}

// The softmax of a warp's 16 x 64 logits runs on lane pairs: lane l owns row
// r = l >> 1 and the 32 columns of parity half = l & 1; at step i it takes
// column 2k + half, k = (i - 3r) mod 32 (tc_column). With the padded pitch of
// 72 elements (kTcLdS) that is conflict-free for both tiles: the float logits
// sS put element (r, 2k + half) in bank (8r + 2k + half) mod 32 = 2((i + r)
// mod 16) + half, distinct for the 32 lanes; the 2-byte probabilities sP in the
// word 36r + k, bank (4r + k) mod 32 = (i + r) mod 32, distinct for the 16
// pairs, whose two lanes write the two halves of one word. So are the key
// side's per-column reads of lse and delta (bank 2k + half). The former walk
// (column half·32 + (i + l) mod 32) was conflict-free at a pitch of 64 and is
// 2-way on sP at 72; plain order (column i) was 32-way on sS.
__device__ __forceinline__ int tc_column(int half, int i, int lane) {
  return 2 * ((i - 3 * (lane >> 1)) & 31) + half;
}

// S (16 x 64, float, ld kTcLdS) = Q (16 x D) · Kᵀ, K (64 x D), both ld tc_ld(D): all in smem.
// GROUP output tiles keep their accumulators live across the k-steps, so each
// Q fragment is loaded 4 / GROUP times instead of 4 (D/16 x (4/GROUP + 4)
// fragment loads; each tile sums its k-steps in the same order whatever
// GROUP). The backward passes (one block per SM, registers to spare) take 4;
// the forward passes 1: at 4 their registers reach 255 and spill
// (tc_landmark_kernel, sm_90), for a phase that is not their limit.
template <typename T, int D, int GROUP = 1>
__device__ __forceinline__ void tc_logits(const T* sQ, const T* sK, float* sS) {
  static_assert((kTcSlots / 16) % GROUP == 0, "whole groups of output tiles");
#pragma unroll
  for (int j0 = 0; j0 < kTcSlots / 16; j0 += GROUP) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[GROUP];
#pragma unroll
    for (int j = 0; j < GROUP; ++j) wmma::fill_fragment(acc[j], 0.0f);
#pragma unroll
    for (int t = 0; t < D / 16; ++t) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, sQ + 16 * t, tc_ld(D));
#pragma unroll
      for (int j = 0; j < GROUP; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, sK + 16 * (j0 + j) * tc_ld(D) + 16 * t, tc_ld(D));
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < GROUP; ++j)
      wmma::store_matrix_sync(sS + 16 * (j0 + j), acc[j], kTcLdS, wmma::mem_row_major);
  }
}

// O (16 x DV, float) (+)= P (16 x 64, ld kTcLdS) · V (64 x DV); O and V ld tc_ld(DV).
template <typename T, int DV>
__device__ __forceinline__ void tc_product(const T* sP, const T* sV, float* sO, bool accumulate) {
#pragma unroll
  for (int j = 0; j < DV / 16; ++j) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, sO + 16 * j, tc_ld(DV), wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
#pragma unroll
    for (int t = 0; t < kTcSlots / 16; ++t) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(a, sP + 16 * t, kTcLdS);
      wmma::load_matrix_sync(b, sV + 16 * t * tc_ld(DV) + 16 * j, tc_ld(DV));
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(sO + 16 * j, acc, tc_ld(DV), wmma::mem_row_major);
  }
}

// Query rows: out = softmax(scale q k̃ᵀ)·W and lse, for every non-empty
// element; k̃ and W (fp32 in global) are converted once per block, which then
// walks `tiles_per_block` tiles of 64 queries.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(kTcWarps * 32, 1) tc_query_kernel(ForwardArgs a, int tiles_per_block) {
  static_assert((kTcRows * D / 8) % 32 == 0 && (kTcRows * DV / 8) % 32 == 0, "whole 16-byte chunks per lane");
  const Problem& p = a.p;
  const int bh = a.bh0 + blockIdx.z, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, Only::kAll)) return;
  const int nx = e.Lb, ny = e.mk;
  constexpr int BR = kTcWarps * kTcRows;
  const int first = blockIdx.x * tiles_per_block * BR;
  if (first >= nx) return;
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  T* sK = reinterpret_cast<T*>(smem_raw);  // [64][tc_ld(D)]
  T* sW = sK + kTcSlots * tc_ld(D);         // [64][tc_ld(DV)]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  unsigned char* wbase =
      reinterpret_cast<unsigned char*>(sW + kTcSlots * tc_ld(DV)) + warp * tc_query_warp_smem<T>(D, DV);
  T* sQ = reinterpret_cast<T*>(wbase);                          // [16][tc_ld(D)]
  float* sS = reinterpret_cast<float*>(sQ + kTcRows * tc_ld(D));  // [16][kTcLdS]
  T* sP = reinterpret_cast<T*>(sS + kTcRows * kTcLdS);           // [16][kTcLdS]
  float* sO = reinterpret_cast<float*>(sP + kTcRows * kTcLdS);   // [16][tc_ld(DV)]

  const float* klm = static_cast<const float*>(a.y.data) + static_cast<int64_t>(bh) * p.ms * D;
  const float* wlm = static_cast<const float*>(a.v.data) + static_cast<int64_t>(bh) * p.ms * DV;
  tc_stage_landmarks<T, D>(sK, klm, ny);
  tc_stage_landmarks<T, DV>(sW, wlm, ny);
  __syncthreads();
  const float scale = static_cast<float>(p.scale);
  const int r = lane >> 1, half = lane & 1;  // softmax: a lane pair per row, 32 columns each (tc_column)

  for (int tile = 0; tile < tiles_per_block; ++tile) {
    const int x0 = first + tile * BR + warp * kTcRows;  // this warp's first row
    if (x0 >= nx) break;                                // warp-uniform
    tc_stage_rows<T, D, kTcRows, 32>(sQ, a.x, b, h, x0, nx, lane);  // 8 chunks per lane at D = 128
    __syncwarp();
    tc_logits<T, D>(sQ, sK, sS);
    __syncwarp();
    float mx = -CUDART_INF_F;
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      if (c < ny) mx = fmaxf(mx, sS[r * kTcLdS + c] * scale);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    float sum = 0.0f;
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      if (c < ny) sum += expf(sS[r * kTcLdS + c] * scale - mx);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    const float inv = 1.0f / sum;
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      sP[r * kTcLdS + c] = from_acc<T>(c < ny ? expf(sS[r * kTcLdS + c] * scale - mx) * inv : 0.0f);
    }
    if (half == 0 && x0 + r < nx) {
      const int64_t pos = position(a.out.index, a.out.npad, b, x0 + r);
      static_cast<float*>(a.lse)[static_cast<int64_t>(bh) * p.L + pos] = mx + logf(sum);
    }
    __syncwarp();
    tc_product<T, DV>(sP, sW, sO, /*accumulate=*/false);
    __syncwarp();
#pragma unroll
    for (int it = 0; it < kTcRows * DV / 8 / 32; ++it) {  // 16-byte chunks
      const int i = lane + 32 * it;
      const int rr = i / (DV / 8), c8 = (i % (DV / 8)) * 8;
      if (x0 + rr >= nx) continue;
      const int64_t pos = position(a.out.index, a.out.npad, b, x0 + rr);
      T* orow = static_cast<T*>(a.out.data) + b * a.out.sb + h * a.out.sh + pos * a.out.sr;
      store8(orow + c8, sO + rr * tc_ld(DV) + c8);
    }
    __syncwarp();
  }
}

// Bm·V partials over one key split: owner rows are the (at most 64) query
// landmarks of a Nyström element, keys and values arrive 64 at a time, with
// an online softmax per row (rescaling the float32 running product in smem).
// With a.part_klm it also pools the key landmarks from the staged key rows, so
// that the forward reads k once: thread c < D walks column c of each chunk in
// row order with a float32 running sum and flushes it at every segment
// boundary (segment_of / segment_start over the element's mk segments) and at
// the end of the split, to part_klm (B*H, splits, ms, D) at (head, split,
// segment). Only the first and last segment of a split can be partial;
// tc_key_landmark_kernel adds a segment's splits in split order.
template <typename T, int D, int DV>
__global__ void __launch_bounds__(kTcWarps * 32, 1) tc_landmark_kernel(ForwardArgs a) {
  static_assert((kTcSlots * D / 8) % (kTcWarps * 32) == 0 && (kTcSlots * DV / 8) % (kTcWarps * 32) == 0,
                "whole 16-byte chunks per thread");
  const Problem& p = a.p;
  const int bh = a.bh0 + blockIdx.z, b = bh / p.H, h = bh % p.H;
  const Elem e = element(p, b);
  if (!selected(e, Only::kNystrom)) return;
  const int nx = e.mq, ny = e.Sb;
  const int per = split_length(ny, a.splits, kTcSlots);
  const int y0 = min(ny, static_cast<int>(blockIdx.y) * per), y1 = min(ny, y0 + per);
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [64][tc_ld(D)] all owner rows
  T* sK = sQ + kTcSlots * tc_ld(D);         // [64][tc_ld(D)]
  T* sV = sK + kTcSlots * tc_ld(D);         // [64][tc_ld(DV)]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  unsigned char* wbase =
      reinterpret_cast<unsigned char*>(sV + kTcSlots * tc_ld(DV)) + warp * tc_landmark_warp_smem<T>(DV);
  float* sS = reinterpret_cast<float*>(wbase);                 // [16][kTcLdS]
  T* sP = reinterpret_cast<T*>(sS + kTcRows * kTcLdS);          // [16][kTcLdS]
  float* sO = reinterpret_cast<float*>(sP + kTcRows * kTcLdS);  // [16][tc_ld(DV)]
  float* sAlpha = sO + kTcRows * tc_ld(DV);                     // [16]

  const float* qlm = static_cast<const float*>(a.x.data) + static_cast<int64_t>(bh) * p.ms * D;
  tc_stage_landmarks<T, D>(sQ, qlm, nx);
  for (int i = lane; i < kTcRows * tc_ld(DV); i += 32) sO[i] = 0.0f;
  const float scale = static_cast<float>(p.scale);
  const int r = lane >> 1, half = lane & 1;
  float m_run = -CUDART_INF_F, l_run = 0.0f;  // row r's statistics (both lanes of the pair agree)
  const T* sQw = sQ + warp * kTcRows * tc_ld(D);
  // Key pooling (warp-uniform: D is a multiple of 32): the segment of the
  // current row, the first row of the next segment, column tid's running sum.
  const bool pool = a.part_klm != nullptr && tid < D;
  float* kpart = pool ? static_cast<float*>(a.part_klm) +
                            (static_cast<int64_t>(bh) * a.splits + blockIdx.y) * p.ms * D + tid
                      : nullptr;
  int seg = y0 < y1 ? static_cast<int>(segment_of(y0, ny, e.mk)) : 0;
  int next = static_cast<int>(segment_start(seg + 1, ny, e.mk));
  float ksum = 0.0f;

  // The key and value rows of a chunk load by cp.async (16-byte chunks, 8 per
  // thread at D = 128) into the one buffer each has, while the block works on
  // what the other holds: the values of chunk c load during its pooling,
  // logits and softmax (sV is free once every warp is past chunk c - 1's
  // product), the keys of chunk c + 1 during chunk c's softmax and product
  // (sK is free once every warp has its logits). No shared memory beyond the
  // single buffers: two blocks per SM still fit.
  if (y0 < y1) {
    tc_stage_rows_async<T, D, kTcSlots, kTcWarps * 32>(sK, a.y, b, h, y0, y1, tid);
    __pipeline_commit();
  }
  for (int c0 = y0; c0 < y1; c0 += kTcSlots) {
    __pipeline_wait_prior(0);  // this chunk's keys (issued during the previous chunk, or above)
    __syncthreads();           // ... landed for every thread; sQ is loaded; every warp is past the last product
    tc_stage_rows_async<T, DV, kTcSlots, kTcWarps * 32>(sV, a.v, b, h, c0, y1, tid);
    __pipeline_commit();
    if (pool) {  // sK is read only until the barrier after the logits
      // Runs of rows of one segment, without a per-row test (a chunk meets
      // one or two segments at 16K keys, 64 landmarks); each boundary flushes
      // the finished segment. Segments have at least one row (mk <= ny).
      const int rows = min(kTcSlots, y1 - c0);
      int rr = 0;
      for (;;) {
        const int stop = min(rows, next - c0);
#pragma unroll 4
        for (; rr < stop; ++rr) ksum += to_acc<float>(sK[rr * tc_ld(D) + tid]);
        if (rr == rows) break;
        kpart[static_cast<int64_t>(seg) * D] = ksum;  // row c0 + rr starts segment seg + 1
        ksum = 0.0f;
        ++seg;
        next = static_cast<int>(segment_start(seg + 1, ny, e.mk));
      }
    }
    tc_logits<T, D>(sQw, sK, sS);
    __syncthreads();  // every warp has its logits and the pooling is done: sK is free
    if (c0 + kTcSlots < y1) tc_stage_rows_async<T, D, kTcSlots, kTcWarps * 32>(sK, a.y, b, h, c0 + kTcSlots, y1, tid);
    __pipeline_commit();  // possibly empty: one batch per step
    const int valid = y1 - c0;  // keys of this chunk
    float cm = -CUDART_INF_F;
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      if (c < valid) cm = fmaxf(cm, sS[r * kTcLdS + c] * scale);
    }
    cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, 1));
    const float m_new = fmaxf(m_run, cm);  // finite: the chunk has a key
    float ps = 0.0f;
    for (int i = 0; i < 32; ++i) {
      const int c = tc_column(half, i, lane);
      const float pe = c < valid ? expf(sS[r * kTcLdS + c] * scale - m_new) : 0.0f;
      ps += pe;
      sP[r * kTcLdS + c] = from_acc<T>(pe);
    }
    ps += __shfl_xor_sync(0xffffffffu, ps, 1);
    const float alpha = expf(m_run - m_new);
    l_run = l_run * alpha + ps;
    m_run = m_new;
    if (half == 0) sAlpha[r] = alpha;
    __syncwarp();
    for (int i = lane; i < kTcRows * tc_ld(DV); i += 32) sO[i] *= sAlpha[i / tc_ld(DV)];  // the pad too: finite
    __pipeline_wait_prior(1);  // this chunk's values (the next chunk's keys may stay in flight)
    __syncthreads();           // ... landed for every thread
    tc_product<T, DV>(sP, sV, sO, /*accumulate=*/true);
    __syncwarp();
  }
  if (pool && y0 < y1) kpart[static_cast<int64_t>(seg) * D] = ksum;  // the split's last segment
  const int gr = warp * kTcRows + r;
  if (gr < nx && half == 0) {
    const int64_t slot = (static_cast<int64_t>(bh) * a.splits + blockIdx.y) * p.ms + gr;
    static_cast<float*>(a.part_max)[slot] = m_run;
    static_cast<float*>(a.part_sum)[slot] = l_run;
  }
  __syncwarp();
  for (int i = lane; i < kTcRows * DV; i += 32) {
    const int rr = warp * kTcRows + i / DV;
    if (rr >= nx) continue;
    const int64_t slot = (static_cast<int64_t>(bh) * a.splits + blockIdx.y) * p.ms + rr;
    static_cast<float*>(a.part_acc)[slot * DV + i % DV] = sO[(i / DV) * tc_ld(DV) + i % DV];
  }
}

// Key landmarks of the Nyström elements from tc_landmark_kernel's segment
// sums: a block per (segment j, head) adds, per column, the partials of the
// splits that meet segment j, in split order, and divides by its size (as
// pool_kernel does: times 1/size). k_lm (B, H, ms, D) float; rows j >= mk and
// other elements are left alone. T: the input dtype (one instantiation per
// inst_*.cu).
template <typename T>
__global__ void __launch_bounds__(kTcWarps * 32) tc_key_landmark_kernel(Problem p, int bh0, int splits,
                                                                       const float* part_klm, float* k_lm) {
  const int j = blockIdx.x, bh = bh0 + blockIdx.y, b = bh / p.H;
  const Elem e = element(p, b);
  if (e.kind != ElementKind::kNystrom || j >= e.mk) return;
  const int ny = e.Sb;
  const int64_t r0 = segment_start(j, ny, e.mk), r1 = segment_start(j + 1, ny, e.mk);
  const int per = split_length(ny, splits, kTcSlots);
  const int s0 = static_cast<int>(r0 / per), s1 = static_cast<int>((r1 - 1) / per);
  const float inv = 1.0f / static_cast<float>(r1 - r0);
  for (int c = threadIdx.x; c < p.D; c += blockDim.x) {
    float s = 0.0f;
    for (int sp = s0; sp <= s1; ++sp) s += part_klm[((static_cast<int64_t>(bh) * splits + sp) * p.ms + j) * p.D + c];
    k_lm[(static_cast<int64_t>(bh) * p.ms + j) * p.D + c] = s * inv;
  }
}

}  // namespace kern
}  // namespace nystrom::cuda
