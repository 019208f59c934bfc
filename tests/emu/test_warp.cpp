// Warp collectives in the emulator: butterfly sums and maxima in float and
// double against float64 references under every schedule, the width
// argument, __syncwarp, and the divergence errors (a shuffle in a
// lane-dependent branch, shuffles at two sites, a partial warp).
#include "emu_test.h"

#include <algorithm>
#include <random>

namespace {

template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <typename A>
__device__ __forceinline__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Every lane of every warp gets its warp's sum and maximum.
template <typename A>
__global__ void warp_reduce(const A* in, A* sum, A* mx) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const A x = in[i];
  sum[i] = warp_sum(x);
  mx[i] = warp_max(x);
}

template <typename A>
void check_warp_reduce() {
  const int blocks = 2, threads = 128, n = blocks * threads;
  std::mt19937 gen(11);
  std::uniform_real_distribution<double> u(-10.0, 10.0);
  std::vector<A> in(n);
  for (A& x : in) x = static_cast<A>(u(gen));
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<A> sum(n), mx(n);
    emu::poison(sum.data(), sum.size() * sizeof(A));
    emu::poison(mx.data(), mx.size() * sizeof(A));
    NYSTROM_LAUNCH(warp_reduce<A>, blocks, threads, 0, nullptr)(in.data(), sum.data(), mx.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (int w = 0; w < n / 32; ++w) {
      double ref = 0.0, ref_max = -1e300;
      for (int l = 0; l < 32; ++l) {
        ref += static_cast<double>(in[static_cast<std::size_t>(w * 32 + l)]);
        ref_max = std::max(ref_max, static_cast<double>(in[static_cast<std::size_t>(w * 32 + l)]));
      }
      for (int l = 0; l < 32; ++l) {
        const std::size_t i = static_cast<std::size_t>(w * 32 + l);
        EXPECT_NEAR(static_cast<double>(sum[i]), ref, sizeof(A) == 4 ? 1e-4 : 1e-12) << s.str();
        EXPECT_EQ(static_cast<double>(mx[i]), ref_max) << s.str();
      }
      // The butterfly gives every lane the same bits.
      for (int l = 1; l < 32; ++l) EXPECT_EQ(sum[static_cast<std::size_t>(w * 32 + l)], sum[static_cast<std::size_t>(w * 32)]);
    }
  }
}

TEST_F(Emu, WarpSumAndMaxFloat) { check_warp_reduce<float>(); }
TEST_F(Emu, WarpSumAndMaxDouble) { check_warp_reduce<double>(); }

// width 8: lane l reads lane l^o inside its group of 8; a source beyond the
// end of the group gives the lane's own value (PTX shfl.bfly).
__global__ void shuffle_width(int o, int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), o, 8);
}

TEST_F(Emu, ShuffleWidth) {
  for (int o : {1, 3, 8, 12}) {
    std::vector<int> out(32, -1);
    NYSTROM_LAUNCH(shuffle_width, 1, 32, 0, nullptr)(o, out.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (int l = 0; l < 32; ++l) {
      const int src = l ^ o, last = (l & ~7) | 7;
      EXPECT_EQ(out[static_cast<std::size_t>(l)], src <= last ? src : l) << "lane " << l << " mask " << o;
    }
  }
}

// __syncwarp orders a warp's shared-memory writes before its reads: without
// it the reversed schedule reads lanes that have not written yet.
template <bool kSync>
__global__ void rotate_in_warp(float* out) {
  NYSTROM_SHARED(float, s, [64]);
  const int t = threadIdx.x;
  s[t] = static_cast<float>(t);
  if (kSync) __syncwarp();
  out[t] = s[(t & ~31) | ((t + 1) & 31)];
}

TEST_F(Emu, SyncwarpOrdersSharedMemoryWithinAWarp) {
  int failing = 0;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<float> good(64), bad(64);
    NYSTROM_LAUNCH(rotate_in_warp<true>, 1, 64, 0, nullptr)(good.data());
    NYSTROM_LAUNCH(rotate_in_warp<false>, 1, 64, 0, nullptr)(bad.data());
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (int t = 0; t < 64; ++t) EXPECT_EQ(good[static_cast<std::size_t>(t)], static_cast<float>((t & ~31) | ((t + 1) & 31)));
    if (any_nan(bad)) ++failing;
  }
  EXPECT_GE(failing, 1);
}

// ------------------------------------------------------------ divergence ----
int g_shuffle_line = 0;
__global__ void shuffle_in_branch(float* out) {
  float x = static_cast<float>(threadIdx.x);
  const int lane = threadIdx.x % 32;
  g_shuffle_line = __LINE__ + 1;
  if (lane < 16) x = warp_sum(x);  // lanes 16-31 skip the collective
  out[threadIdx.x] = x;
}

TEST_F(Emu, ShuffleInALaneDependentBranchIsAnError) {
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    std::vector<float> out(64);
    NYSTROM_LAUNCH(shuffle_in_branch, 1, 64, 0, nullptr)(out.data());
    EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"shuffle_in_branch", "divergent warp collective",
                                                      "__shfl_xor_sync is reached by lanes 0-15 of warp 0 only",
                                                      "lanes 16-31 have returned", "test_warp.cpp:", "warp_sum"}))
        << s.str();
    emu::reset();
  }
}

__global__ void shuffles_at_two_sites(float* out) {
  float x = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2 == 0) {
    x += __shfl_xor_sync(0xffffffffu, x, 2);
  } else {
    x -= __shfl_xor_sync(0xffffffffu, x, 2);
  }
  out[threadIdx.x] = x;
}

TEST_F(Emu, ShufflesAtTwoSitesAreAnError) {
  std::vector<float> out(32);
  NYSTROM_LAUNCH(shuffles_at_two_sites, 1, 32, 0, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"shuffles_at_two_sites", "divergent warp collective", "lane"}));
}

__global__ void shuffle_then_barrier(float* out) {
  float x = static_cast<float>(threadIdx.x);
  if (threadIdx.x >= 8) x = __shfl_xor_sync(0xffffffffu, x, 1);
  __syncthreads();
  out[threadIdx.x] = x;
}

TEST_F(Emu, LanesAtABarrierWhileOthersShuffleIsAnError) {
  std::vector<float> out(64);
  NYSTROM_LAUNCH(shuffle_then_barrier, 1, 64, 0, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure,
                          {"__shfl_xor_sync is reached by lanes 8-31 of warp 0 only", "lanes 0-7 wait at __syncthreads"}));
}

__global__ void shuffle_in_partial_warp(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

TEST_F(Emu, FullMaskShuffleInAPartialWarpIsAnError) {
  std::vector<float> out(48);
  NYSTROM_LAUNCH(shuffle_in_partial_warp, 1, 48, 0, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"needs 32 lanes", "warp 1 of this block has 16"}));
}

__global__ void partial_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1); }

TEST_F(Emu, PartialMasksAreRefused) {
  std::vector<float> out(32);
  NYSTROM_LAUNCH(partial_mask, 1, 32, 0, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"partial mask is not emulated"}));
}

}  // namespace
