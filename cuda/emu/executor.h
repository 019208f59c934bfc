// The block executor of the CUDA emulation: runs the threads of one thread
// block as fibers on the calling OS thread. Internal (cuda/emu/*.cpp only).
//
// Scheduling. The threads run one at a time; a thread runs until it reaches
// a barrier (__syncthreads, or a warp collective: shuffle, __syncwarp, WMMA)
// or returns. When no thread is runnable the block is quiescent, and the
// barriers are resolved: every warp whose 32 lanes wait at one collective
// is released (the collective itself ran when its last lane arrived); if no
// warp is, and every live thread waits at one __syncthreads, the block is.
// The released threads form the next phase, run in the order the schedule
// gives: ascending thread index, descending, or a permutation drawn from a
// generator seeded by (seed, block index). Under the reversed and random
// schedules only one of the warps whose collective is complete is released
// at a time (the highest-numbered; a random one), so one warp may run ahead
// of the others up to the next __syncthreads (warp skew, as a GPU allows);
// in order, all are, and the warps move in step from collective to collective. A block's run thus depends only
// on its own index and the schedule, on any OS thread.
//
// Divergence. At quiescence, a warp whose lanes wait at a collective while
// others have exited or wait elsewhere, or a __syncthreads that some thread
// exited before, is a fault; so is a thread that arrives at a barrier of a
// different site or kind than the others already waiting there.
//
// Asynchronous copies (cp.async, __pipeline_memcpy_async). Each thread keeps
// the copies it issued until a __pipeline_wait_prior covers their batch;
// they land at that wait (in order and random schedules) or at their issue
// (reversed), the two ends of what the hardware allows, so that a read before
// the wait and an overwrite of a buffer still in use each show under some
// schedule. A thread that returns with copies not waited for is a fault.
#pragma once

#include "device.h"
#include "fiber.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace nystrom::emu::detail {

/// The modeled shared-memory traffic of a launch's WMMA loads and stores
/// (Executor::note_wmma_traffic), summed over its blocks.
struct BankTraffic {
  std::atomic<std::uint64_t> requests{0}, wavefronts{0}, ideal{0};
};

/// One launch, as every executor sees it.
struct Job {
  std::uint64_t serial;      // distinct for every launch
  const LaunchSpec* spec;
  std::string kernel_name;   // for messages
  Schedule schedule;
  Profile profile;
  int max_dynamic_smem;      // the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize
  int threads_per_block;
  long long blocks;
  BankTraffic* traffic;      // where the blocks add their WMMA shared-memory traffic
};

/// How a block (and hence the launch) went wrong.
struct Fault {
  cudaError_t code = cudaSuccess;
  bool sticky = false;       // a fault in kernel code, as opposed to a refused configuration
  std::string message;
};

/// A lane's WMMA fill, load or store, as logged for the warp's checks.
struct FragmentOp {
  Op op;
  Site site;
  const void* mem;
  unsigned ldm;
  int layout;
  std::uint64_t value;
};

class Executor {
 public:
  explicit Executor(std::size_t stack_bytes);
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  /// Runs block `linear` (x fastest) of the job; false with *fault set if it failed.
  bool run_block(const Job& job, long long linear, Fault* fault);

  /// Largest static shared memory (bytes) a block of the current job declared.
  std::size_t static_smem_seen() const { return static_max_; }
  std::uint64_t switches() const { return switches_; }

  // The device API, called by the current fiber.
  void syncthreads(const Site& site);
  void collective(Op op, const Site& site, const LaneArgs& mine, Complete complete);
  /// Records a fault of the block (the first one counts); fail() also abandons the block.
  void record(const Site* site, const std::string& what, cudaError_t code = cudaErrorLaunchFailure,
              bool sticky = true);
  [[noreturn]] void fail(const Site* site, const std::string& what, cudaError_t code = cudaErrorLaunchFailure,
                         bool sticky = true);
  void note_fragment_op(const FragmentOp& op) {
    current_->fragment_ops.push_back(op);
    warps_[static_cast<std::size_t>(current_->warp)].fragment_ops = true;
  }
  /// A warp's WMMA load or store of a 16 x 16 tile at p (ldm elements of
  /// `elem` bytes per line), counted once per warp (by lane 0) when p is
  /// shared memory: the wavefronts its instructions take on the 32 banks of
  /// 4 bytes, under the model of cuda/emu/wmma.h, against the conflict-free ideal.
  void note_wmma_traffic(const void* p, unsigned ldm, std::size_t elem);
  void async_copy(void* dst, const void* src, std::size_t bytes, std::size_t zfill, const Site& site);
  void async_commit() { ++current_->commits; }
  void async_wait_prior(std::size_t prior);
  unsigned char* dynamic_shared() const { return dyn_; }
  void* static_shared(const void* key, std::size_t size, std::size_t align, const Site& site);

 private:
  enum class State : std::uint8_t { kRunnable, kAtBlockBarrier, kAtWarpCollective, kExited };
  struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;
    std::size_t bytes, zfill;
    std::uint64_t batch;  // the commits before it: its batch's number
    bool landed;          // the reversed schedule lands copies at their issue
    Site site;
  };
  static void land(const AsyncCopy& c);
  /// Whether [p, p + bytes) lies in this block's dynamic or static shared memory.
  bool in_shared(const void* p, std::size_t bytes) const;
  struct Fiber {
    Context ctx;
    uint3 tid;
    int linear, warp, lane;
    State state;
    Op op;
    Site site;
    std::vector<FragmentOp> fragment_ops;  // since the warp's last collective
    std::vector<AsyncCopy> async;          // issued, not yet waited for
    std::uint64_t commits;                 // batches closed so far
  };
  struct Warp {
    int size, arrived, exited;
    bool complete;
    bool fragment_ops;  // some lane logged a WMMA fill/load/store since the last comparison
    Op op;
    Site site;
    Complete fn;
    LaneArgs lanes[32];
  };
  struct StaticSlot {
    const void* key;
    std::size_t offset, size;
  };

  static void fiber_main();
  [[noreturn]] void exit_current();
  void suspend(Fiber* self);
  Fiber* next_runnable();
  bool resolve();
  void order_phase();
  void enter(Fiber* f);
  std::string describe_others(int warp_index) const;
  /// Empty if the lanes of the warp made the same WMMA fill/load/store calls
  /// since its last collective (the logs are then cleared), else the difference.
  std::string compare_fragment_ops(int warp_index);
  std::string where(const Site& s) const;
  bool prepare_shared();
  bool check_guards(Fault* fault);

  StackPool stacks_;
  Context main_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  std::vector<int> phase_;
  std::size_t pos_ = 0;
  Fiber* current_ = nullptr;

  const Job* job_ = nullptr;
  uint3 bid_{};
  int nthreads_ = 0;
  int at_barrier_ = 0, exited_ = 0;
  Site barrier_site_{};
  std::uint64_t rng_ = 0;
  bool faulted_ = false;
  Fault fault_;

  // Shared memory: dynamic region + guard, static arena with guards between slots.
  unsigned char* dyn_ = nullptr;       // this block's dynamic shared memory
  unsigned char* own_ = nullptr;       // the executor's buffer (dyn_ unless an external one is set)
  std::size_t own_cap_ = 0, dyn_cap_ = 0, dyn_bytes_ = 0;
  unsigned char* static_arena_ = nullptr;
  std::vector<StaticSlot> slots_;
  std::size_t static_end_ = 0;    // arena offset past the last slot's guard
  std::size_t static_bytes_ = 0;  // bytes declared (what counts against the limit)
  std::size_t static_max_ = 0;
  std::uint64_t job_serial_ = 0;

  std::uint64_t switches_ = 0;
};

/// The executor of the calling OS thread (created on first use).
Executor& this_thread_executor();
/// The buffer set by set_dynamic_shared_buffer (null when none), and its size.
unsigned char* (*dynamic_shared_buffer(std::size_t* capacity))();
/// Size of every fiber stack (NYSTROM_EMU_STACK_KIB, default 256 KiB).
std::size_t fiber_stack_bytes();

}  // namespace nystrom::emu::detail
