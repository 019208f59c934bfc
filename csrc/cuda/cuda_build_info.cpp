// The CUDA backend's part of nystrom_build_info (build_info.h): real or
// emulated, the CUDA version and the GPU architectures it was built for, or
// the emulated target profile.
#include "build_info.h"

#include <string>

#if defined(NYSTROM_CUDA_EMULATION)
#include "emu/runtime.h"
#else
#include <cuda_runtime_api.h>
#endif

#ifndef NYSTROM_CUDA_ARCHITECTURES_STRING
#define NYSTROM_CUDA_ARCHITECTURES_STRING ""
#endif

extern "C" const char* nystrom_cuda_build_info(void) {
#if defined(NYSTROM_CUDA_EMULATION)
  // The target profile can change at run time (torch.ops.nystrom._emulator): read it each call.
  thread_local std::string info;
  info = std::string("{\"emulated\": true, \"cuda_headers\": ") + std::to_string(CUDART_VERSION) +
         ", \"architectures\": \"emulated " + ::nystrom::emu::profile().arch + " (" + ::nystrom::emu::profile().card +
         ")\"}";
  return info.c_str();
#else
  static const std::string info = std::string("{\"emulated\": false, \"cuda_built\": ") +
                                  std::to_string(CUDART_VERSION) + ", \"architectures\": \"" +
                                  NYSTROM_CUDA_ARCHITECTURES_STRING + "\"}";
  return info.c_str();
#endif
}
