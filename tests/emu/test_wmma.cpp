// nvcuda::wmma in the emulator: 16x16x16 products of __half and
// __nv_bfloat16 tiles (a and b row_major and col_major, accumulation onto a loaded
// C, row- and column-major stores) against a float64 loop over the same
// rounded inputs, and the warp-collective errors.
#include "emu_test.h"

#include <cstdint>
#include <random>

namespace {

namespace wmma = nvcuda::wmma;

// D = C + A·B over K = 16·kt: A (16 x K) in layout LA, B (K x 16) in layout
// LB, C and D (16 x 16 float) in the memory layout `rowmajor` says.
template <typename T, typename LB, typename LA = wmma::row_major>
__global__ void tile_product(const T* a, const T* b, const float* c, float* d, int kt, bool rowmajor) {
  const wmma::layout_t mem = rowmajor ? wmma::mem_row_major : wmma::mem_col_major;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  if (c != nullptr) {
    wmma::load_matrix_sync(acc, c, 16, mem);
  } else {
    wmma::fill_fragment(acc, 0.0f);
  }
  const int K = 16 * kt;
  for (int t = 0; t < kt; ++t) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
    // row_major A is 16 x K (ld K); col_major A is stored as its transpose, K x 16 (ld 16).
    if (std::is_same<LA, wmma::row_major>::value) {
      wmma::load_matrix_sync(fa, a + 16 * t, K);
    } else {
      wmma::load_matrix_sync(fa, a + 16 * 16 * t, 16);
    }
    // row_major B is K x 16 (ld 16); col_major B is stored as its transpose, 16 x K (ld K).
    if (std::is_same<LB, wmma::row_major>::value) {
      wmma::load_matrix_sync(fb, b + 16 * 16 * t, 16);
    } else {
      wmma::load_matrix_sync(fb, b + 16 * t, K);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(d, acc, 16, mem);
}

template <typename T>
float widen(T x);
template <>
float widen(__half x) {
  return __half2float(x);
}
template <>
float widen(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
T narrow(float x);
template <>
__half narrow(float x) {
  return __float2half_rn(x);
}
template <>
__nv_bfloat16 narrow(float x) {
  return __float2bfloat16_rn(x);
}

// Tiles must be 256-bit aligned (std::vector guarantees 16 bytes).
template <typename T>
struct Aligned {
  explicit Aligned(std::size_t n) : v(n + 32 / sizeof(T)) {
    const auto at = reinterpret_cast<std::uintptr_t>(v.data());
    p = v.data() + ((32 - at % 32) % 32) / sizeof(T);
  }
  T* data() { return p; }
  T& operator[](std::size_t i) { return p[i]; }
  std::vector<T> v;
  T* p;
};

template <typename T, typename LB, typename LA = wmma::row_major>
void check_product(bool with_c, bool rowmajor) {
  const int kt = 3, K = 16 * kt;
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  Aligned<T> a(16 * K), b(K * 16);
  Aligned<float> c(256);
  for (int i = 0; i < 16 * K; ++i) a[static_cast<std::size_t>(i)] = narrow<T>(u(gen));
  for (int i = 0; i < 16 * K; ++i) b[static_cast<std::size_t>(i)] = narrow<T>(u(gen));
  for (std::size_t i = 0; i < 256; ++i) c[i] = u(gen);
  const bool col_b = std::is_same<LB, wmma::col_major>::value;
  const bool col_a = std::is_same<LA, wmma::col_major>::value;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    Aligned<float> d(256);
    emu::poison(d.data(), 256 * sizeof(float));
    NYSTROM_LAUNCH((tile_product<T, LB, LA>), 1, 32, 0, nullptr)(a.data(), b.data(), with_c ? c.data() : nullptr,
                                                            d.data(), kt, rowmajor);
    ASSERT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        const int cij = rowmajor ? i * 16 + j : j * 16 + i;
        double ref = with_c ? c[static_cast<std::size_t>(cij)] : 0.0;
        for (int k = 0; k < K; ++k) {
          const T bk = col_b ? b[static_cast<std::size_t>(j * K + k)] : b[static_cast<std::size_t>(k * 16 + j)];
          const T ak = col_a ? a[static_cast<std::size_t>(k * 16 + i)] : a[static_cast<std::size_t>(i * K + k)];
          ref += static_cast<double>(widen(ak)) * widen(bk);
        }
        EXPECT_NEAR(d[static_cast<std::size_t>(cij)], ref, 1e-4 * (1.0 + std::abs(ref))) << s.str() << " " << i << "," << j;
      }
  }
}

TEST_F(Emu, WmmaHalfRowMajorB) { check_product<__half, wmma::row_major>(false, true); }
TEST_F(Emu, WmmaHalfColMajorB) { check_product<__half, wmma::col_major>(true, true); }
TEST_F(Emu, WmmaBf16RowMajorB) { check_product<__nv_bfloat16, wmma::row_major>(true, false); }
TEST_F(Emu, WmmaBf16ColMajorB) { check_product<__nv_bfloat16, wmma::col_major>(false, false); }
// col_major A (the transpose of a stored tile: the backward's dSᵀ·X, backward_tc_kernels.cuh)
TEST_F(Emu, WmmaHalfColMajorA) { check_product<__half, wmma::row_major, wmma::col_major>(true, true); }
TEST_F(Emu, WmmaBf16ColMajorAB) { check_product<__nv_bfloat16, wmma::col_major, wmma::col_major>(false, true); }

// Exact in any summation order: products of ones.
TEST_F(Emu, WmmaOnesGiveExactSums) {
  Aligned<__half> a(256), b(256);
  Aligned<float> d(256);
  for (std::size_t i = 0; i < 256; ++i) a[i] = b[i] = __float2half_rn(1.0f);
  NYSTROM_LAUNCH((tile_product<__half, wmma::row_major>), 1, 32, 0, nullptr)(a.data(), b.data(), nullptr, d.data(), 1,
                                                                          true);
  ASSERT_EQ(cudaGetLastError(), cudaSuccess);
  for (std::size_t i = 0; i < 256; ++i) EXPECT_EQ(d[i], 16.0f);
}

// ------------------------------------------------- __syncwarp and WMMA ----
// A fragment is spread over the lanes: a load reads the calling lane's share
// when that lane gets there, a store writes it. Data other lanes stage in
// shared memory needs a __syncwarp before the load, and a stored tile one
// before other lanes read it; without it some schedule reads poison.
template <bool kSyncBeforeLoad, bool kSyncAfterStore>
__global__ void stage_multiply_read(const __half* src, float* out) {
  NYSTROM_DYNAMIC_SHARED(smem_raw);
  auto* s = reinterpret_cast<__half*>(smem_raw);                      // 16 x 16 __half
  auto* t = reinterpret_cast<float*>(smem_raw + 256 * sizeof(__half));  // 16 x 16 float
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) s[i] = src[i];
  if (kSyncBeforeLoad) __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(a, s, 16);
  wmma::load_matrix_sync(b, src, 16);
  wmma::fill_fragment(acc, 0.0f);
  wmma::mma_sync(acc, a, b, acc);
  wmma::store_matrix_sync(t, acc, 16, wmma::mem_row_major);
  if (kSyncAfterStore) __syncwarp();
  for (int i = lane; i < 256; i += 32) out[i] = t[i];
}

TEST_F(Emu, WmmaNeedsSyncwarpAroundSharedMemory) {
  Aligned<__half> src(256);
  for (std::size_t i = 0; i < 256; ++i) src[i] = __float2half_rn(static_cast<float>(i % 5) - 2.0f);
  const std::size_t smem = 256 * sizeof(__half) + 256 * sizeof(float);
  auto run = [&](auto kernel) {
    std::vector<float> out(256);
    emu::poison(out.data(), out.size() * sizeof(float));
    NYSTROM_LAUNCH(kernel, 1, 32, smem, nullptr)(src.data(), out.data());
    EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
    return out;
  };
  int missing_before = 0, missing_after = 0;
  for (const emu::Schedule& s : emu::standard_schedules()) {
    emu::set_schedule(s);
    const std::vector<float> good = run(stage_multiply_read<true, true>);
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        double ref = 0.0;  // s · srcᵀ (b is src read column-major)
        for (int k = 0; k < 16; ++k) ref += static_cast<double>(__half2float(src[static_cast<std::size_t>(i * 16 + k)])) *
                                            __half2float(src[static_cast<std::size_t>(j * 16 + k)]);
        EXPECT_EQ(good[static_cast<std::size_t>(i * 16 + j)], ref) << s.str();
      }
    if (any_nan(run(stage_multiply_read<false, true>))) ++missing_before;
    if (any_nan(run(stage_multiply_read<true, false>))) ++missing_after;
  }
  EXPECT_GE(missing_before, 1);
  EXPECT_GE(missing_after, 1);
}

// ------------------------------------------------------------ misuse ----
__global__ void wmma_in_branch(const __half* a, float* d) {
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  if (threadIdx.x < 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a, 16);
  }
  wmma::store_matrix_sync(d, acc, 16, wmma::mem_row_major);
}

TEST_F(Emu, WmmaInALaneDependentBranchIsAnError) {
  alignas(32) __half a[256];
  alignas(32) float d[256];
  NYSTROM_LAUNCH(wmma_in_branch, 1, 32, 0, nullptr)(a, d);
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"wmma_in_branch", "divergent WMMA", "wmma::store_matrix_sync",
                                                    "wmma::load_matrix_sync", "test_wmma.cpp:"}));
}

__global__ void wmma_lane_pointer(const __half* a, int ld) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a + (threadIdx.x % 2) * 16, ld);
}

TEST_F(Emu, WmmaWithLaneDependentPointerIsAnError) {
  alignas(32) __half a[16 * 32];
  NYSTROM_LAUNCH(wmma_lane_pointer, 1, 32, 0, nullptr)(a, 32);
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"wmma::load_matrix_sync", "lane 1: passes a different pointer"}));
}

__global__ void wmma_misaligned(const __half* a, int ld) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a, ld);
}

TEST_F(Emu, WmmaAlignmentIsChecked) {
  alignas(32) __half a[16 * 40];
  NYSTROM_LAUNCH(wmma_misaligned, 1, 32, 0, nullptr)(a + 8, 16);
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"not 256-bit aligned"}));
  emu::reset();
  NYSTROM_LAUNCH(wmma_misaligned, 1, 32, 0, nullptr)(a, 20);
  EXPECT_TRUE(failed_with(cudaErrorLaunchFailure, {"ldm = 20 is not a multiple of 16 bytes"}));
}

}  // namespace

// ------------------------------------------------ shared-memory traffic ----
// The bank model of cuda/emu/wmma.h, counted per launch: a 16-bit tile with a
// 128-byte line pitch takes 8 wavefronts per instruction (every line on the
// same 4 banks), a pitch 16 bytes longer 1; a float tile with a 256-byte pitch
// 4 per half warp, a pitch 32 bytes longer 1. Loads from global memory are
// not counted.
namespace bank_model {
namespace wmma = nvcuda::wmma;

template <int LDH, int LDF>
__global__ void tile_traffic(const __half* g, float* out) {
  NYSTROM_SHARED(__half, sh, [16 * LDH]);
  NYSTROM_SHARED(float, sf, [16 * LDF]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 16 * LDH; i += 32) sh[i] = g[i % 256];
  for (int i = lane; i < 16 * LDF; i += 32) sf[i] = 0.0f;
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
  wmma::load_matrix_sync(a, sh, LDH);
  wmma::load_matrix_sync(b, g, 16);  // global memory: not counted
  wmma::load_matrix_sync(c, sf, LDF, wmma::mem_row_major);
  wmma::mma_sync(c, a, b, c);
  wmma::store_matrix_sync(sf, c, LDF, wmma::mem_row_major);
  __syncwarp();
  for (int i = lane; i < 256; i += 32) out[i] = sf[(i / 16) * LDF + i % 16];
}

struct Counts {
  std::uint64_t requests = 0, wavefronts = 0, ideal = 0;
};

template <int LDH, int LDF>
Counts run(int blocks) {
  auto find = [] {
    for (const auto& c : emu::kernel_bank_traffic()) {
      if (c.name.find("tile_traffic<" + std::to_string(LDH) + ", " + std::to_string(LDF) + ">") != std::string::npos)
        return Counts{c.requests, c.wavefronts, c.ideal};
    }
    return Counts{};
  };
  const Counts before = find();
  alignas(32) __half g[256];  // WMMA operands are 256-bit aligned
  for (int i = 0; i < 256; ++i) g[i] = __float2half(static_cast<float>(i % 7));
  std::vector<float> out(256);
  for (int b = 0; b < blocks; ++b) {
    NYSTROM_LAUNCH((tile_traffic<LDH, LDF>), 1, 32, 0, nullptr)(g, out.data());
    EXPECT_EQ(cudaGetLastError(), cudaSuccess) << emu::last_error_detail();
  }
  const Counts after = find();
  return Counts{after.requests - before.requests, after.wavefronts - before.wavefronts, after.ideal - before.ideal};
}
}  // namespace bank_model

TEST_F(Emu, WmmaBankModelCountsConflictsOfAlignedPitches) {
  // One shared half load, one float load, one float store per launch: 12 instructions.
  const bank_model::Counts aligned = bank_model::run<64, 64>(2);
  EXPECT_EQ(aligned.requests, 24u);
  EXPECT_EQ(aligned.ideal, 2u * (4 + 8 + 8));           // half: 1 per instruction; float: 1 per half warp
  EXPECT_EQ(aligned.wavefronts, 2u * (4 * 8 + 2 * 4 * 8));  // 8-way; 4-way in each half warp
  const bank_model::Counts padded = bank_model::run<72, 72>(2);
  EXPECT_EQ(padded.requests, 24u);
  EXPECT_EQ(padded.wavefronts, padded.ideal);
  const bank_model::Counts float_pad4 = bank_model::run<72, 68>(1);  // 16 bytes more per float line: 2-way
  EXPECT_EQ(float_pad4.wavefronts, 4u + 2 * 2 * 8);
}
