// The CUDA runtime calls of the emulation (see runtime.h): the error state
// (last error per host thread, sticky error per device), the kernels'
// names and attributes, device attributes of the target profile.
#include "host_state.h"

#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

namespace nystrom::emu {
namespace detail {

// --------------------------------------------------------- error state ----
// The last error is per host thread (as in the real runtime); the sticky
// error belongs to the (one, emulated) device.
namespace {
thread_local cudaError_t t_last = cudaSuccess;
thread_local cudaError_t t_detail_code = cudaSuccess;
thread_local std::string t_detail;
std::atomic<int> g_sticky{cudaSuccess};
std::mutex g_sticky_m;
std::string g_sticky_detail;
}  // namespace

void set_error(cudaError_t code, const std::string& detail) {
  t_last = code;
  t_detail_code = code;
  t_detail = detail;
}

cudaError_t sticky() { return static_cast<cudaError_t>(g_sticky.load()); }

// Every API call returns a sticky error, and records it as the last error.
bool is_sticky(cudaError_t* out) {
  const cudaError_t s = sticky();
  if (s == cudaSuccess) return false;
  t_last = s;
  *out = s;
  return true;
}

void set_sticky(cudaError_t code, const std::string& detail) {
  const std::lock_guard<std::mutex> lock(g_sticky_m);
  if (sticky() != cudaSuccess) return;  // the first fault stays
  g_sticky_detail = detail;
  g_sticky = code;
}

void clear_errors() {
  {
    const std::lock_guard<std::mutex> lock(g_sticky_m);
    g_sticky = cudaSuccess;
    g_sticky_detail.clear();
  }
  set_error(cudaSuccess, "");
}

// ------------------------------------------------------------ kernels ----
namespace {
std::mutex g_kernels_m;
std::unordered_map<const void*, KernelInfo> g_kernels;

// "void ns::kernel<float>(ns::Args)" -> "ns::kernel<float>"
std::string function_name(std::string s) {
  if (s.rfind("void ", 0) == 0) s.erase(0, 5);
  if (!s.empty() && s.back() == ')') {
    int depth = 0;
    for (std::size_t i = s.size(); i-- > 0;) {
      if (s[i] == ')') ++depth;
      if (s[i] == '(' && --depth == 0) {
        s.erase(i);
        break;
      }
    }
  }
  return s;
}

// The kernel's demangled name where the dynamic symbol table has it (a
// shared library, or an executable linked with -rdynamic), else `fallback`.
std::string resolve_name(const void* kernel, const char* fallback, bool* named) {
  *named = true;
  Dl_info info;
  if (dladdr(kernel, &info) != 0 && info.dli_sname != nullptr && info.dli_saddr == kernel) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && d != nullptr ? function_name(d) : std::string(info.dli_sname);
    std::free(d);
    return name;
  }
  if (fallback != nullptr) return fallback;
  *named = false;  // a later launch may name it
  char buf[32];
  std::snprintf(buf, sizeof buf, "kernel %p", kernel);
  return buf;
}

}  // namespace

std::mutex& kernels_mutex() { return g_kernels_m; }

void reset_kernel_attributes() {
  const std::lock_guard<std::mutex> lock(g_kernels_m);
  for (auto& k : g_kernels) k.second.max_dynamic = -1;
}

KernelInfo& kernel_info(const void* kernel, const char* expr) {  // kernels_mutex() held
  KernelInfo& k = g_kernels[kernel];
  if (!k.named) {
    k.name = resolve_name(kernel, expr, &k.named);
  }
  return k;
}

}  // namespace detail

using detail::g_sticky_detail;
using detail::g_sticky_m;
using detail::is_sticky;
using detail::set_error;
using detail::sticky;
using detail::t_detail;
using detail::t_detail_code;
using detail::t_last;

std::vector<std::pair<std::string, std::uint64_t>> kernel_launches() {
  const std::lock_guard<std::mutex> lock(detail::kernels_mutex());
  std::vector<std::pair<std::string, std::uint64_t>> out;
  for (const auto& entry : detail::g_kernels) out.emplace_back(entry.second.name, entry.second.launches);
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::pair<std::string, std::uint64_t>> kernel_smem() {
  const std::lock_guard<std::mutex> lock(detail::kernels_mutex());
  std::vector<std::pair<std::string, std::uint64_t>> out;
  for (const auto& entry : detail::g_kernels) {
    if (entry.second.launches > 0) out.emplace_back(entry.second.name, entry.second.last_smem);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<BankCounts> kernel_bank_traffic() {
  const std::lock_guard<std::mutex> lock(detail::kernels_mutex());
  std::vector<BankCounts> out;
  for (const auto& entry : detail::g_kernels) {
    const detail::KernelInfo& k = entry.second;
    if (k.wmma_requests > 0) out.push_back(BankCounts{k.name, k.wmma_requests, k.wmma_wavefronts, k.wmma_ideal});
  }
  std::sort(out.begin(), out.end(), [](const BankCounts& a, const BankCounts& b) { return a.name < b.name; });
  return out;
}

std::string last_error_detail() {
  if (sticky() != cudaSuccess) {
    const std::lock_guard<std::mutex> lock(detail::g_sticky_m);
    return detail::g_sticky_detail;
  }
  return detail::t_detail;
}

// ------------------------------------------------ CUDA runtime API subset ----
cudaError_t get_last_error() {
  cudaError_t s;
  if (is_sticky(&s)) return s;
  const cudaError_t e = t_last;
  t_last = cudaSuccess;
  return e;
}

cudaError_t peek_at_last_error() {
  const cudaError_t s = sticky();
  return s != cudaSuccess ? s : t_last;
}

const char* get_error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaErrorUnknown";
  }
}

const char* get_error_string(cudaError_t e) {
  const char* base = nullptr;
  switch (e) {
    case cudaSuccess: base = "no error"; break;
    case cudaErrorInvalidValue: base = "invalid argument"; break;
    case cudaErrorMemoryAllocation: base = "out of memory"; break;
    case cudaErrorInvalidConfiguration: base = "invalid configuration argument"; break;
    case cudaErrorInvalidDevice: base = "invalid device ordinal"; break;
    case cudaErrorInvalidDeviceFunction: base = "invalid device function"; break;
    case cudaErrorLaunchOutOfResources: base = "too many resources requested for launch"; break;
    case cudaErrorLaunchFailure: base = "unspecified launch failure"; break;
    case cudaErrorNotSupported: base = "operation not supported"; break;
    default: base = "unrecognized error code"; break;
  }
  std::string detail;
  if (e != cudaSuccess && e == sticky()) {
    const std::lock_guard<std::mutex> lock(g_sticky_m);
    detail = g_sticky_detail;
  } else if (e != cudaSuccess && e == t_detail_code) {
    detail = t_detail;
  }
  if (detail.empty()) return base;
  // A few buffers, so that several strings can be used in one expression.
  thread_local std::string ring[8];
  thread_local unsigned next = 0;
  std::string& out = ring[next++ % 8];
  out = std::string(base) + " [emulator: " + detail + "]";
  return out.c_str();
}

cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  cudaError_t s;
  if (is_sticky(&s)) return s;
  if (kernel == nullptr) {
    set_error(cudaErrorInvalidDeviceFunction, "cudaFuncSetAttribute: null kernel");
    return cudaErrorInvalidDeviceFunction;
  }
  const Profile& p = profile();
  const std::lock_guard<std::mutex> lock(detail::kernels_mutex());
  detail::KernelInfo& k = detail::kernel_info(kernel, nullptr);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    const long long limit = static_cast<long long>(p.smem_optin) - static_cast<long long>(k.static_bytes);
    if (value < 0 || value > limit) {
      set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute(" + k.name + ", MaxDynamicSharedMemorySize, " +
                                           std::to_string(value) + "): above the " + std::to_string(limit) +
                                           " bytes of dynamic shared memory " + p.arch + " (" + p.card +
                                           ") allows this kernel");
      return cudaErrorInvalidValue;
    }
    k.max_dynamic = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) {
    if (value < -1 || value > 100) {
      set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: a carveout must be -1 or 0..100");
      return cudaErrorInvalidValue;
    }
    return cudaSuccess;
  }
  set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: attribute " + std::to_string(static_cast<int>(attr)) +
                                       " is not emulated");
  return cudaErrorInvalidValue;
}

cudaError_t occupancy_max_active_blocks(int* num_blocks, const void* kernel, int block_size,
                                        std::size_t dynamic_smem) {
  cudaError_t s;
  if (is_sticky(&s)) return s;
  if (num_blocks == nullptr) {
    set_error(cudaErrorInvalidValue, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: null numBlocks pointer");
    return cudaErrorInvalidValue;
  }
  if (kernel == nullptr) {
    set_error(cudaErrorInvalidDeviceFunction, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: null kernel");
    return cudaErrorInvalidDeviceFunction;
  }
  const Profile& p = profile();
  if (block_size <= 0 || block_size > p.max_threads_per_block) {
    set_error(cudaErrorInvalidValue, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: block size " +
                                         std::to_string(block_size) + " outside 1.." +
                                         std::to_string(p.max_threads_per_block));
    return cudaErrorInvalidValue;
  }
  const std::lock_guard<std::mutex> lock(detail::kernels_mutex());
  const detail::KernelInfo& k = detail::kernel_info(kernel, nullptr);
  const std::size_t dyn_limit =
      k.max_dynamic >= 0 ? static_cast<std::size_t>(k.max_dynamic)
                         : static_cast<std::size_t>(p.smem_per_block) - std::min<std::size_t>(k.static_bytes, p.smem_per_block);
  if (dynamic_smem > dyn_limit) {
    *num_blocks = 0;
    return cudaSuccess;
  }
  const int warps = (block_size + 31) / 32;
  const std::size_t per_block = dynamic_smem + k.static_bytes + 1024;
  const long long by_smem = static_cast<long long>(p.smem_per_sm) / static_cast<long long>(per_block);
  const long long by_threads = p.threads_per_sm / (32 * warps);
  *num_blocks = static_cast<int>(std::min<long long>({by_smem, by_threads, p.blocks_per_sm}));
  return cudaSuccess;
}

cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  cudaError_t s;
  if (is_sticky(&s)) return s;
  if (device != 0) {
    set_error(cudaErrorInvalidDevice, "the emulator has one device, 0; asked for " + std::to_string(device));
    return cudaErrorInvalidDevice;
  }
  if (value == nullptr) {
    set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: null value pointer");
    return cudaErrorInvalidValue;
  }
  const Profile& p = profile();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = p.sm_count; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = p.smem_optin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = p.smem_per_block; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = p.smem_per_sm; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = p.max_threads_per_block; break;
    case cudaDevAttrMaxBlockDimX: *value = p.max_block_dim[0]; break;
    case cudaDevAttrMaxBlockDimY: *value = p.max_block_dim[1]; break;
    case cudaDevAttrMaxBlockDimZ: *value = p.max_block_dim[2]; break;
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(p.max_grid_dim[0]); break;
    case cudaDevAttrMaxGridDimY: *value = static_cast<int>(p.max_grid_dim[1]); break;
    case cudaDevAttrMaxGridDimZ: *value = static_cast<int>(p.max_grid_dim[2]); break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrComputeCapabilityMajor: *value = p.cc_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = p.cc_minor; break;
    default:
      set_error(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " +
                                           std::to_string(static_cast<int>(attr)) + " is not emulated");
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t get_device(int* device) {
  cudaError_t s;
  if (is_sticky(&s)) return s;
  if (device == nullptr) {
    set_error(cudaErrorInvalidValue, "cudaGetDevice: null pointer");
    return cudaErrorInvalidValue;
  }
  *device = 0;
  return cudaSuccess;
}

cudaError_t set_device(int device) {
  cudaError_t s;
  if (is_sticky(&s)) return s;
  if (device != 0) {
    set_error(cudaErrorInvalidDevice, "the emulator has one device, 0; asked for " + std::to_string(device));
    return cudaErrorInvalidDevice;
  }
  return cudaSuccess;
}

cudaError_t get_device_count(int* count) {
  if (count == nullptr) return cudaErrorInvalidValue;
  *count = 1;
  return cudaSuccess;
}

// Launches run to completion before they return: there is nothing to wait for.
cudaError_t device_synchronize() { return sticky(); }
cudaError_t stream_synchronize(cudaStream_t) { return sticky(); }

cudaError_t device_reset() {
  reset();
  return cudaSuccess;
}

}  // namespace nystrom::emu
