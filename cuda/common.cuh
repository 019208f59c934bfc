// What every kernel of cuda/ shares (docs/DESIGN.md §7): block shapes, the
// accumulate type and conversions, warp reductions, and a batch element's
// real lengths and rows. The launch-level contract is launchers.h; the
// kernels are in forward_kernels.cuh, forward_tc_kernels.cuh,
// newton_schulz_kernel.cuh and backward_kernels.cuh, instantiated once per
// input dtype (inst_*.cu) so that the four dtypes compile in parallel.
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

#include "element.h"
#include "launchers.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "emu/seams.h"  // <<< >>> and shared memory: the real syntax under nvcc, the CPU emulation otherwise

#include <cmath>
#include <cstdint>
#include <cstring>

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

// ------------------------------------------------------ 16-byte vectors ----
// A global row moves 16 bytes per lane and instruction where its address
// allows; an unaligned one (a tensor sliced at an odd offset, a row stride
// that is not a multiple of 16 bytes) element by element. The emulation
// copies bytes (no type punning); nvcc emits one 128-bit access.
struct alignas(16) Pack16 {
  unsigned int w[4];
};
template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}
// The 16 / sizeof(T) elements at src (16-byte aligned) into registers.
template <typename T>
__device__ __forceinline__ void load16(T (&dst)[16 / sizeof(T)], const T* src) {
#if defined(__CUDACC__)
  const Pack16 v = *reinterpret_cast<const Pack16*>(src);
  memcpy(dst, &v, 16);
#else
  __builtin_memcpy(dst, src, 16);
#endif
}

// ------------------------------------------------------------- elements ----
// One batch element after its padding is removed (element.h, docs/DESIGN.md
// §2 step 1).
struct Elem {
  int Lb, Sb, mq, mk;
  ElementKind kind;
};

__device__ __forceinline__ Elem element(const Problem& p, int b) {
  Elem e;
  e.Lb = p.q_count ? p.q_count[b] : p.L;
  e.Sb = p.k_count ? p.k_count[b] : p.S;
  e.mq = min(p.m, e.Lb);
  e.mk = min(p.m, e.Sb);
  e.kind = element_kind(e.Lb, e.Sb, p.m);
  return e;
}

__device__ __forceinline__ bool selected(const Elem& e, Only only) {
  if (e.kind == ElementKind::kEmpty) return false;
  if (only == Only::kExact) return e.kind == ElementKind::kExact;
  if (only == Only::kNystrom) return e.kind == ElementKind::kNystrom;
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

// segment_start and segment_of (the segments of docs/DESIGN.md §2 step 2)
// come from element.h.

// Keys per split of the Bm·V pass: ny real keys cut into `splits` ranges, each
// a multiple of `align` rows (the kernel's chunk); split s covers
// [min(ny, s·per), min(ny, (s + 1)·per)), the last ones possibly empty. The
// merge of the key landmarks finds a segment's splits with the same length.
__device__ __forceinline__ int split_length(int ny, int splits, int align) {
  return ((ny + splits - 1) / splits + align - 1) / align * align;
}

}  // namespace kern
}  // namespace nystrom::cuda
