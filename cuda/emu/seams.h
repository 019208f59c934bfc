// The source seams between the CUDA kernels and the CPU emulation of the
// CUDA execution model. Kernel sources include this header unconditionally
// and write three things through its macros:
//
//   NYSTROM_LAUNCH(kernel, grid, block, smem, stream)(args...);
//       nvcc:      kernel<<<grid, block, smem, stream>>>(args...);
//       emulation: a call that checks the launch against the target's
//                  limits and runs every block on the CPU.
//   NYSTROM_DYNAMIC_SHARED(name);
//       nvcc:      extern __shared__ __align__(128) unsigned char name[];
//       emulation: unsigned char* const name = (this block's dynamic shared memory);
//   NYSTROM_SHARED(type, name, [dim1][dim2]...);
//       nvcc:      __shared__ type name[dim1][dim2]...;
//       emulation: a reference to this block's copy of the array.
//
// `kernel` is a name, a template-id with one argument or a variable (a
// template-id with several arguments needs parentheses or an alias);
// `type` must be a single token or an alias (macro arguments split at commas).
//
// Under nvcc (__CUDACC__) nothing else changes: the CUDA headers and the
// keywords are the real ones. With NYSTROM_CUDA_EMULATION defined (a host
// compiler building the emulated kernels), this header brings in the
// emulator: device.h (built-in variables, barriers, shuffles, __ldg, device
// math, keywords), wmma.h (nvcuda::wmma) and runtime.h (the CUDA runtime
// calls, mapped by macros onto nystrom::emu). Shared memory is then per
// block, poisoned with 0xFF bytes (NaN) before every block, counted against
// the target's limits, and followed by guard bytes that catch a write past
// its end.
#pragma once

#if defined(__CUDACC__)

#define NYSTROM_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define NYSTROM_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define NYSTROM_SHARED(type, name, dims) __shared__ type name dims

#elif defined(NYSTROM_CUDA_EMULATION)

#include "device.h"
#include "runtime.h"
#include "wmma.h"

#include <mma.h>  // empty under a host compiler; included so that a later include stays harmless

#define NYSTROM_LAUNCH(kernel, grid, block, smem, stream) \
  ::nystrom::emu::launcher((kernel), #kernel, __FILE__, __LINE__, (grid), (block), (smem), (stream))
#define NYSTROM_DYNAMIC_SHARED(name) \
  unsigned char* const name = ::nystrom::emu::detail::dynamic_shared(::nystrom::emu::Site::here())
#define NYSTROM_SHARED(type, name, dims)                                               \
  type(&name) dims = ::nystrom::emu::detail::static_shared_array<type dims>([] {}, \
                                                                          ::nystrom::emu::Site::here())

#else
#error "cuda/emu/seams.h: compile kernels with nvcc, or define NYSTROM_CUDA_EMULATION for the CPU emulation"
#endif
