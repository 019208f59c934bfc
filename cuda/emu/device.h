// Device side of the CUDA emulation: what kernel code sees when it is
// compiled by the host compiler (through cuda/emu/seams.h, never directly by
// a kernel source). The CUDA headers come first, with their host paths
// (half and bfloat16 conversions, math constants); then the built-in
// variables, barriers, warp shuffles, __ldg, device math and the execution
// space keywords. The keywords are redefined last, after every CUDA header:
// under a host compiler host_defines.h makes __shared__ and friends empty.
//
// Every intrinsic takes a trailing defaulted Site, filled in by the compiler
// (__builtin_FILE/LINE/FUNCTION) at the call: errors name the source site.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include "runtime.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace nystrom::emu {

/// A source position, filled in at the call of an intrinsic.
struct Site {
  const char* file;
  int line;
  const char* func;
  static constexpr Site here(const char* file = __builtin_FILE(), int line = __builtin_LINE(),
                             const char* func = __builtin_FUNCTION()) noexcept {
    return Site{file, line, func};
  }
};

namespace detail {

/// What the built-in variables read: set by the scheduler on every switch.
struct ThreadState {
  uint3 thread_idx;
  uint3 block_idx;
  uint3 block_dim;
  uint3 grid_dim;
  void* executor;  // null outside a kernel
};
// GNU __thread (not thread_local): plain TLS with no wrapper function, the
// same on every access from any translation unit.
extern __thread ThreadState tls;

[[noreturn]] void outside_kernel(const char* what);
inline const ThreadState& state(const char* what) {
  if (tls.executor == nullptr) outside_kernel(what);
  return tls;
}

/// The calling thread's lane: its linear index in the block, mod 32.
inline int lane_id() {
  const ThreadState& t = state("a warp collective");
  return static_cast<int>((t.thread_idx.x + t.block_dim.x * (t.thread_idx.y + t.block_dim.y * t.thread_idx.z)) % 32);
}

void syncthreads(Site site);

/// Warp collectives. Each lane deposits its LaneArgs and waits; the lane
/// that completes the warp checks that all 32 came from the same site with
/// the same operation, then runs `complete` on the 32 deposits (in lane
/// order) before any lane goes on. `complete` writes each lane's result
/// through the pointers the lane deposited.
enum class Op : std::uint8_t { kShflXor, kSyncwarp, kWmmaFill, kWmmaLoad, kWmmaMma, kWmmaStore };
const char* op_name(Op op);

struct LaneArgs {
  std::uint64_t value = 0;      // shuffle: the operand bits; fill: the value bits
  void* out = nullptr;          // where this lane's result goes (a variable or fragment of the lane)
  const void* in[3] = {};       // fragments or memory read by the operation
  const void* mem = nullptr;    // load/store: the tile's memory
  unsigned ldm = 0;
  int layout = 0;
  int lane_mask = 0;            // shuffle
  int width = 0;                // shuffle
};
using Complete = void (*)(LaneArgs* lanes, const Site& site);
void collective(Op op, Site site, const LaneArgs& mine, Complete complete);

/// A lane's WMMA fill/load/store (not collective on a GPU either): logged,
/// and compared across the warp's lanes at its next collective and when its
/// last lane returns.
void note_fragment_op(Op op, Site site, const void* mem, unsigned ldm, int layout, std::uint64_t value);

/// A fault found in kernel code: ends the block and the launch with a sticky
/// cudaErrorLaunchFailure whose detail names the kernel, block and site.
[[noreturn]] void fail(const Site& site, const std::string& what);

unsigned char* dynamic_shared(Site site);
void* static_shared(const void* key, std::size_t size, std::size_t align, Site site);

/// One static __shared__ array per block and declaration: `Tag` (a lambda
/// type, unique per source site and instantiation) tells the sites apart.
template <class Array, class Tag>
Array& static_shared_array(Tag, Site site) {
  static char key;  // its address identifies the declaration
  return *static_cast<Array*>(static_shared(&key, sizeof(Array), alignof(Array), site));
}

std::uint64_t shfl_xor(unsigned mask, std::uint64_t bits, int lane_mask, int width, Site site);

/// Asynchronous copies from global to shared memory (cp.async; the CUDA
/// pipeline primitives of cuda_pipeline_primitives.h). A thread's copies form
/// batches, each closed by a commit; a wait completes every batch but the
/// `prior` most recent. The hardware may land a copy at any time between its
/// issue and its wait: the emulator lands it at the wait, except under the
/// reversed schedule, where it lands at the issue. A read before the wait then
/// sees the poisoned or stale bytes (in order, random), and a copy issued into
/// a buffer other threads still read overwrites it under their feet
/// (reversed). A thread that returns with copies it never waited for is a fault.
void async_copy(void* dst, const void* src, std::size_t bytes, std::size_t zfill, Site site);

/// WMMA's shared-memory traffic model (cuda/emu/wmma.h), counted per launch.
void note_wmma_traffic(const void* p, unsigned ldm, std::size_t elem);
void async_commit(Site site);
void async_wait_prior(std::size_t prior, Site site);

}  // namespace detail
}  // namespace nystrom::emu

// ---------------------------------------------------- built-in variables ----
#define threadIdx (::nystrom::emu::detail::state("threadIdx").thread_idx)
#define blockIdx (::nystrom::emu::detail::state("blockIdx").block_idx)
#define blockDim (::nystrom::emu::detail::state("blockDim").block_dim)
#define gridDim (::nystrom::emu::detail::state("gridDim").grid_dim)
constexpr int warpSize = 32;

// ---------------------------------------------------------- intrinsics ----
inline void __syncthreads(::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  ::nystrom::emu::detail::syncthreads(site);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  using namespace ::nystrom::emu::detail;
  if (mask != 0xffffffffu) fail(site, "__syncwarp with a partial mask is not emulated (only 0xffffffff)");
  collective(Op::kSyncwarp, site, LaneArgs{}, [](LaneArgs*, const ::nystrom::emu::Site&) {});
}

/// Full-mask butterfly shuffle of any trivially copyable value up to 8 bytes.
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "__shfl_xor_sync: unsupported type");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = ::nystrom::emu::detail::shfl_xor(mask, bits, lane_mask, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// cuda_pipeline_primitives.h: 4, 8 or 16 bytes from global to shared memory,
// both aligned to the size; the last `zfill` bytes of the destination are zeros.
inline void __pipeline_memcpy_async(void* dst_shared, const void* src_global, std::size_t size_and_align,
                                    std::size_t zfill = 0, ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  ::nystrom::emu::detail::async_copy(dst_shared, src_global, size_and_align, zfill, site);
}
inline void __pipeline_commit(::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  ::nystrom::emu::detail::async_commit(site);
}
inline void __pipeline_wait_prior(std::size_t prior, ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  ::nystrom::emu::detail::async_wait_prior(prior, site);
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// Device min/max: the integer and floating overloads CUDA's math headers
// give device code (mixed argument types are ambiguous here, as in C++).
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// Fast-math intrinsics: the accurate functions.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }

// Reinterpretations (math_constants.h builds CUDART_INF_F and friends on them).
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}
inline unsigned __float_as_uint(float x) {
  unsigned i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof d);
  return d;
}
inline long long __double_as_longlong(double x) {
  long long i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}

// ------------------------------------------------------------ keywords ----
// Redefined after every CUDA header. __shared__ alone has no host meaning
// that is per block: the seam macros of cuda/emu/seams.h declare shared
// memory, and a bare __shared__ stops the build with this name.
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ use_NYSTROM_SHARED_or_NYSTROM_DYNAMIC_SHARED_from_cuda_emu_seams_h
