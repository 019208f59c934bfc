// State shared by the host-side files of the CUDA emulation (runtime.cpp,
// cuda_api.cpp): the error state and the kernel registry. Internal.
#pragma once

#include "runtime.h"

#include <cstddef>
#include <mutex>
#include <string>

namespace nystrom::emu::detail {

/// Records `code` as this thread's last error, with the emulator's account.
void set_error(cudaError_t code, const std::string& detail);
/// The device's sticky error (cudaSuccess if none).
cudaError_t sticky();
/// True (and the last error set to it) if the device has a sticky error.
bool is_sticky(cudaError_t* out);
/// Makes `code` the device's sticky error, unless it has one already.
void set_sticky(cudaError_t code, const std::string& detail);
/// Clears the sticky error and this thread's last error.
void clear_errors();

/// What the emulator knows of a kernel, keyed by its address.
struct KernelInfo {
  std::string name;
  bool named = false;            // from the symbol table or the launch expression
  int max_dynamic = -1;          // cudaFuncAttributeMaxDynamicSharedMemorySize, -1: never set
  std::size_t static_bytes = 0;  // static shared memory seen in its launches
  std::uint64_t launches = 0;     // launches of it that ran (kernel_launches())
  std::size_t last_smem = 0;      // dynamic shared memory of the last of them (kernel_smem())
  // WMMA shared-memory instructions, their wavefronts and the conflict-free ideal (kernel_bank_traffic())
  std::uint64_t wmma_requests = 0, wmma_wavefronts = 0, wmma_ideal = 0;
};
std::mutex& kernels_mutex();
/// The kernel's entry (created, and named from the symbol table or `expr`, on
/// first sight). Call with kernels_mutex() held.
KernelInfo& kernel_info(const void* kernel, const char* expr);
/// Forgets every kernel's cudaFuncSetAttribute (a device reset).
void reset_kernel_attributes();

}  // namespace nystrom::emu::detail
