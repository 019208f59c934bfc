// Internal: the few places where the CUDA glue talks to the device itself,
// behind one seam (docs/DESIGN.md §7, §11): the device guard, the current
// stream, the device's properties, and the dispatch key the glue registers
// at. A real build uses ATen's CUDA context. The emulated build
// (NYSTROM_CUDA_EMULATION, scripts/test_emulated.sh) runs the same glue and
// the same kernels on CPU tensors: no guard, the null stream, and the limits
// of the emulated target profile (NYSTROM_EMU_ARCH), read through the
// emulated runtime's cudaDeviceGetAttribute.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>

#if defined(NYSTROM_CUDA_EMULATION)
#include "emu/runtime.h"  // the CUDA runtime calls, mapped onto the emulator
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace nystrom::cudaimpl {

/// The properties of the current device the launches depend on.
struct DeviceInfo {
  int sm_count;
  size_t smem_optin;
};

#if defined(NYSTROM_CUDA_EMULATION)

/// The emulated device serves CPU tensors: there is no device to select.
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
/// Memory a kernel is to write in full starts poisoned (0xFF bytes: NaN),
/// so that an element no thread writes shows in the results.
inline void poison_for_kernels(const at::Tensor& t) {
  if (t.defined() && t.numel() > 0) ::nystrom::emu::poison(t.data_ptr(), t.numel() * t.element_size());
}
inline DeviceInfo device_info() {
  int sms = 0, smem = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  return {sms, static_cast<size_t>(smem)};
}

#else

using DeviceGuard = c10::cuda::CUDAGuard;
inline void poison_for_kernels(const at::Tensor&) {}
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline DeviceInfo device_info() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return {prop->multiProcessorCount, static_cast<size_t>(prop->sharedMemPerBlockOptin)};
}

#endif

}  // namespace nystrom::cudaimpl
