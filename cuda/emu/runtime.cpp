// Host side of the CUDA emulation (see runtime.h): configuration, the error
// state, kernel attributes, launch checks, and the OS threads that run the
// blocks of a launch.
#include "runtime.h"

#include "executor.h"

#include <cxxabi.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace nystrom::emu {
namespace {

const std::vector<Profile> kProfiles = {
    {"sm90", "NVIDIA H100 SXM / H200", 9, 0, 132, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152,
     232448, 233472},
    {"sm80", "NVIDIA A100 SXM", 8, 0, 108, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152, 166912,
     167936},
    {"sm86", "NVIDIA RTX A6000", 8, 6, 84, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152, 101376,
     102400},
    {"sm89", "NVIDIA L40S", 8, 9, 142, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152, 101376, 102400},
};

// ------------------------------------------------------- configuration ----
struct Config {
  std::mutex m;
  Schedule schedule;
  std::size_t profile = 0;
  int threads = 1;
  std::size_t stack_bytes = 256 * 1024;
};

[[noreturn]] void bad_env(const char* name, const char* value, const char* expected) {
  std::fprintf(stderr, "nystrom emu: %s=%s is not valid; expected %s\n", name, value, expected);
  std::abort();
}

int find_profile(const std::string& arch) {
  for (std::size_t i = 0; i < kProfiles.size(); ++i) {
    if (arch == kProfiles[i].arch) return static_cast<int>(i);
  }
  return -1;
}

Config& config() {
  static Config* c = [] {
    auto* cfg = new Config;  // never destroyed: worker threads may outlive static destruction
    if (const char* s = std::getenv("NYSTROM_EMU_SCHEDULE"); s != nullptr && *s != '\0') {
      if (!parse_schedule(s, &cfg->schedule)) bad_env("NYSTROM_EMU_SCHEDULE", s, "inorder, reversed or random:SEED");
    }
    if (const char* s = std::getenv("NYSTROM_EMU_ARCH"); s != nullptr && *s != '\0') {
      const int i = find_profile(s);
      if (i < 0) bad_env("NYSTROM_EMU_ARCH", s, "sm90, sm80, sm86 or sm89");
      cfg->profile = static_cast<std::size_t>(i);
    }
    if (const char* s = std::getenv("NYSTROM_EMU_THREADS"); s != nullptr && *s != '\0') {
      char* end = nullptr;
      const long n = std::strtol(s, &end, 10);
      if (*end != '\0' || n < 1 || n > 64) bad_env("NYSTROM_EMU_THREADS", s, "a number of threads from 1 to 64");
      cfg->threads = static_cast<int>(n);
    }
    if (const char* s = std::getenv("NYSTROM_EMU_STACK_KIB"); s != nullptr && *s != '\0') {
      char* end = nullptr;
      const long n = std::strtol(s, &end, 10);
      if (*end != '\0' || n < 16 || n > 65536) bad_env("NYSTROM_EMU_STACK_KIB", s, "a stack size from 16 to 65536");
      cfg->stack_bytes = static_cast<std::size_t>(n) * 1024;
    }
    return cfg;
  }();
  return *c;
}

// --------------------------------------------------------- error state ----
// The last error is per host thread (as in the real runtime); the sticky
// error belongs to the (one, emulated) device.
thread_local cudaError_t t_last = cudaSuccess;
thread_local cudaError_t t_detail_code = cudaSuccess;
thread_local std::string t_detail;
std::atomic<int> g_sticky{cudaSuccess};
std::mutex g_sticky_m;
std::string g_sticky_detail;

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

// ------------------------------------------------------------ kernels ----
struct KernelInfo {
  std::string name;
  bool named = false;            // from the symbol table or the launch expression
  int max_dynamic = -1;          // cudaFuncAttributeMaxDynamicSharedMemorySize, -1: never set
  std::size_t static_bytes = 0;  // static shared memory seen in its launches
};
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

KernelInfo& kernel_info(const void* kernel, const char* expr) {  // g_kernels_m held
  KernelInfo& k = g_kernels[kernel];
  if (!k.named) {
    k.name = resolve_name(kernel, expr, &k.named);
  }
  return k;
}

// ------------------------------------------------------------ workers ----
struct Stat {
  std::atomic<std::uint64_t> launches{0}, blocks{0}, switches{0};
};
Stat g_stats;
std::atomic<std::uint64_t> g_serial{0};

struct BlockRun {
  std::atomic<long long> next{0};
  std::atomic<bool> stop{false};
  std::mutex m;
  long long fault_block = -1;  // the lowest failing block: the same whatever the thread count
  detail::Fault fault;
  std::size_t static_max = 0;
};

void work(const detail::Job& job, BlockRun& run) {
  detail::Executor& ex = detail::this_thread_executor();
  const std::uint64_t switches0 = ex.switches();
  std::uint64_t done = 0;
  while (!run.stop.load(std::memory_order_relaxed)) {
    const long long b = run.next.fetch_add(1);
    if (b >= job.blocks) break;
    detail::Fault f;
    ++done;
    if (!ex.run_block(job, b, &f)) {
      const std::lock_guard<std::mutex> lock(run.m);
      if (run.fault_block < 0 || b < run.fault_block) {
        run.fault_block = b;
        run.fault = std::move(f);
      }
      run.stop = true;
    }
  }
  g_stats.blocks += done;
  g_stats.switches += ex.switches() - switches0;
  const std::lock_guard<std::mutex> lock(run.m);
  run.static_max = std::max(run.static_max, ex.static_smem_seen());
}

// Threads that join the launching thread in running a launch's blocks.
class Pool {
 public:
  void run(const detail::Job& job, BlockRun& run, int helpers) {
    std::unique_lock<std::mutex> lock(m_);
    while (static_cast<int>(workers_.size()) < helpers) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
      workers_.back().detach();
    }
    job_ = &job;
    run_ = &run;
    active_ = helpers;
    pending_ = static_cast<int>(workers_.size());
    ++generation_;
    lock.unlock();
    wake_.notify_all();
    work(job, run);
    lock.lock();
    done_.wait(lock, [this] { return pending_ == 0; });
    job_ = nullptr;
    run_ = nullptr;
  }

 private:
  void loop(int index) {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(m_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index < active_) {
        const detail::Job* job = job_;
        BlockRun* run = run_;
        lock.unlock();
        work(*job, *run);
        lock.lock();
      }
      if (--pending_ == 0) done_.notify_all();
    }
  }

  std::mutex m_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const detail::Job* job_ = nullptr;
  BlockRun* run_ = nullptr;
  int active_ = 0, pending_ = 0;
  std::uint64_t generation_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: its threads wait until the process ends
  return *p;
}

std::mutex g_launch_m;  // one launch at a time: the emulated device has one queue

std::string dims(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// The configuration check the driver makes; an empty string when it passes.
std::string check_config(const detail::LaunchSpec& s, const Profile& p, cudaError_t* code) {
  const long long threads = static_cast<long long>(s.block.x) * s.block.y * s.block.z;
  const unsigned bd[3] = {s.block.x, s.block.y, s.block.z};
  const unsigned gd[3] = {s.grid.x, s.grid.y, s.grid.z};
  *code = cudaErrorInvalidConfiguration;
  for (int i = 0; i < 3; ++i) {
    if (bd[i] == 0 || bd[i] > static_cast<unsigned>(p.max_block_dim[i])) {
      return "block " + dims(s.block) + ": dimension " + std::to_string(i) + " must be 1.." +
             std::to_string(p.max_block_dim[i]);
    }
    if (gd[i] == 0 || gd[i] > p.max_grid_dim[i]) {
      return "grid " + dims(s.grid) + ": dimension " + std::to_string(i) + " must be 1.." +
             std::to_string(p.max_grid_dim[i]);
    }
  }
  if (threads > p.max_threads_per_block) {
    return "block " + dims(s.block) + " has " + std::to_string(threads) + " threads, more than " +
           std::to_string(p.max_threads_per_block);
  }
  return {};
}

}  // namespace

// ------------------------------------------------------------ schedules ----
std::string Schedule::str() const {
  switch (order) {
    case Order::kInOrder: return "inorder";
    case Order::kReversed: return "reversed";
    case Order::kRandom: return "random:" + std::to_string(seed);
  }
  return "?";
}

bool parse_schedule(const std::string& text, Schedule* out) {
  if (text == "inorder") {
    *out = Schedule{Order::kInOrder, 0};
  } else if (text == "reversed") {
    *out = Schedule{Order::kReversed, 0};
  } else if (text == "random") {
    *out = Schedule{Order::kRandom, 1};
  } else if (text.rfind("random:", 0) == 0 && text.size() > 7 &&
             text.find_first_not_of("0123456789", 7) == std::string::npos && text.size() <= 7 + 19) {
    *out = Schedule{Order::kRandom, std::stoull(text.substr(7))};
  } else {
    return false;
  }
  return true;
}

Schedule schedule() {
  Config& c = config();
  const std::lock_guard<std::mutex> lock(c.m);
  return c.schedule;
}

void set_schedule(const Schedule& s) {
  Config& c = config();
  const std::lock_guard<std::mutex> lock(c.m);
  c.schedule = s;
}

std::vector<Schedule> standard_schedules() {
  return {Schedule{Order::kInOrder, 0}, Schedule{Order::kReversed, 0}, Schedule{Order::kRandom, 1}};
}

// ------------------------------------------------------------- profiles ----
const Profile& profile() {
  Config& c = config();
  const std::lock_guard<std::mutex> lock(c.m);
  return kProfiles[c.profile];
}

bool set_arch(const std::string& arch) {
  const int i = find_profile(arch);
  if (i < 0) return false;
  Config& c = config();
  const std::lock_guard<std::mutex> lock(c.m);
  c.profile = static_cast<std::size_t>(i);
  return true;
}

const std::vector<Profile>& profiles() { return kProfiles; }

int threads() {
  Config& c = config();
  const std::lock_guard<std::mutex> lock(c.m);
  return c.threads;
}

void set_threads(int n) {
  Config& c = config();
  const std::lock_guard<std::mutex> lock(c.m);
  c.threads = std::clamp(n, 1, 64);
}

// ------------------------------------------------------------ utilities ----
void poison(void* p, std::size_t bytes) { std::memset(p, 0xFF, bytes); }

std::string last_error_detail() {
  if (sticky() != cudaSuccess) {
    const std::lock_guard<std::mutex> lock(g_sticky_m);
    return g_sticky_detail;
  }
  return t_detail;
}

void reset() {
  {
    const std::lock_guard<std::mutex> lock(g_sticky_m);
    g_sticky = cudaSuccess;
    g_sticky_detail.clear();
  }
  set_error(cudaSuccess, "");
  const std::lock_guard<std::mutex> lock(g_kernels_m);
  for (auto& k : g_kernels) k.second.max_dynamic = -1;
}

namespace {
std::atomic<unsigned char* (*)()> g_ext_buffer{nullptr};
std::atomic<std::size_t> g_ext_capacity{0};
}  // namespace

void set_dynamic_shared_buffer(unsigned char* (*buffer)(), std::size_t capacity) {
  g_ext_capacity = capacity;
  g_ext_buffer = buffer;
}

Stats stats() { return Stats{g_stats.launches.load(), g_stats.blocks.load(), g_stats.switches.load()}; }

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
  const std::lock_guard<std::mutex> lock(g_kernels_m);
  KernelInfo& k = kernel_info(kernel, nullptr);
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

// ------------------------------------------------------------ launches ----
namespace detail {

void launch(const LaunchSpec& spec) {
  if (tls.executor != nullptr) {
    fail(Site{spec.file, spec.line, "a kernel"}, "launches from device code (dynamic parallelism) are not emulated");
  }
  cudaError_t s;
  if (is_sticky(&s)) return;
  const std::lock_guard<std::mutex> launch_lock(g_launch_m);
  Job job;
  job.serial = ++g_serial;
  job.spec = &spec;
  job.schedule = schedule();
  job.profile = profile();
  std::size_t static_known = 0;
  {
    const std::lock_guard<std::mutex> lock(g_kernels_m);
    const KernelInfo& k = kernel_info(spec.kernel, spec.expr);
    job.kernel_name = k.name;
    job.max_dynamic_smem = k.max_dynamic;
    static_known = k.static_bytes;
  }
  const std::string at = "launch of " + job.kernel_name + " at " + spec.file + ":" + std::to_string(spec.line) + ": ";
  cudaError_t code = cudaSuccess;
  const std::string bad = check_config(spec, job.profile, &code);
  if (!bad.empty()) {
    set_error(code, at + bad + " on " + job.profile.arch);
    return;
  }
  const Profile& p = job.profile;
  const long long allowed = job.max_dynamic_smem >= 0 ? job.max_dynamic_smem
                                                      : static_cast<long long>(p.smem_per_block) -
                                                            static_cast<long long>(static_known);
  if (static_cast<long long>(spec.smem) > allowed) {
    set_error(cudaErrorInvalidValue,
              at + std::to_string(spec.smem) + " bytes of dynamic shared memory, above the kernel's limit of " +
                  std::to_string(allowed) +
                  (job.max_dynamic_smem >= 0 ? " (its cudaFuncAttributeMaxDynamicSharedMemorySize)"
                                             : " (48 KiB less its static shared memory, without "
                                               "cudaFuncAttributeMaxDynamicSharedMemorySize)"));
    return;
  }
  if (spec.smem + static_known > static_cast<std::size_t>(p.smem_optin)) {
    set_error(cudaErrorInvalidValue, at + std::to_string(spec.smem + static_known) +
                                         " bytes of shared memory per block, above the " +
                                         std::to_string(p.smem_optin) + " of " + p.arch + " (" + p.card + ")");
    return;
  }
  job.threads_per_block = static_cast<int>(spec.block.x * spec.block.y * spec.block.z);
  job.blocks = static_cast<long long>(spec.grid.x) * spec.grid.y * spec.grid.z;

  BlockRun run;
  const int helpers = static_cast<int>(std::min<long long>(threads(), job.blocks)) - 1;
  if (helpers > 0) {
    pool().run(job, run, helpers);
  } else {
    work(job, run);
  }
  ++g_stats.launches;
  {
    const std::lock_guard<std::mutex> lock(g_kernels_m);
    KernelInfo& k = kernel_info(spec.kernel, spec.expr);
    k.static_bytes = std::max(k.static_bytes, run.static_max);
  }
  if (run.fault_block < 0) return;
  if (run.fault.sticky) {
    const std::lock_guard<std::mutex> lock(g_sticky_m);
    if (sticky() == cudaSuccess) {
      g_sticky_detail = run.fault.message;
      g_sticky = run.fault.code;
    }
  }
  set_error(run.fault.code, run.fault.message);
}

Executor& this_thread_executor() {
  thread_local std::unique_ptr<Executor> ex;
  if (!ex) ex = std::make_unique<Executor>(fiber_stack_bytes());
  return *ex;
}

unsigned char* (*dynamic_shared_buffer(std::size_t* capacity))() {
  *capacity = g_ext_capacity.load();
  return g_ext_buffer.load();
}

std::size_t fiber_stack_bytes() {
  Config& c = config();
  const std::lock_guard<std::mutex> lock(c.m);
  return c.stack_bytes;
}

}  // namespace detail
}  // namespace nystrom::emu
