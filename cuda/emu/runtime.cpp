// Host side of the CUDA emulation (see runtime.h): configuration (schedule,
// target profile, threads), launch checks, and the OS threads that run the
// blocks of a launch. The CUDA runtime calls and the error state: cuda_api.cpp.
#include "runtime.h"

#include "executor.h"
#include "host_state.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

namespace nystrom::emu {
namespace {

const std::vector<Profile> kProfiles = {
    {"sm90", "NVIDIA H100 SXM / H200", 9, 0, 132, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152,
     232448, 233472, 2048, 32},
    {"sm80", "NVIDIA A100 SXM", 8, 0, 108, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152, 166912,
     167936, 2048, 32},
    {"sm86", "NVIDIA RTX A6000", 8, 6, 84, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152, 101376,
     102400, 1536, 16},
    {"sm89", "NVIDIA L40S", 8, 9, 142, 1024, {1024, 1024, 64}, {2147483647LL, 65535, 65535}, 49152, 101376, 102400,
     1536, 24},
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

void reset() {
  detail::clear_errors();
  detail::reset_kernel_attributes();
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
  BankTraffic traffic;
  job.traffic = &traffic;
  job.serial = ++g_serial;
  job.spec = &spec;
  job.schedule = schedule();
  job.profile = profile();
  std::size_t static_known = 0;
  {
    const std::lock_guard<std::mutex> lock(kernels_mutex());
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
    const std::lock_guard<std::mutex> lock(kernels_mutex());
    KernelInfo& k = kernel_info(spec.kernel, spec.expr);
    k.static_bytes = std::max(k.static_bytes, run.static_max);
    ++k.launches;
    k.last_smem = spec.smem;
    k.wmma_requests += traffic.requests.load();
    k.wmma_wavefronts += traffic.wavefronts.load();
    k.wmma_ideal += traffic.ideal.load();
  }
  if (run.fault_block < 0) return;
  if (run.fault.sticky) set_sticky(run.fault.code, run.fault.message);
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
