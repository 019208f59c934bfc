// Host side of the CUDA emulation: the few CUDA runtime calls the launchers
// and the glue make, kernel launches, and the emulator's own controls
// (schedule, target profile, poisoning). Torch-free.
//
// The types are CUDA's own (cuda_runtime.h: cudaError_t, cudaStream_t,
// dim3, the attribute enums), so emulated and real builds agree on every
// value. The functions are the emulator's, in namespace nystrom::emu under
// names of their own, and the macros at the end map the CUDA names onto them
// in a translation unit that includes this header. Nothing is defined under
// a CUDA symbol name: a process that also loads libcudart (torch's CUDA
// wheel does) sees no clash.
//
// Errors follow the real runtime. A launch that breaks a limit of the target
// profile does not run and leaves its error for cudaGetLastError (which
// returns and clears it) and cudaPeekAtLastError (which returns it). A fault
// found while a kernel runs (barrier or warp divergence, a misused WMMA
// fragment, a write past the end of shared memory) is a sticky
// cudaErrorLaunchFailure: every later call returns it until
// cudaDeviceReset() (or nystrom::emu::reset()). cudaGetErrorString appends
// the emulator's account of the most recent error of that code (kernel,
// launch site, block, source site) to the runtime's text.
#pragma once

// All of cuda_runtime.h (not only cuda_runtime_api.h) before the macros
// below: a later include of it is then a no-op instead of a clash.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace nystrom::emu {

// ------------------------------------------------------------ schedules ----
/// The order in which the runnable threads of a block run between barriers.
enum class Order { kInOrder, kReversed, kRandom };

struct Schedule {
  Order order = Order::kInOrder;
  std::uint64_t seed = 0;  // kRandom: the permutation of every phase of every block follows from it
  /// "inorder", "reversed" or "random:SEED".
  std::string str() const;
};

/// Parses "inorder", "reversed", "random:SEED" (decimal) or "random" (seed 1).
bool parse_schedule(const std::string& text, Schedule* out);

/// The schedule of every launch from now on. The process starts with
/// NYSTROM_EMU_SCHEDULE (default inorder).
Schedule schedule();
void set_schedule(const Schedule& s);

/// inorder, reversed and random:1: the three every race test runs under.
std::vector<Schedule> standard_schedules();

// ---------------------------------------------------------- the target ----
/// Limits of a real GPU that launches are checked against.
struct Profile {
  const char* arch;         // "sm90", ...
  const char* card;         // the card modelled
  int cc_major, cc_minor;
  int sm_count;
  int max_threads_per_block;
  int max_block_dim[3];
  long long max_grid_dim[3];
  int smem_per_block;       // static + default dynamic: 48 KiB
  int smem_optin;           // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int smem_per_sm;
  int threads_per_sm;       // resident threads per SM (the occupancy calculator's limits)
  int blocks_per_sm;        // resident blocks per SM
};

/// The profile launches are checked against. The process starts with
/// NYSTROM_EMU_ARCH (default sm90).
const Profile& profile();
/// sm90 (H100 SXM / H200), sm80 (A100 SXM), sm86 (RTX A6000), sm89 (L40S).
/// False (and nothing changes) for an unknown name.
bool set_arch(const std::string& arch);
const std::vector<Profile>& profiles();

/// OS threads that run the blocks of one launch (NYSTROM_EMU_THREADS,
/// default 1). Every block runs on one thread under its own schedule, so
/// results do not depend on it unless blocks race on global memory.
int threads();
void set_threads(int n);

// ---------------------------------------------------------- utilities ----
/// Fills `bytes` bytes at p with 0xFF (a NaN in every floating type), as the
/// emulator does with shared memory before every block: call it on output
/// buffers so that an element no thread writes shows.
void poison(void* p, std::size_t bytes);

/// The emulator's account of this thread's most recent error (empty if none).
std::string last_error_detail();

/// Clears the sticky error, the last error and the kernels' attributes
/// (what cudaDeviceReset does to a real context).
void reset();

/// For a source not yet behind the seams, compiled with `__shared__` defined
/// as GNU `__thread`: its `extern __shared__ unsigned char smem_raw[]` is then
/// a thread-local array the test defines, and `buffer()` (called on each OS
/// thread that runs blocks) returns it. Every block's dynamic shared memory
/// is that buffer, poisoned and guarded as usual; `capacity` is its size.
/// Null restores the emulator's own buffers. (A static `__shared__` array
/// compiled this way becomes per-thread: such kernels must not run.)
void set_dynamic_shared_buffer(unsigned char* (*buffer)(), std::size_t capacity);

struct Stats {
  std::uint64_t launches = 0;  // launches that ran
  std::uint64_t blocks = 0;    // blocks that ran
  std::uint64_t switches = 0;  // fiber switches
};
Stats stats();

/// Every kernel launched in this process (demangled name, as in error
/// messages) and how many of its launches ran: which kernels a test run
/// reached. Kept across reset().
std::vector<std::pair<std::string, std::uint64_t>> kernel_launches();
/// The dynamic shared memory (bytes) of the last launch that ran of every
/// kernel launched so far: what a launcher chose for the problem.
std::vector<std::pair<std::string, std::uint64_t>> kernel_smem();
/// Per kernel with WMMA shared-memory traffic so far: its instructions, the
/// wavefronts they took and the conflict-free ideal (the model of cuda/emu/wmma.h).
struct BankCounts {
  std::string name;
  std::uint64_t requests, wavefronts, ideal;
};
std::vector<BankCounts> kernel_bank_traffic();

// --------------------------------------------- CUDA runtime API subset ----
cudaError_t get_last_error();
cudaError_t peek_at_last_error();
const char* get_error_string(cudaError_t e);
const char* get_error_name(cudaError_t e);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
template <class... P>
cudaError_t func_set_attribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
/// cudaOccupancyMaxActiveBlocksPerMultiprocessor: the resident blocks per SM
/// of `kernel` at `block_size` threads and `dynamic_smem` bytes, by the
/// profile's threads, blocks and shared memory per SM (each block reserving
/// 1 KiB, its static shared memory as seen in its launches so far). Registers
/// are not modelled (only the compiler knows them): on a GPU the count can be
/// lower. 0 when the dynamic shared memory is above what the kernel has been
/// opted in to (cudaFuncSetAttribute) or the profile's per-block limit.
cudaError_t occupancy_max_active_blocks(int* num_blocks, const void* kernel, int block_size, std::size_t dynamic_smem);
template <class... P>
cudaError_t occupancy_max_active_blocks(int* num_blocks, void (*kernel)(P...), int block_size,
                                        std::size_t dynamic_smem) {
  return occupancy_max_active_blocks(num_blocks, reinterpret_cast<const void*>(kernel), block_size, dynamic_smem);
}
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t get_device(int* device);
cudaError_t set_device(int device);
cudaError_t get_device_count(int* count);
cudaError_t device_synchronize();
cudaError_t stream_synchronize(cudaStream_t stream);
cudaError_t device_reset();

// ----------------------------------------------------------- launches ----
namespace detail {
struct LaunchSpec {
  const void* kernel;     // identity of the kernel (attributes, name)
  const char* expr;       // the kernel expression as written at the launch
  const char* file;       // launch site
  int line;
  dim3 grid, block;
  std::size_t smem;
  cudaStream_t stream;
  void (*run)(const void* bound);  // runs the kernel body for the current thread
  const void* bound;
};
/// Checks the configuration, runs the blocks, records the error (if any).
void launch(const LaunchSpec& spec);

template <class... P>
struct Bound {
  void (*kernel)(P...);
  std::tuple<P...> args;
};
template <class... P>
void run_bound(const void* b) {
  const auto* x = static_cast<const Bound<P...>*>(b);
  std::apply(x->kernel, x->args);  // every thread gets its own copy of the arguments
}
}  // namespace detail

/// `launcher(k, ...)(args...)` is the emulated `k<<<grid, block, smem, stream>>>(args...)`;
/// NYSTROM_LAUNCH (cuda/emu/seams.h) writes it. The arguments convert to the
/// kernel's parameter types as they do for a real launch, and are copied once
/// per launch (a kernel parameter is per thread: each thread copies again).
template <class... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), const char* expr, const char* file, int line, dim3 grid, dim3 block,
         std::size_t smem, cudaStream_t stream)
      : kernel_(kernel), expr_(expr), file_(file), line_(line), grid_(grid), block_(block), smem_(smem),
        stream_(stream) {}

  template <class... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    static_assert((std::is_trivially_copyable<P>::value && ...),
                  "kernel parameters must be trivially copyable (as CUDA requires)");
    const detail::Bound<P...> bound{kernel_, std::tuple<P...>(std::forward<A>(args)...)};
    detail::launch(detail::LaunchSpec{reinterpret_cast<const void*>(kernel_), expr_, file_, line_, grid_, block_,
                                      smem_, stream_, &detail::run_bound<P...>, &bound});
  }

 private:
  void (*kernel_)(P...);
  const char* expr_;
  const char* file_;
  int line_;
  dim3 grid_, block_;
  std::size_t smem_;
  cudaStream_t stream_;
};

template <class... P>
Launch<P...> launcher(void (*kernel)(P...), const char* expr, const char* file, int line, dim3 grid, dim3 block,
                      std::size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launch<P...>(kernel, expr, file, line, grid, block, smem, stream);
}

}  // namespace nystrom::emu

// The CUDA names used by the launchers and the glue, mapped onto the emulator.
#define cudaGetLastError ::nystrom::emu::get_last_error
#define cudaPeekAtLastError ::nystrom::emu::peek_at_last_error
#define cudaGetErrorString ::nystrom::emu::get_error_string
#define cudaGetErrorName ::nystrom::emu::get_error_name
#define cudaFuncSetAttribute ::nystrom::emu::func_set_attribute
#define cudaDeviceGetAttribute ::nystrom::emu::device_get_attribute
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor ::nystrom::emu::occupancy_max_active_blocks
#define cudaGetDevice ::nystrom::emu::get_device
#define cudaSetDevice ::nystrom::emu::set_device
#define cudaGetDeviceCount ::nystrom::emu::get_device_count
#define cudaDeviceSynchronize ::nystrom::emu::device_synchronize
#define cudaStreamSynchronize ::nystrom::emu::stream_synchronize
#define cudaDeviceReset ::nystrom::emu::device_reset
