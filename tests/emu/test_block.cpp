// Blocks, shared memory and __syncthreads in the emulator: a block reduction
// against a float64 sum under every schedule, the same reduction without its
// barrier (the poisoned shared memory shows the race), divergent barriers,
// per-block shared memory, the built-in variables, several OS threads.
#include "emu_test.h"

#include <cstring>
#include <numeric>
#include <random>

namespace {

constexpr int kThreads = 256;

// Each block sums its 256 inputs: staged in shared memory, then a tree.
// kBarrier = false drops the barrier between the stores and the first reads.
template <bool kBarrier>
__global__ void block_sum(const float* in, float* out) {
  NYSTROM_SHARED(float, buf, [kThreads]);
  const int t = threadIdx.x;
  buf[t] = in[blockIdx.x * kThreads + t];
  if (kBarrier) __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = buf[0];
}

// The same with dynamic shared memory and a per-warp second stage.
template <bool kBarrier>
__global__ void block_sum_dynamic(const float* in, float* out, int n) {
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  float* buf = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  float acc = 0.0f;
  for (int i = t; i < n; i += blockDim.x) acc += in[blockIdx.x * n + i];
  buf[t] = acc;
  if (kBarrier) __syncthreads();
  if (t < 32) {
    float s = 0.0f;
    for (int i = t; i < static_cast<int>(blockDim.x); i += 32) s += buf[i];
    buf[t] = s;
  }
  __syncthreads();
  if (t == 0) {
    float s = 0.0f;
    for (int i = 0; i < 32; ++i) s += buf[i];
    out[blockIdx.x] = s;
  }
}

std::vector<float> inputs(int n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (float& v : x) v = u(gen);
  return x;
}

template <bool kBarrier>
std::vector<float> run_block_sum(const std::vector<float>& in, int blocks) {
  std::vector<float> out(static_cast<std::size_t>(blocks));
  emu::poison(out.data(), out.size() * sizeof(float));
  NYSTROM_LAUNCH(block_sum<kBarrier>, blocks, kThreads, 0, nullptr)(in.data(), out.data());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  return out;
}

TEST_F(Emu, BlockReductionMatchesFloat64UnderEverySchedule) {
  const int blocks = 5;
  const std::vector<float> in = inputs(blocks * kThreads, 1);
  std::vector<std::vector<float>> results;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    results.push_back(run_block_sum<true>(in, blocks));
    for (int b = 0; b < blocks; ++b) {
      double ref = 0.0;
      for (int i = 0; i < kThreads; ++i) ref += in[static_cast<std::size_t>(b * kThreads + i)];
      EXPECT_NEAR(results.back()[static_cast<std::size_t>(b)], ref, 1e-5) << s.str() << " block " << b;
    }
  }
  // A fixed reduction order: bitwise the same whatever the schedule.
  for (const auto& r : results) EXPECT_TRUE(bitwise_equal(r, results.front()));
}

TEST_F(Emu, MissingBarrierShowsUnderSomeSchedule) {
  const int blocks = 3;
  const std::vector<float> in = inputs(blocks * kThreads, 2);
  const std::vector<float> good = run_block_sum<true>(in, blocks);
  int failing = 0;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    const std::vector<float> r = run_block_sum<false>(in, blocks);
    if (!bitwise_equal(r, good)) ++failing;
  }
  EXPECT_GE(failing, 1) << "the race of the missing barrier went unseen under every schedule";
}

TEST_F(Emu, MissingBarrierInDynamicSharedMemoryShows) {
  const int blocks = 2, n = 1000;
  const std::vector<float> in = inputs(blocks * n, 3);
  auto run = [&](auto kernel) {
    std::vector<float> out(blocks);
    emu::poison(out.data(), out.size() * sizeof(float));
    NYSTROM_LAUNCH(kernel, blocks, 128, 128 * sizeof(float), nullptr)(in.data(), out.data(), n);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    return out;
  };
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    const std::vector<float> ok = run(block_sum_dynamic<true>);
    for (int b = 0; b < blocks; ++b) {
      double ref = 0.0;
      for (int i = 0; i < n; ++i) ref += in[static_cast<std::size_t>(b * n + i)];
      EXPECT_NEAR(ok[static_cast<std::size_t>(b)], ref, 1e-4) << s.str();
    }
  }
  int failing = 0;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    if (any_nan(run(block_sum_dynamic<false>))) ++failing;
  }
  EXPECT_GE(failing, 1);
}

// ------------------------------------------------------------ warp skew ----
// Warps run independently on a GPU: between two __syncthreads one warp may
// pass any number of warp collectives before another starts. Every warp
// reads a shared value after a collective; the last warp then overwrites it.
// With kBarrier the overwrite waits for a __syncthreads; without, the
// in-order schedule (warps in step from collective to collective) still
// reads the old value everywhere, and the warp skew of the reversed and
// random schedules lets the last warp write before the others read.
template <bool kBarrier>
__global__ void read_then_overwrite(int* out) {
  NYSTROM_SHARED(int, flag, [1]);
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  if (t == 0) flag[0] = 1;
  __syncthreads();
  __syncwarp();
  const int v = flag[0];
  if (kBarrier) {
    __syncthreads();
  } else {
    __syncwarp();
  }
  if (warp == static_cast<int>(blockDim.x) / 32 - 1 && lane == 0) flag[0] = 2;
  __syncwarp();
  out[t] = v;
}

TEST_F(Emu, WarpSkewShowsAMissingBarrierBetweenWarps) {
  auto run = [](auto kernel) {
    std::vector<int> out(128, -1);
    NYSTROM_LAUNCH(kernel, 1, 128, 0, nullptr)(out.data());
    EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    int stale = 0;
    for (int v : out) stale += v != 1;
    return stale;
  };
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    EXPECT_EQ(run(read_then_overwrite<true>), 0) << s.str();
  }
  emu::set_schedule(emu::Schedule{emu::Order::kInOrder, 0});
  EXPECT_EQ(run(read_then_overwrite<false>), 0) << "in order, the warps move in step";
  emu::set_schedule(emu::Schedule{emu::Order::kReversed, 0});
  EXPECT_GT(run(read_then_overwrite<false>), 0) << "reversed: the last warp runs ahead and writes first";
  // A random warp goes on at each step: some seeds let the last warp write before another warp reads.
  int seeds_showing = 0;
  for (std::uint64_t seed = 1; seed <= 16; ++seed) {
    emu::set_schedule(emu::Schedule{emu::Order::kRandom, seed});
    EXPECT_EQ(run(read_then_overwrite<true>), 0) << "random:" << seed;
    seeds_showing += run(read_then_overwrite<false>) > 0;
  }
  EXPECT_GT(seeds_showing, 0);
}

// ------------------------------------------------------------ divergence ----
int g_branch_line = 0;
__global__ void barrier_in_branch(float* out) {
  if (threadIdx.x < 128) {
    g_branch_line = __LINE__ + 1;
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

TEST_F(Emu, SyncthreadsInABranchIsAnErrorNamingKernelAndSite) {
  std::vector<float> out(kThreads, 0.0f);
  NYSTROM_LAUNCH(barrier_in_branch, 1, kThreads, 0, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure,
                          {"barrier_in_branch", "divergent __syncthreads", "reached by 128 of 256",
                           "threads 128-255 have returned", "test_block.cpp:" + std::to_string(g_branch_line)}));
  // Sticky, as on a GPU: cudaGetLastError does not clear it, later launches do not run.
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchFailure);
  std::vector<float> other(kThreads, 0.0f);
  NYSTROM_LAUNCH(barrier_in_branch, 1, 32, 0, nullptr)(other.data());
  EXPECT_EQ(other[0], 0.0f);
  int device = -1;
  EXPECT_EQ(cudaGetDevice(&device), cudaErrorLaunchFailure);
  // The error text carries the emulator's account after the runtime's.
  const std::string text = cudaGetErrorString(cudaErrorLaunchFailure);
  EXPECT_EQ(text.rfind("unspecified launch failure [emulator: ", 0), 0u) << text;
  EXPECT_NE(text.find("barrier_in_branch"), std::string::npos) << text;
  EXPECT_EQ(cudaDeviceReset(), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(cudaGetDevice(&device), cudaSuccess);
}

__global__ void barriers_at_two_sites(float* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

TEST_F(Emu, SyncthreadsAtTwoSitesIsAnError) {
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<float> out(64);
    NYSTROM_LAUNCH(barriers_at_two_sites, 1, 64, 0, nullptr)(out.data());
    EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"barriers_at_two_sites", "divergent __syncthreads",
                                                      "wait at the __syncthreads", "test_block.cpp:"}))
        << s.str();
    emu::reset();
  }
}

__global__ void uniform_early_return(const int* count, float* out) {
  if (static_cast<int>(blockIdx.x) >= *count) return;  // whole blocks leave: fine
  NYSTROM_SHARED(float, v, [64]);
  v[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[blockIdx.x * 64 + threadIdx.x] = v[63 - threadIdx.x];
}

TEST_F(Emu, BlockUniformEarlyReturnIsFine) {
  const int count = 2;
  std::vector<float> out(4 * 64, -1.0f);
  NYSTROM_LAUNCH(uniform_early_return, 4, 64, 0, nullptr)(&count, out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  for (int b = 0; b < 4; ++b)
    for (int t = 0; t < 64; ++t)
      EXPECT_EQ(out[static_cast<std::size_t>(b * 64 + t)], b < count ? static_cast<float>(63 - t) : -1.0f);
}

// -------------------------------------------------------- shared memory ----
// Shared memory is the block's own and starts poisoned: a block reads what
// it did not write as NaN, never what an earlier block left.
__global__ void read_before_write(float* out) {
  NYSTROM_SHARED(float, v, [2][32]);
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  auto* d = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  out[(blockIdx.x * 32 + t) * 2] = v[blockIdx.x % 2][t];
  out[(blockIdx.x * 32 + t) * 2 + 1] = d[t];
  v[0][t] = v[1][t] = 1.0f;
  d[t] = 2.0f;
}

TEST_F(Emu, SharedMemoryIsPerBlockAndPoisoned) {
  std::vector<float> out(3 * 32 * 2, 0.0f);
  NYSTROM_LAUNCH(read_before_write, 3, 32, 32 * sizeof(float), nullptr)(out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  for (float x : out) EXPECT_TRUE(std::isnan(x));
}

__global__ void overrun_dynamic(int n) {
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  auto* d = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x == 0) d[n] = 0.0f;  // one past the end
}

TEST_F(Emu, WritePastDynamicSharedMemoryIsAnError) {
  if (NYSTROM_EMU_TEST_ASAN) {
    // The guard is poisoned for ASan, which reports the write where it happens.
    GTEST_FLAG_SET(death_test_style, "threadsafe");
    EXPECT_DEATH(NYSTROM_LAUNCH(overrun_dynamic, 1, 32, 16 * sizeof(float), nullptr)(16),
                 "AddressSanitizer: use-after-poison");
    return;
  }
  NYSTROM_LAUNCH(overrun_dynamic, 1, 32, 16 * sizeof(float), nullptr)(16);
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"overrun_dynamic", "past the end", "64 bytes of dynamic"}));
}

// ------------------------------------------------------ built-in indices ----
__global__ void indices(unsigned* out) {
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned at = block * blockDim.x * blockDim.y * blockDim.z + thread;
  out[at * 2] = block;
  out[at * 2 + 1] = (threadIdx.z << 16) | (threadIdx.y << 8) | threadIdx.x;
}

TEST_F(Emu, BuiltInVariables) {
  const dim3 grid(3, 2, 2), block(4, 3, 2);
  const unsigned n = 12 * 24;
  std::vector<unsigned> out(n * 2, 0xdeadu);
  NYSTROM_LAUNCH(indices, grid, block, 0, nullptr)(out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  for (unsigned i = 0; i < n; ++i) {
    const unsigned t = i % 24;
    EXPECT_EQ(out[i * 2], i / 24);
    EXPECT_EQ(out[i * 2 + 1], ((t / 12) << 16) | (((t / 4) % 3) << 8) | (t % 4));
  }
}

// --------------------------------------------------------- OS threads ----
__global__ void fail_in_block(const int* bad, float* out) {
  if (static_cast<int>(blockIdx.x) == bad[0] || static_cast<int>(blockIdx.x) == bad[1]) {
    if (threadIdx.x == 0) return;
  }
  __syncthreads();
  out[blockIdx.x] = 1.0f;
}

TEST_F(Emu, SeveralOsThreadsGiveTheSameResultsAndTheLowestFailingBlock) {
  const int blocks = 40;
  const std::vector<float> in = inputs(blocks * kThreads, 4);
  emu::set_schedule(emu::Schedule{emu::Order::kRandom, 7});
  const std::vector<float> one = run_block_sum<true>(in, blocks);
  emu::set_threads(2);
  const std::vector<float> two = run_block_sum<true>(in, blocks);
  EXPECT_TRUE(bitwise_equal(one, two));

  const int bad[2] = {31, 9};
  std::vector<float> out(blocks);
  NYSTROM_LAUNCH(fail_in_block, blocks, 64, 0, nullptr)(bad, out.data());
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"block (9,0,0)"}));
}

}  // namespace
