// Speed of the CUDA emulation (not a test: prints figures).
//   1. Context switches per second: the emulator's own switch (x86-64 asm,
//      or ucontext when built with NYSTROM_EMU_UCONTEXT), glibc swapcontext,
//      and Boost.Context's fcontext when built with NYSTROM_BENCH_BOOST.
//   2. Blocks per second of toy kernels: 256 threads and 50 __syncthreads per
//      block; 256 threads and 40 warp sums (200 shuffles) per block; one warp
//      doing 64 WMMA tile products.
// Usage: emu_bench [scale]   (scale multiplies the work; default 1)
#include "fiber.h"
#include "seams.h"

#include <ucontext.h>

#include <chrono>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <vector>

#if defined(NYSTROM_BENCH_BOOST)
#include <boost/context/detail/fcontext.hpp>
#endif

namespace {

namespace d = nystrom::emu::detail;
namespace emu = nystrom::emu;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ----------------------------------------------------------- switches ----
d::Context g_main, g_fiber;
void ping() {
  d::on_fiber_start();
  for (;;) d::jump(g_fiber, g_main);
}

double emulator_switches(long n) {
  d::StackPool stacks(64 * 1024);
  stacks.reserve(1);
  d::adopt_thread(g_main);
  d::prepare(g_fiber, stacks.lo(0), stacks.size(), &ping);
  const auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) d::jump(g_main, g_fiber);
  return 2.0 * static_cast<double>(n) / seconds_since(t0);
}

ucontext_t g_uc_main, g_uc_fiber;
void uc_ping() {
  for (;;) swapcontext(&g_uc_fiber, &g_uc_main);
}

double ucontext_switches(long n) {
  std::vector<char> stack(64 * 1024);
  getcontext(&g_uc_fiber);
  g_uc_fiber.uc_stack.ss_sp = stack.data();
  g_uc_fiber.uc_stack.ss_size = stack.size();
  g_uc_fiber.uc_link = nullptr;
  makecontext(&g_uc_fiber, uc_ping, 0);
  const auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) swapcontext(&g_uc_main, &g_uc_fiber);
  return 2.0 * static_cast<double>(n) / seconds_since(t0);
}

#if defined(NYSTROM_BENCH_BOOST)
namespace bc = boost::context::detail;
void fc_ping(bc::transfer_t t) {
  for (;;) t = bc::jump_fcontext(t.fctx, nullptr);
}

double boost_switches(long n) {
  std::vector<char> stack(64 * 1024);
  bc::fcontext_t f = bc::make_fcontext(stack.data() + stack.size(), stack.size(), fc_ping);
  const auto t0 = Clock::now();
  for (long i = 0; i < n; ++i) f = bc::jump_fcontext(f, nullptr).fctx;
  return 2.0 * static_cast<double>(n) / seconds_since(t0);
}
#endif

// ------------------------------------------------------------ kernels ----
constexpr int kThreads = 256;

__global__ void barriers50(float* out) {
  NYSTROM_SHARED(float, s, [kThreads]);
  const int t = threadIdx.x;
  float x = static_cast<float>(t);
  for (int i = 0; i < 50; ++i) {
    s[t] = x;
    __syncthreads();
    x += s[(t + 1) % kThreads] * 0.5f;
    if (i + 1 < 50) continue;
  }
  out[blockIdx.x * kThreads + t] = x;
}

__global__ void shuffles200(float* out) {
  float x = static_cast<float>(threadIdx.x);
  for (int i = 0; i < 40; ++i) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    x *= 0.01f;
  }
  out[blockIdx.x * kThreads + threadIdx.x] = x;
}

__global__ void wmma64(const __half* a, const __half* b, float* d) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  for (int i = 0; i < 64; ++i) wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d + blockIdx.x * 256, acc, 16, wmma::mem_row_major);
}

template <class Launch>
void blocks_per_second(const char* what, int blocks, int threads, Launch launch) {
  emu::set_threads(threads);
  launch(1);  // warm: stacks mapped and touched
  const emu::Stats s0 = emu::stats();
  const auto t0 = Clock::now();
  launch(blocks);
  const double dt = seconds_since(t0);
  const emu::Stats s1 = emu::stats();
  if (cudaGetLastError() != cudaSuccess) {
    std::printf("%s: failed: %s\n", what, emu::last_error_detail().c_str());
    std::exit(1);
  }
  std::printf("%-44s %d OS thread(s): %9.0f blocks/s, %6.1f M fiber switches/s\n", what, threads,
              blocks / dt, static_cast<double>(s1.switches - s0.switches) / dt / 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  const int scale = argc > 1 ? std::max(1, std::min(20, std::atoi(argv[1]))) : 1;
  std::printf("context switches (ping-pong between two contexts):\n");
  std::printf("  emulator (%s): %8.1f M switches/s\n", d::switch_mechanism(), emulator_switches(10000000L * scale) / 1e6);
  std::printf("  glibc swapcontext:      %8.1f M switches/s\n", ucontext_switches(1000000L * scale) / 1e6);
#if defined(NYSTROM_BENCH_BOOST)
  std::printf("  Boost.Context fcontext: %8.1f M switches/s\n", boost_switches(10000000L * scale) / 1e6);
#endif
  const int blocks = 200 * scale;
  std::vector<float> out(static_cast<std::size_t>(blocks) * kThreads);
  for (int threads : {1, 2}) {
    blocks_per_second("256 threads, 50 __syncthreads per block", blocks, threads, [&](int n) {
      NYSTROM_LAUNCH(barriers50, n, kThreads, 0, nullptr)(out.data());
    });
  }
  for (int threads : {1, 2}) {
    blocks_per_second("256 threads, 200 __shfl_xor_sync per block", blocks, threads, [&](int n) {
      NYSTROM_LAUNCH(shuffles200, n, kThreads, 0, nullptr)(out.data());
    });
  }
  alignas(32) static __half a[256], b[256];
  alignas(32) static float d[256 * 4000];
  for (int i = 0; i < 256; ++i) a[i] = b[i] = __float2half_rn(0.01f * static_cast<float>(i % 7));
  for (int threads : {1, 2}) {
    blocks_per_second("32 threads, 64 wmma::mma_sync per block", blocks, threads, [&](int n) {
      NYSTROM_LAUNCH(wmma64, n, 32, 0, nullptr)(a, b, d);
    });
  }
  return 0;
}
