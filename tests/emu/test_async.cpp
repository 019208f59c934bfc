// Asynchronous copies in the emulator (__pipeline_memcpy_async, commit,
// wait_prior; cp.async on the GPU): a double-buffered stream through shared
// memory against a float64 sum under every schedule; a read before the wait
// and a prefetch into a buffer still being read, each caught under some
// schedule; zero fill; the faults (size, alignment, memory spaces, copies
// never waited for), each naming the kernel and the source site.
#include "emu_test.h"

#include <random>

namespace {

constexpr int kThreads = 128;
constexpr int kTile = 4 * kThreads;  // floats per tile: one 16-byte copy per thread

// Each block sums `tiles` tiles of kTile floats, staged two at a time: tile
// t + 1 is in flight while tile t is summed. kWait = false reads a tile
// before waiting for it; kBarrier = false drops the barrier that keeps the
// next prefetch off the buffer other threads still read.
template <bool kWait, bool kBarrier>
__global__ void stream_sum(const float* in, float* out, int tiles) {
  NYSTROM_SHARED(float, buf, [2][kTile]);
  const int t = threadIdx.x;
  const float* src = in + static_cast<long long>(blockIdx.x) * tiles * kTile;
  __pipeline_memcpy_async(&buf[0][4 * t], src + 4 * t, 16);
  __pipeline_commit();
  float acc = 0.0f;
  for (int i = 0; i < tiles; ++i) {
    if (i + 1 < tiles) __pipeline_memcpy_async(&buf[(i + 1) & 1][4 * t], src + (i + 1) * kTile + 4 * t, 16);
    __pipeline_commit();  // possibly empty: one batch per step keeps wait_prior(1) uniform
    if (kWait) __pipeline_wait_prior(1);
    __syncthreads();
    // Each thread reads another thread's copy: the barrier after the wait publishes it.
    for (int j = 0; j < 4; ++j) acc += buf[i & 1][(4 * t + 4 * 37 + j) % kTile];
    if (kBarrier) __syncthreads();
  }
  __pipeline_wait_prior(0);
  out[blockIdx.x * kThreads + t] = acc;
}

std::vector<float> inputs(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  std::vector<float> x(n);
  for (float& v : x) v = u(gen);
  return x;
}

template <bool kWait, bool kBarrier>
std::vector<float> run_stream(const std::vector<float>& in, int blocks, int tiles) {
  std::vector<float> out(static_cast<std::size_t>(blocks * kThreads));
  emu::poison(out.data(), out.size() * sizeof(float));
  NYSTROM_LAUNCH((stream_sum<kWait, kBarrier>), blocks, kThreads, 0, nullptr)(in.data(), out.data(), tiles);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  return out;
}

TEST_F(Emu, DoubleBufferedStreamMatchesFloat64UnderEverySchedule) {
  const int blocks = 3, tiles = 7;
  const std::vector<float> in = inputs(static_cast<std::size_t>(blocks * tiles * kTile), 11);
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    const std::vector<float> got = run_stream<true, true>(in, blocks, tiles);
    for (int b = 0; b < blocks; ++b) {
      for (int t = 0; t < kThreads; ++t) {
        double ref = 0.0;
        for (int i = 0; i < tiles; ++i)
          for (int j = 0; j < 4; ++j)
            ref += in[static_cast<std::size_t>((b * tiles + i) * kTile + (4 * t + 4 * 37 + j) % kTile)];
        EXPECT_NEAR(got[static_cast<std::size_t>(b * kThreads + t)], ref, 1e-4) << s.str() << " block " << b;
      }
    }
  }
}

// Under how many of the standard schedules a defective stream_sum differs
// bitwise from the correct one on the same inputs.
template <bool kWait, bool kBarrier>
int schedules_showing(int tiles, unsigned seed) {
  const int blocks = 2;
  const std::vector<float> in = inputs(static_cast<std::size_t>(blocks * tiles * kTile), seed);
  const std::vector<float> good = run_stream<true, true>(in, blocks, tiles);
  int failing = 0;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    if (!bitwise_equal(run_stream<kWait, kBarrier>(in, blocks, tiles), good)) ++failing;
  }
  return failing;
}

TEST_F(Emu, ReadBeforeTheWaitShowsUnderSomeSchedule) {
  EXPECT_GE((schedules_showing<false, true>(3, 12)), 1)
      << "a read of a tile before its wait went unseen under every schedule";
}

TEST_F(Emu, PrefetchIntoABufferStillReadShowsUnderSomeSchedule) {
  EXPECT_GE((schedules_showing<true, false>(4, 13)), 1)
      << "the prefetch over a buffer in use went unseen under every schedule";
}

__global__ void zero_fill(const float* in, float* out) {
  NYSTROM_SHARED(float, buf, [4 * 32]);
  const int t = threadIdx.x;
  __pipeline_memcpy_async(&buf[4 * t], in + 4 * t, 16, /*zfill=*/4 * (t % 4));  // keep 4 - t % 4 floats
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncwarp();
  for (int j = 0; j < 4; ++j) out[4 * t + j] = buf[4 * t + j];
}

TEST_F(Emu, ZeroFillKeepsTheLeadingBytes) {
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    const std::vector<float> in = inputs(4 * 32, 14);
    std::vector<float> out(4 * 32, -1.0f);
    NYSTROM_LAUNCH(zero_fill, 1, 32, 0, nullptr)(in.data(), out.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (int t = 0; t < 32; ++t)
      for (int j = 0; j < 4; ++j)
        EXPECT_EQ(out[static_cast<std::size_t>(4 * t + j)], j < 4 - t % 4 ? in[static_cast<std::size_t>(4 * t + j)] : 0.0f)
            << s.str() << " thread " << t;
  }
}

// ------------------------------------------------------------------ faults ----
int g_fault_line = 0;

// 0: size 12; 1: misaligned source; 2: destination in global memory;
// 3: source in shared memory; 4: returns without waiting.
__global__ void bad_copy(const float* in, float* out, int what) {
  NYSTROM_SHARED(float, buf, [64]);
  const int t = threadIdx.x;
  switch (what) {
    case 0: g_fault_line = __LINE__ + 1;
      __pipeline_memcpy_async(&buf[4 * t], in + 4 * t, 12);
      break;
    case 1: g_fault_line = __LINE__ + 1;
      __pipeline_memcpy_async(&buf[4 * t], in + 4 * t + 1, 16);
      break;
    case 2: g_fault_line = __LINE__ + 1;
      __pipeline_memcpy_async(out + 4 * t, in + 4 * t, 16);
      break;
    case 3: g_fault_line = __LINE__ + 1;
      __pipeline_memcpy_async(&buf[4 * t], &buf[32], 16);
      break;
    default: g_fault_line = __LINE__ + 1;
      __pipeline_memcpy_async(&buf[4 * t], in + 4 * t, 16);
      __pipeline_commit();
      break;
  }
  __pipeline_wait_prior(1);  // batch 0 stays pending in case 4
}

TEST_F(Emu, BadAsyncCopiesAreFaultsNamingKernelAndSite) {
  const std::vector<float> in = inputs(64 + 16, 15);
  std::vector<float> out(64, 0.0f);
  const char* what[] = {"is not 4, 8 or 16", "aligned to the size", "not inside this block's shared memory",
                        "must be global memory", "never waited for"};
  for (int w = 0; w < 5; ++w) {
    NYSTROM_LAUNCH(bad_copy, 1, 16, 0, nullptr)(in.data(), out.data(), w);
    EXPECT_TRUE(failed_with(cudaErrorLaunchFailure,
                            {"bad_copy", what[w], "test_async.cpp:" + std::to_string(g_fault_line)}))
        << "case " << w;
    emu::reset();
  }
}

}  // namespace
