// Launch limits of the target profiles and the error semantics of the
// runtime calls: block and grid sizes, dynamic shared memory with and
// without cudaFuncSetAttribute (sm90 against sm86), static shared memory,
// device attributes, cudaGetLastError / cudaPeekAtLastError, schedules.
#include "emu_test.h"

namespace {

__global__ void touch(int* out, int n) {
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  if (n > 0 && threadIdx.x == 0) smem_raw[n - 1] = 1;
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) ++*out;
}

TEST_F(Emu, TooManyThreadsPerBlock) {
  int ran = 0;
  NYSTROM_LAUNCH(touch, 1, 1025, 0, nullptr)(&ran, 0);
  EXPECT_TRUE(failed_with(cudaErrorInvalidConfiguration, {"touch", "1025", "must be 1..1024"}));
  NYSTROM_LAUNCH(touch, 1, dim3(32, 32, 2), 0, nullptr)(&ran, 0);
  EXPECT_TRUE(failed_with(cudaErrorInvalidConfiguration, {"2048 threads, more than 1024"}));
  NYSTROM_LAUNCH(touch, 1, dim3(1, 1, 65), 0, nullptr)(&ran, 0);
  EXPECT_TRUE(failed_with(cudaErrorInvalidConfiguration, {"dimension 2 must be 1..64"}));
  NYSTROM_LAUNCH(touch, 1, 0, 0, nullptr)(&ran, 0);
  EXPECT_TRUE(failed_with(cudaErrorInvalidConfiguration, {"block (0, 1, 1)"}));
  EXPECT_EQ(ran, 0);
  NYSTROM_LAUNCH(touch, 1, 1024, 0, nullptr)(&ran, 0);
  EXPECT_EQ(ran, 1);
}

TEST_F(Emu, GridLimits) {
  int ran = 0;
  NYSTROM_LAUNCH(touch, dim3(1, 65536), 1, 0, nullptr)(&ran, 0);
  EXPECT_TRUE(failed_with(cudaErrorInvalidConfiguration, {"grid (1, 65536, 1)", "dimension 1 must be 1..65535"}));
  NYSTROM_LAUNCH(touch, dim3(1, 1, 65536), 1, 0, nullptr)(&ran, 0);
  EXPECT_TRUE(failed_with(cudaErrorInvalidConfiguration, {"dimension 2 must be 1..65535"}));
  NYSTROM_LAUNCH(touch, dim3(0, 1, 1), 1, 0, nullptr)(&ran, 0);
  EXPECT_TRUE(failed_with(cudaErrorInvalidConfiguration, {"dimension 0 must be 1..2147483647"}));
  EXPECT_EQ(ran, 0);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  NYSTROM_LAUNCH(touch, dim3(1, 65535), 1, 0, nullptr)(&ran, 0);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  EXPECT_EQ(ran, 1);
}

// A launch error is not sticky: cudaPeekAtLastError keeps it, cudaGetLastError
// returns and clears it, and the next launch runs.
TEST_F(Emu, LastErrorSemantics) {
  int ran = 0;
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  NYSTROM_LAUNCH(touch, 1, 2048, 0, nullptr)(&ran, 0);
  EXPECT_EQ(cudaPeekAtLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaPeekAtLastError(), cudaErrorInvalidConfiguration);
  // A launch that succeeds does not clear an earlier error either.
  NYSTROM_LAUNCH(touch, 1, 32, 0, nullptr)(&ran, 0);
  EXPECT_EQ(ran, 1);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidConfiguration);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);
  EXPECT_STREQ(cudaGetErrorString(cudaSuccess), "no error");
  EXPECT_STREQ(cudaGetErrorName(cudaErrorInvalidValue), "cudaErrorInvalidValue");
  // The runtime's text first, then the emulator's account of the last such error.
  NYSTROM_LAUNCH(touch, dim3(1, 70000), 1, 0, nullptr)(&ran, 0);
  const std::string text = cudaGetErrorString(cudaGetLastError());
  EXPECT_EQ(text.rfind("invalid configuration argument [emulator: launch of touch at ", 0), 0u) << text;
  EXPECT_NE(text.find("test_limits.cpp:"), std::string::npos) << text;
}

// ------------------------------------------------------ shared memory ----
TEST_F(Emu, DynamicSharedMemoryAbove48KiBNeedsTheAttribute) {
  int ran = 0;
  NYSTROM_LAUNCH(touch, 1, 32, 49152, nullptr)(&ran, 49152);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  NYSTROM_LAUNCH(touch, 1, 32, 49153, nullptr)(&ran, 49153);
  EXPECT_TRUE(failed_with(cudaErrorInvalidValue, {"49153 bytes of dynamic shared memory", "limit of 49152",
                                                   "without cudaFuncAttributeMaxDynamicSharedMemorySize"}));
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(ran, 1);
  ASSERT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, 100000), cudaSuccess);
  NYSTROM_LAUNCH(touch, 1, 32, 100000, nullptr)(&ran, 100000);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  NYSTROM_LAUNCH(touch, 1, 32, 100001, nullptr)(&ran, 100001);
  EXPECT_TRUE(failed_with(cudaErrorInvalidValue, {"limit of 100000", "its cudaFuncAttributeMaxDynamicSharedMemorySize"}));
  EXPECT_EQ(ran, 2);
}

// The opt-in limit: 227 KiB on sm90, 99 KiB on sm86.
TEST_F(Emu, OptInLimitPerProfile) {
  int ran = 0;
  const int big = 150 * 1024;
  EXPECT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, 232448), cudaSuccess);
  EXPECT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, 232449), cudaErrorInvalidValue);
  EXPECT_TRUE(failed_with(cudaErrorInvalidValue, {"cudaFuncSetAttribute(", "232448 bytes", "sm90"}));
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);  // a failed call leaves its error behind, as on a GPU
  EXPECT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, big), cudaSuccess);
  NYSTROM_LAUNCH(touch, 1, 32, big, nullptr)(&ran, big);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  EXPECT_EQ(ran, 1);

  ASSERT_TRUE(emu::set_arch("sm86"));
  emu::reset();  // a fresh context: attributes are gone
  EXPECT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, big), cudaErrorInvalidValue);
  EXPECT_TRUE(failed_with(cudaErrorInvalidValue, {"101376 bytes", "sm86", "RTX A6000"}));
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  NYSTROM_LAUNCH(touch, 1, 32, big, nullptr)(&ran, big);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, 101376), cudaSuccess);
  NYSTROM_LAUNCH(touch, 1, 32, 101376, nullptr)(&ran, 101376);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  EXPECT_EQ(ran, 2);
  EXPECT_FALSE(emu::set_arch("sm75"));
  EXPECT_STREQ(emu::profile().arch, "sm86");
}

__global__ void big_static(float* out) {
  NYSTROM_SHARED(float, a, [8192]);  // 32 KiB
  NYSTROM_SHARED(float, b, [8192]);  // another 32 KiB: 64 KiB in all
  a[threadIdx.x] = 1.0f;
  b[threadIdx.x] = 2.0f;
  out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}

TEST_F(Emu, StaticSharedMemoryAbove48KiB) {
  std::vector<float> out(32);
  NYSTROM_LAUNCH(big_static, 1, 32, 0, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorLaunchOutOfResources, {"big_static", "static shared memory reaches 65536 bytes"}));
  // A configuration error, not a fault of the device: not sticky.
  EXPECT_EQ(cudaGetLastError(), cudaErrorLaunchOutOfResources);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

__global__ void static_and_dynamic(float* out) {
  NYSTROM_SHARED(float, a, [10240]);  // 40 KiB
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  a[threadIdx.x] = 1.0f;
  smem_raw[threadIdx.x] = 1;
  out[threadIdx.x] = a[threadIdx.x];
}

// 40 KiB static + 16 KiB dynamic: more than 48 KiB without the attribute.
// The first launch finds the static size while it runs; later ones know it.
TEST_F(Emu, StaticPlusDynamicSharedMemory) {
  std::vector<float> out(32);
  NYSTROM_LAUNCH(static_and_dynamic, 1, 32, 16384, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorInvalidValue, {"40960 bytes of static and 16384 of dynamic"}));
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  NYSTROM_LAUNCH(static_and_dynamic, 1, 32, 16384, nullptr)(out.data());
  EXPECT_TRUE(failed_with(cudaErrorInvalidValue, {"limit of 8192", "48 KiB less its static shared memory"}));
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  NYSTROM_LAUNCH(static_and_dynamic, 1, 32, 8192, nullptr)(out.data());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  // The opt-in limit counts the static part too.
  EXPECT_EQ(cudaFuncSetAttribute(static_and_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize, 232448 - 40960),
            cudaSuccess);
  EXPECT_EQ(cudaFuncSetAttribute(static_and_dynamic, cudaFuncAttributeMaxDynamicSharedMemorySize, 232448 - 40959),
            cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
}

// ----------------------------------------------------- device attributes ----
TEST_F(Emu, DeviceAttributesFollowTheProfile) {
  int v = 0, device = -1;
  ASSERT_EQ(cudaGetDevice(&device), cudaSuccess);
  EXPECT_EQ(device, 0);
  ASSERT_EQ(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  EXPECT_EQ(v, 132);
  ASSERT_EQ(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), cudaSuccess);
  EXPECT_EQ(v, 232448);
  ASSERT_TRUE(emu::set_arch("sm86"));
  ASSERT_EQ(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  EXPECT_EQ(v, 84);
  ASSERT_EQ(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0), cudaSuccess);
  EXPECT_EQ(v, 101376);
  ASSERT_EQ(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMinor, 0), cudaSuccess);
  EXPECT_EQ(v, 6);
  EXPECT_EQ(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 1), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaSetDevice(0), cudaSuccess);
  EXPECT_EQ(cudaSetDevice(1), cudaErrorInvalidDevice);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidDevice);
}

// ------------------------------------------------------------ occupancy ----
// cudaOccupancyMaxActiveBlocksPerMultiprocessor by the profile's threads,
// blocks and shared memory per SM (1 KiB reserved per block); registers are
// not modelled.
TEST_F(Emu, OccupancyFollowsTheProfile) {
  int n = -1;
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 128, 0), cudaSuccess);
  EXPECT_EQ(n, 16);  // 2048 threads
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 32, 0), cudaSuccess);
  EXPECT_EQ(n, 32);  // 32 blocks
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 100, 0), cudaSuccess);
  EXPECT_EQ(n, 16);  // whole warps: 128 threads' worth
  // above 48 KiB only once opted in; then 228 KiB per SM
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 128, 112 * 1024), cudaSuccess);
  EXPECT_EQ(n, 0);
  ASSERT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, 150 * 1024), cudaSuccess);
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 128, 112 * 1024), cudaSuccess);
  EXPECT_EQ(n, 2);  // the tensor-core query pass at D = Dv = 128
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 128, 72 * 1024), cudaSuccess);
  EXPECT_EQ(n, 3);  // at D = Dv = 64
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 128, 151 * 1024), cudaSuccess);
  EXPECT_EQ(n, 0);  // above the opt-in
  // static shared memory counts once a launch has shown it
  std::vector<float> out(32);
  NYSTROM_LAUNCH(static_and_dynamic, 1, 32, 8192, nullptr)(out.data());
  ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, static_and_dynamic, 32, 8192), cudaSuccess);
  EXPECT_EQ(n, 4);  // 233472 / (40960 + 8192 + 1024)
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, static_and_dynamic, 32, 8193), cudaSuccess);
  EXPECT_EQ(n, 0);  // above 48 KiB less the static part, not opted in
  // bad arguments
  EXPECT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 0, 0), cudaErrorInvalidValue);
  EXPECT_TRUE(failed_with(cudaErrorInvalidValue, {"block size 0", "1..1024"}));
  EXPECT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 1025, 0), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  EXPECT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(nullptr, touch, 128, 0), cudaErrorInvalidValue);
  EXPECT_EQ(cudaGetLastError(), cudaErrorInvalidValue);
  // sm86: 1536 threads, 16 blocks, 100 KiB per SM
  ASSERT_TRUE(emu::set_arch("sm86"));
  emu::reset();
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 128, 0), cudaSuccess);
  EXPECT_EQ(n, 12);
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 32, 0), cudaSuccess);
  EXPECT_EQ(n, 16);
  ASSERT_EQ(cudaFuncSetAttribute(touch, cudaFuncAttributeMaxDynamicSharedMemorySize, 72 * 1024), cudaSuccess);
  ASSERT_EQ(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, touch, 128, 72 * 1024), cudaSuccess);
  EXPECT_EQ(n, 1);
}

// ------------------------------------------------------------ schedules ----
TEST_F(Emu, ScheduleParsing) {
  emu::Schedule s;
  ASSERT_TRUE(emu::parse_schedule("inorder", &s));
  EXPECT_EQ(s.order, emu::Order::kInOrder);
  ASSERT_TRUE(emu::parse_schedule("reversed", &s));
  EXPECT_EQ(s.order, emu::Order::kReversed);
  ASSERT_TRUE(emu::parse_schedule("random:42", &s));
  EXPECT_EQ(s.order, emu::Order::kRandom);
  EXPECT_EQ(s.seed, 42u);
  EXPECT_EQ(s.str(), "random:42");
  EXPECT_FALSE(emu::parse_schedule("random:", &s));
  EXPECT_FALSE(emu::parse_schedule("random:x1", &s));
  EXPECT_FALSE(emu::parse_schedule("backwards", &s));
}

// Record the order in which the threads of a block first run.
__global__ void first_order(int* order, int* next) {
  order[(*next)++] = static_cast<int>(threadIdx.x);
}

TEST_F(Emu, SchedulesOrderTheThreads) {
  auto run = [](const emu::Schedule& s) {
    emu::set_schedule(s);
    std::vector<int> order(64, -1);
    int next = 0;
    NYSTROM_LAUNCH(first_order, 1, 64, 0, nullptr)(order.data(), &next);
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    return order;
  };
  const std::vector<int> in = run(emu::Schedule{emu::Order::kInOrder, 0});
  const std::vector<int> rev = run(emu::Schedule{emu::Order::kReversed, 0});
  const std::vector<int> r1 = run(emu::Schedule{emu::Order::kRandom, 1});
  const std::vector<int> r1again = run(emu::Schedule{emu::Order::kRandom, 1});
  const std::vector<int> r2 = run(emu::Schedule{emu::Order::kRandom, 2});
  for (int i = 0; i < 64; ++i) {
    EXPECT_EQ(in[static_cast<std::size_t>(i)], i);
    EXPECT_EQ(rev[static_cast<std::size_t>(i)], 63 - i);
  }
  EXPECT_EQ(r1, r1again);  // reproducible
  EXPECT_NE(r1, r2);
  EXPECT_NE(r1, in);
  std::vector<int> sorted = r1;
  std::sort(sorted.begin(), sorted.end());
  EXPECT_EQ(sorted, in);  // a permutation
}

}  // namespace
