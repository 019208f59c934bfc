// The block executor of the CUDA emulation (see executor.h).
#include "executor.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#if NYSTROM_EMU_ASAN
#include <sanitizer/asan_interface.h>
#define NYSTROM_EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define NYSTROM_EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define NYSTROM_EMU_POISON(p, n) ((void)(p), (void)(n))
#define NYSTROM_EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace nystrom::emu::detail {

__thread ThreadState tls;

namespace {

constexpr unsigned char kPoison = 0xFF;      // NaN in every floating type
constexpr std::size_t kGuard = 64;           // poisoned bytes after every shared region
constexpr std::size_t kStaticLimit = 48 * 1024;  // what a kernel may declare statically
constexpr std::size_t kArena = kStaticLimit + 16 * 1024;  // + alignment and guards

std::size_t round_up(std::size_t x, std::size_t a) { return (x + a - 1) / a * a; }

std::uint64_t splitmix(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// "0-15, 17, 20-31"
std::string ranges(const std::vector<int>& ids) {
  std::string s;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ", ";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

// The last two components of a path: enough to find the file, short enough to read.
std::string short_path(const char* file) {
  const char* end = file + std::strlen(file);
  const char* p = end;
  int slashes = 0;
  while (p > file) {
    if (p[-1] == '/' && ++slashes == 2) break;
    --p;
  }
  return std::string(p, end);
}

Executor& current(const char* what) {
  if (tls.executor == nullptr) outside_kernel(what);
  return *static_cast<Executor*>(tls.executor);
}

}  // namespace

const char* op_name(Op op) {
  switch (op) {
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kSyncwarp: return "__syncwarp";
    case Op::kWmmaFill: return "wmma::fill_fragment";
    case Op::kWmmaLoad: return "wmma::load_matrix_sync";
    case Op::kWmmaMma: return "wmma::mma_sync";
    case Op::kWmmaStore: return "wmma::store_matrix_sync";
  }
  return "warp collective";
}

void outside_kernel(const char* what) {
  std::fprintf(stderr, "nystrom emu: %s used outside a kernel launch\n", what);
  std::abort();
}

Executor::Executor(std::size_t stack_bytes) : stacks_(stack_bytes) {
  adopt_thread(main_);
  static_arena_ = static_cast<unsigned char*>(std::aligned_alloc(128, kArena));
  if (static_arena_ == nullptr) throw std::bad_alloc();
}

Executor::~Executor() {
  NYSTROM_EMU_UNPOISON(static_arena_, kArena);
  std::free(static_arena_);
  if (dyn_ != nullptr && dyn_ != own_) NYSTROM_EMU_UNPOISON(dyn_, dyn_cap_);  // an external buffer
  if (own_ != nullptr) {
    NYSTROM_EMU_UNPOISON(own_, own_cap_);
    std::free(own_);
  }
}

std::string Executor::where(const Site& s) const {
  return short_path(s.file) + ":" + std::to_string(s.line) + " (in " + s.func + ")";
}

void Executor::enter(Fiber* f) {
  current_ = f;
  tls.thread_idx = f->tid;
}

void Executor::record(const Site* site, const std::string& what, cudaError_t code, bool sticky) {
  if (faulted_) return;  // the first fault of a block is the one reported
  faulted_ = true;
  fault_.code = code;
  fault_.sticky = sticky;
  const LaunchSpec& spec = *job_->spec;
  fault_.message = job_->kernel_name + " (launched at " + short_path(spec.file) + ":" + std::to_string(spec.line) +
                   "), block (" + std::to_string(bid_.x) + "," + std::to_string(bid_.y) + "," +
                   std::to_string(bid_.z) + ")";
  if (current_ != nullptr) fault_.message += ", thread " + std::to_string(current_->linear);
  fault_.message += ": " + what;
  if (site != nullptr) fault_.message += " [at " + where(*site) + "]";
}

namespace {
// Thrown by fail() and caught at the bottom of the fiber's stack, so that
// what the failing thread's frames own (the message strings, say) is freed.
struct Abandon {};
}  // namespace

void Executor::fail(const Site* site, const std::string& what, cudaError_t code, bool sticky) {
  record(site, what, code, sticky);
  throw Abandon{};
}

void Executor::fiber_main() {
  on_fiber_start();
  auto* ex = static_cast<Executor*>(tls.executor);
  bool abandoned = false;
  try {
    ex->job_->spec->run(ex->job_->spec->bound);
  } catch (const Abandon&) {
    abandoned = true;
  }
  if (abandoned) {
    // The block is abandoned: no fiber of it runs again.
    Fiber* self = ex->current_;
    ex->current_ = nullptr;
    ++ex->switches_;
    finish_and_jump(self->ctx, ex->main_);
  }
  ex->exit_current();
}

void Executor::exit_current() {
  Fiber* self = current_;
  if (!self->async.empty()) {
    const AsyncCopy& c = self->async.front();
    record(&c.site, std::to_string(self->async.size()) +
                        " asynchronous copies (__pipeline_memcpy_async) were never waited for: the thread returns "
                        "before a __pipeline_wait_prior covers their batch (data loaded and never used)");
  }
  self->state = State::kExited;
  ++exited_;
  Warp& w = warps_[static_cast<std::size_t>(self->warp)];
  if (++w.exited == w.size) {
    const std::string bad = compare_fragment_ops(self->warp);
    if (!bad.empty()) record(nullptr, bad);  // then next_runnable() ends the block
  }
  Fiber* next = next_runnable();
  if (next != nullptr) {
    enter(next);
  } else {
    current_ = nullptr;
  }
  ++switches_;
  finish_and_jump(self->ctx, next != nullptr ? next->ctx : main_);
}

void Executor::suspend(Fiber* self) {
  Fiber* next = next_runnable();
  if (next == self) return;
  if (next != nullptr) {
    enter(next);
  } else {
    current_ = nullptr;
  }
  ++switches_;
  jump(self->ctx, next != nullptr ? next->ctx : main_);
}

Executor::Fiber* Executor::next_runnable() {
  if (faulted_) return nullptr;
  if (pos_ >= phase_.size()) {
    Fiber* self = current_;
    current_ = nullptr;  // resolve() records faults without jumping
    const bool more = resolve();
    current_ = self;
    if (!more) return nullptr;
  }
  return &fibers_[static_cast<std::size_t>(phase_[pos_++])];
}

void Executor::order_phase() {
  switch (job_->schedule.order) {
    case Order::kInOrder: break;
    case Order::kReversed: std::reverse(phase_.begin(), phase_.end()); break;
    case Order::kRandom:
      for (std::size_t i = phase_.size(); i > 1; --i) {
        std::swap(phase_[i - 1], phase_[static_cast<std::size_t>(splitmix(rng_) % i)]);
      }
      break;
  }
}

std::string Executor::describe_others(int warp_index) const {
  std::vector<int> exited, at_barrier;
  for (int l = 0; l < warps_[static_cast<std::size_t>(warp_index)].size; ++l) {
    const Fiber& f = fibers_[static_cast<std::size_t>(warp_index * 32 + l)];
    if (f.state == State::kExited) exited.push_back(l);
    if (f.state == State::kAtBlockBarrier) at_barrier.push_back(l);
  }
  std::string s;
  if (!exited.empty()) s += "lanes " + ranges(exited) + " have returned";
  if (!at_barrier.empty()) {
    if (!s.empty()) s += "; ";
    s += "lanes " + ranges(at_barrier) + " wait at __syncthreads " + where(barrier_site_);
  }
  return s;
}

std::string Executor::compare_fragment_ops(int warp_index) {
  Warp& w = warps_[static_cast<std::size_t>(warp_index)];
  if (!w.fragment_ops) return {};
  Fiber* lanes = &fibers_[static_cast<std::size_t>(warp_index) * 32];
  const std::vector<FragmentOp>& ref = lanes[0].fragment_ops;
  auto describe = [this](const FragmentOp& f) { return std::string(op_name(f.op)) + " " + where(f.site); };
  for (int l = 1; l < w.size; ++l) {
    const std::vector<FragmentOp>& mine = lanes[l].fragment_ops;
    for (std::size_t i = 0; i < std::max(ref.size(), mine.size()); ++i) {
      const std::string who = "warp " + std::to_string(warp_index) + ", lane " + std::to_string(l) + ": ";
      if (i >= ref.size() || i >= mine.size()) {
        const bool lane0 = i < ref.size();
        return "divergent WMMA: " + who + "lane " + (lane0 ? "0" : std::to_string(l)) + " calls " +
               describe(lane0 ? ref[i] : mine[i]) + ", lane " + (lane0 ? std::to_string(l) : "0") +
               " does not (fragment operations must be reached by all 32 lanes)";
      }
      const FragmentOp &a = ref[i], &b = mine[i];
      if (a.op != b.op || !same_site(a.site, b.site)) {
        return "divergent WMMA: " + who + "lane 0 calls " + describe(a) + " where lane " + std::to_string(l) +
               " calls " + describe(b);
      }
      if (a.mem != b.mem || a.ldm != b.ldm || a.layout != b.layout || a.value != b.value) {
        return describe(a) + ": " + who + std::string(a.op == Op::kWmmaFill ? "fills another value" :
                                                                              "passes a different pointer, ldm or layout") +
               " than lane 0 (the operands of a WMMA operation must be the same in every lane)";
      }
    }
  }
  for (int l = 0; l < w.size; ++l) lanes[l].fragment_ops.clear();
  w.fragment_ops = false;
  return {};
}

bool Executor::resolve() {
  phase_.clear();
  pos_ = 0;
  // Warps whose collective is complete: all of them go on under the in-order
  // schedule; one alone under the others (the highest-numbered, reversed; a
  // random one, random), so that a warp can run ahead of the others through
  // any number of collectives up to the next __syncthreads, as warps do on a
  // GPU: a missing block barrier between one warp's reads of shared memory
  // and another warp's later writes shows.
  std::vector<std::size_t> ready;
  for (std::size_t w = 0; w < warps_.size(); ++w) {
    if (warps_[w].complete) ready.push_back(w);
  }
  if (ready.size() > 1 && job_->schedule.order != Order::kInOrder) {
    const std::size_t pick = job_->schedule.order == Order::kReversed
                                 ? ready.back()
                                 : ready[static_cast<std::size_t>(splitmix(rng_) % ready.size())];
    ready.assign(1, pick);
  }
  for (std::size_t w : ready) {
    Warp& wp = warps_[w];
    for (int l = 0; l < wp.size; ++l) {
      const int i = static_cast<int>(w) * 32 + l;
      fibers_[static_cast<std::size_t>(i)].state = State::kRunnable;
      phase_.push_back(i);
    }
    wp.complete = false;
    wp.arrived = 0;
  }
  if (!phase_.empty()) {
    order_phase();
    return true;
  }
  for (std::size_t w = 0; w < warps_.size(); ++w) {
    const Warp& wp = warps_[w];
    if (wp.arrived == 0) continue;
    std::vector<int> waiting;
    for (int l = 0; l < wp.size; ++l) {
      if (fibers_[w * 32 + static_cast<std::size_t>(l)].state == State::kAtWarpCollective) waiting.push_back(l);
    }
    record(&wp.site, std::string("divergent warp collective: ") + op_name(wp.op) + " is reached by lanes " +
                       ranges(waiting) + " of warp " + std::to_string(w) + " only; " +
                       describe_others(static_cast<int>(w)));
    return false;
  }
  if (at_barrier_ == 0) return false;  // every thread has returned
  if (exited_ > 0) {
    std::vector<int> gone;
    for (const Fiber& f : fibers_) {
      if (f.state == State::kExited) gone.push_back(f.linear);
    }
    record(&barrier_site_, "divergent __syncthreads: reached by " + std::to_string(at_barrier_) + " of " +
                             std::to_string(nthreads_) + " threads; threads " + ranges(gone) +
                             " have returned without reaching it");
    return false;
  }
  for (std::size_t w = 0; w < warps_.size(); ++w) {
    const std::string bad = compare_fragment_ops(static_cast<int>(w));
    if (!bad.empty()) {
      record(&barrier_site_, bad + " (found at a __syncthreads)");
      return false;
    }
  }
  for (int i = 0; i < nthreads_; ++i) {
    fibers_[static_cast<std::size_t>(i)].state = State::kRunnable;
    phase_.push_back(i);
  }
  at_barrier_ = 0;
  order_phase();
  return true;
}

void Executor::syncthreads(const Site& site) {
  Fiber* self = current_;
  if (at_barrier_ == 0) {
    barrier_site_ = site;
  } else if (!same_site(site, barrier_site_)) {
    fail(&site, "divergent __syncthreads: this thread reaches it while " + std::to_string(at_barrier_) +
                    " thread(s) wait at the __syncthreads " + where(barrier_site_));
  }
  self->state = State::kAtBlockBarrier;
  self->site = site;
  ++at_barrier_;
  suspend(self);
}

void Executor::collective(Op op, const Site& site, const LaneArgs& mine, Complete complete) {
  Fiber* self = current_;
  Warp& w = warps_[static_cast<std::size_t>(self->warp)];
  if (w.size != 32) {
    fail(&site, std::string(op_name(op)) + " needs 32 lanes, but warp " + std::to_string(self->warp) +
                    " of this block has " + std::to_string(w.size) + " (blockDim is not a multiple of 32)");
  }
  if (w.arrived == 0) {
    w.op = op;
    w.site = site;
    w.fn = complete;
  } else if (w.op != op || !same_site(w.site, site)) {
    fail(&site, std::string("divergent warp collective: lane ") + std::to_string(self->lane) + " reaches " +
                    op_name(op) + " while " + std::to_string(w.arrived) + " lane(s) of warp " +
                    std::to_string(self->warp) + " wait at " + op_name(w.op) + " " + where(w.site));
  }
  w.lanes[self->lane] = mine;
  self->state = State::kAtWarpCollective;
  self->op = op;
  self->site = site;
  if (++w.arrived == 32) {
    const std::string bad = compare_fragment_ops(self->warp);
    if (!bad.empty()) fail(&site, bad);
    complete(w.lanes, site);  // may fail(): then the block ends here
    w.complete = true;
  }
  suspend(self);
}

bool Executor::prepare_shared() {
  const std::size_t smem = job_->spec->smem;
  const std::size_t need = round_up(smem + kGuard, 128);
  std::size_t ext_cap = 0;
  if (auto ext = dynamic_shared_buffer(&ext_cap)) {
    if (dyn_ != nullptr && dyn_ != own_) NYSTROM_EMU_UNPOISON(dyn_, dyn_cap_);
    dyn_ = ext();
    dyn_cap_ = ext_cap;
    if (smem + kGuard > ext_cap) {
      record(nullptr, "the external dynamic shared buffer of " + std::to_string(ext_cap) + " bytes is too small for " +
                          std::to_string(smem) + " bytes and the guard",
             cudaErrorInvalidValue, false);
      return false;
    }
  } else {
    if (dyn_ != nullptr && dyn_ != own_) NYSTROM_EMU_UNPOISON(dyn_, dyn_cap_);
    if (need > own_cap_) {
      if (own_ != nullptr) {
        NYSTROM_EMU_UNPOISON(own_, own_cap_);
        std::free(own_);
      }
      own_ = static_cast<unsigned char*>(std::aligned_alloc(128, need));
      if (own_ == nullptr) throw std::bad_alloc();
      own_cap_ = need;
    }
    dyn_ = own_;
    dyn_cap_ = own_cap_;
  }
  NYSTROM_EMU_UNPOISON(dyn_, dyn_cap_);
  std::memset(dyn_, kPoison, smem + kGuard);
  NYSTROM_EMU_POISON(dyn_ + smem, dyn_cap_ - smem);
  dyn_bytes_ = smem;
  slots_.clear();
  static_end_ = 0;
  static_bytes_ = 0;
  NYSTROM_EMU_POISON(static_arena_, kArena);
  return true;
}

void* Executor::static_shared(const void* key, std::size_t size, std::size_t align, const Site& site) {
  for (const StaticSlot& s : slots_) {
    if (s.key == key) return static_arena_ + s.offset;
  }
  static_bytes_ = round_up(static_bytes_, align) + size;
  if (static_bytes_ > kStaticLimit) {
    fail(&site, "static shared memory reaches " + std::to_string(static_bytes_) +
                    " bytes, above the 48 KiB a kernel may declare (ptxas rejects such a kernel)",
         cudaErrorLaunchOutOfResources, false);
  }
  const Profile& p = job_->profile;
  const bool opted_in = job_->max_dynamic_smem >= 0;
  const std::size_t cap = opted_in ? static_cast<std::size_t>(p.smem_optin) : static_cast<std::size_t>(p.smem_per_block);
  if (static_bytes_ + dyn_bytes_ > cap) {
    fail(&site, std::to_string(static_bytes_) + " bytes of static and " + std::to_string(dyn_bytes_) +
                    " of dynamic shared memory exceed the " + std::to_string(cap) + " bytes a block may use on " +
                    p.arch + (opted_in ? "" : " without cudaFuncAttributeMaxDynamicSharedMemorySize"),
         cudaErrorInvalidValue, false);
  }
  const std::size_t offset = round_up(static_end_, std::max<std::size_t>(align, 16));
  if (offset + size + kGuard > kArena) {
    fail(&site, "too many static __shared__ declarations for the emulator's arena", cudaErrorLaunchOutOfResources,
         false);
  }
  NYSTROM_EMU_UNPOISON(static_arena_ + offset, size + kGuard);
  std::memset(static_arena_ + offset, kPoison, size + kGuard);
  NYSTROM_EMU_POISON(static_arena_ + offset + size, kGuard);
  static_end_ = offset + size + kGuard;
  slots_.push_back(StaticSlot{key, offset, size});
  return static_arena_ + offset;
}

bool Executor::in_shared(const void* p, std::size_t bytes) const {
  const auto* b = static_cast<const unsigned char*>(p);
  const auto inside = [&](const unsigned char* lo, std::size_t size) { return b >= lo && b + bytes <= lo + size; };
  if (dyn_ != nullptr && inside(dyn_, dyn_bytes_)) return true;
  for (const StaticSlot& s : slots_) {
    if (inside(static_arena_ + s.offset, s.size)) return true;
  }
  return false;
}

void Executor::note_wmma_traffic(const void* p, unsigned ldm, std::size_t elem) {
  if (current_->lane != 0 || !in_shared(p, 1)) return;
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t stride = static_cast<std::uintptr_t>(ldm) * elem;
  std::uint64_t wavefronts = 0, ideal = 0;
  // 16-bit tiles: one 4-byte word per lane, the warp served together; float
  // tiles: 8 bytes per lane, served by half warps (16 lanes x 8 bytes = one
  // 128-byte wavefront when conflict-free).
  const int n = elem == 2 ? 1 : 2;           // 4-byte words per lane and instruction
  const int group = elem == 2 ? 32 : 16;     // lanes served together
  for (int k = 0; k < 2; ++k) {    // lines g and g + 8
    for (int j = 0; j < 2; ++j) {  // the first and the second 16 bytes (16-bit) or 32 bytes (float) of a line
      for (int l0 = 0; l0 < 32; l0 += group) {
        int per_bank[32] = {};
        for (int lane = l0; lane < l0 + group; ++lane) {
          const int g = lane / 4, t = lane % 4;
          const std::uintptr_t line = base + static_cast<std::uintptr_t>(g + 8 * k) * stride;
          const std::uintptr_t word0 = elem == 2 ? line + 4u * static_cast<unsigned>(t + 4 * j)
                                                 : line + 4u * static_cast<unsigned>(2 * t + 8 * j);
          for (int w = 0; w < n; ++w) ++per_bank[((word0 + 4u * static_cast<unsigned>(w)) / 4) % 32];
        }
        wavefronts += static_cast<std::uint64_t>(*std::max_element(per_bank, per_bank + 32));
        ideal += static_cast<std::uint64_t>((group * n + 31) / 32);
      }
    }
  }
  job_->traffic->requests.fetch_add(4, std::memory_order_relaxed);
  job_->traffic->wavefronts.fetch_add(wavefronts, std::memory_order_relaxed);
  job_->traffic->ideal.fetch_add(ideal, std::memory_order_relaxed);
}

void Executor::land(const AsyncCopy& c) {
  std::memcpy(c.dst, c.src, c.bytes - c.zfill);
  std::memset(c.dst + (c.bytes - c.zfill), 0, c.zfill);
}

void Executor::async_copy(void* dst, const void* src, std::size_t bytes, std::size_t zfill, const Site& site) {
  if (bytes != 4 && bytes != 8 && bytes != 16) {
    fail(&site, "__pipeline_memcpy_async: size_and_align " + std::to_string(bytes) + " is not 4, 8 or 16");
  }
  if (zfill > bytes) {
    fail(&site, "__pipeline_memcpy_async: zfill " + std::to_string(zfill) + " exceeds the size " +
                    std::to_string(bytes));
  }
  if (reinterpret_cast<std::uintptr_t>(dst) % bytes != 0 || reinterpret_cast<std::uintptr_t>(src) % bytes != 0) {
    fail(&site, "__pipeline_memcpy_async: source and destination must be aligned to the size (" +
                    std::to_string(bytes) + " bytes)");
  }
  if (!in_shared(dst, bytes)) {
    fail(&site, "__pipeline_memcpy_async: the destination is not inside this block's shared memory");
  }
  if (in_shared(src, bytes)) fail(&site, "__pipeline_memcpy_async: the source must be global memory, not shared");
  AsyncCopy c{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), bytes, zfill,
              current_->commits, false, site};
  if (job_->schedule.order == Order::kReversed) {
    land(c);
    c.landed = true;
  }
  current_->async.push_back(c);
}

void Executor::async_wait_prior(std::size_t prior) {
  Fiber* self = current_;
  if (self->commits <= prior) return;
  const std::uint64_t upto = self->commits - prior;  // batches 0 .. upto - 1 complete
  std::size_t kept = 0;
  for (std::size_t i = 0; i < self->async.size(); ++i) {
    const AsyncCopy& c = self->async[i];
    if (c.batch < upto) {
      if (!c.landed) land(c);
    } else {
      self->async[kept++] = c;
    }
  }
  self->async.resize(kept);
}

bool Executor::check_guards(Fault* fault) {
#if NYSTROM_EMU_ASAN
  (void)fault;  // the guards are poisoned: ASan has already reported any access
  return true;
#else
  auto intact = [](const unsigned char* g) {
    for (std::size_t i = 0; i < kGuard; ++i) {
      if (g[i] != kPoison) return false;
    }
    return true;
  };
  std::string what;
  if (!intact(dyn_ + dyn_bytes_)) {
    what = "a thread wrote past the end of the block's " + std::to_string(dyn_bytes_) +
           " bytes of dynamic shared memory (the launch's smem argument)";
  }
  for (const StaticSlot& s : slots_) {
    if (what.empty() && !intact(static_arena_ + s.offset + s.size)) {
      what = "a thread wrote past the end of a static __shared__ array of " + std::to_string(s.size) + " bytes";
    }
  }
  if (what.empty()) return true;
  record(nullptr, what);
  *fault = fault_;
  return false;
#endif
}

bool Executor::run_block(const Job& job, long long linear, Fault* fault) {
  job_ = &job;
  if (job.serial != job_serial_) {
    job_serial_ = job.serial;
    static_max_ = 0;
  }
  const dim3 g = job.spec->grid, b = job.spec->block;
  bid_ = uint3{static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
               static_cast<unsigned>(linear / (static_cast<long long>(g.x) * g.y))};
  nthreads_ = job.threads_per_block;
  faulted_ = false;
  fault_ = Fault{};
  current_ = nullptr;
  if (!stacks_.reserve(nthreads_)) {
    record(nullptr, "cannot map " + std::to_string(nthreads_) + " fiber stacks", cudaErrorMemoryAllocation, false);
    *fault = fault_;
    return false;
  }
  fibers_.resize(static_cast<std::size_t>(nthreads_));
  for (int i = 0; i < nthreads_; ++i) {
    Fiber& f = fibers_[static_cast<std::size_t>(i)];
    const unsigned u = static_cast<unsigned>(i);
    f.tid = uint3{u % b.x, (u / b.x) % b.y, u / (b.x * b.y)};
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = State::kRunnable;
    f.fragment_ops.clear();
    f.async.clear();
    f.commits = 0;
    prepare(f.ctx, stacks_.lo(i), stacks_.size(), &Executor::fiber_main);
  }
  warps_.resize(static_cast<std::size_t>((nthreads_ + 31) / 32));
  for (std::size_t w = 0; w < warps_.size(); ++w) {
    warps_[w].size = std::min(32, nthreads_ - static_cast<int>(w) * 32);
    warps_[w].arrived = warps_[w].exited = 0;
    warps_[w].complete = false;
    warps_[w].fragment_ops = false;
  }
  at_barrier_ = exited_ = 0;
  rng_ = job.schedule.seed * 0xD1B54A32D192ED03ull + static_cast<std::uint64_t>(linear);
  if (!prepare_shared()) {
    *fault = fault_;
    return false;
  }

  tls.executor = this;
  tls.block_idx = bid_;
  tls.block_dim = uint3{b.x, b.y, b.z};
  tls.grid_dim = uint3{g.x, g.y, g.z};
  phase_.resize(static_cast<std::size_t>(nthreads_));
  for (int i = 0; i < nthreads_; ++i) phase_[static_cast<std::size_t>(i)] = i;
  order_phase();
  pos_ = 0;
  Fiber* first = &fibers_[static_cast<std::size_t>(phase_[pos_++])];
  enter(first);
  ++switches_;
  jump(main_, first->ctx);
  // Back on the host stack: every thread has returned, or the block failed.
  tls.executor = nullptr;
  current_ = nullptr;
  static_max_ = std::max(static_max_, static_bytes_);  // known to later launches even if this one failed
  if (faulted_) {
    for (int i = 0; i < nthreads_; ++i) {
      if (fibers_[static_cast<std::size_t>(i)].state != State::kExited) stacks_.unpoison(i);
    }
    *fault = fault_;
    return false;
  }
  return check_guards(fault);
}

// ------------------------------------------------------------ device API ----
void syncthreads(Site site) { current("__syncthreads").syncthreads(site); }

void collective(Op op, Site site, const LaneArgs& mine, Complete complete) {
  current(op_name(op)).collective(op, site, mine, complete);
}

void fail(const Site& site, const std::string& what) { current("a kernel check").fail(&site, what); }

void note_fragment_op(Op op, Site site, const void* mem, unsigned ldm, int layout, std::uint64_t value) {
  current(op_name(op)).note_fragment_op(FragmentOp{op, site, mem, ldm, layout, value});
}

void async_copy(void* dst, const void* src, std::size_t bytes, std::size_t zfill, Site site) {
  current("__pipeline_memcpy_async").async_copy(dst, src, bytes, zfill, site);
}
void note_wmma_traffic(const void* p, unsigned ldm, std::size_t elem) {
  current("load_matrix_sync").note_wmma_traffic(p, ldm, elem);
}
void async_commit(Site) { current("__pipeline_commit").async_commit(); }
void async_wait_prior(std::size_t prior, Site) { current("__pipeline_wait_prior").async_wait_prior(prior); }

unsigned char* dynamic_shared(Site) { return current("dynamic shared memory").dynamic_shared(); }

void* static_shared(const void* key, std::size_t size, std::size_t align, Site site) {
  return current("static shared memory").static_shared(key, size, align, site);
}

std::uint64_t shfl_xor(unsigned mask, std::uint64_t bits, int lane_mask, int width, Site site) {
  if (mask != 0xffffffffu) fail(site, "__shfl_xor_sync with a partial mask is not emulated (only 0xffffffff)");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(site, "__shfl_xor_sync: width " + std::to_string(width) + " is not a power of two up to 32");
  }
  std::uint64_t result = 0;
  LaneArgs a;
  a.value = bits;
  a.out = &result;
  a.lane_mask = lane_mask;
  a.width = width;
  collective(Op::kShflXor, site, a, [](LaneArgs* lanes, const Site&) {
    for (int l = 0; l < 32; ++l) {
      // PTX shfl.bfly: a source above the end of the lane's width-segment gives the lane's own value.
      const int src = l ^ lanes[l].lane_mask;
      const int last = (l & ~(lanes[l].width - 1)) | (lanes[l].width - 1);
      *static_cast<std::uint64_t*>(lanes[l].out) = lanes[src >= 0 && src <= last ? src : l].value;
    }
  });
  return result;
}

}  // namespace nystrom::emu::detail
