// The op and the layer on the CUDA backend (NystromCuda: GPU scripts select
// these names), against the float64 CPU reference: on CUDA tensors, skipped
// where there is no GPU (the library still compiles its CUDA kernels); or,
// built into nystrom_cpp_tests_emulated (NYSTROM_TEST_EMULATED, linked
// against the emulated CUDA backend), on the CPU tensors that backend serves.
#include "test_util.h"

#include <nystrom/nystrom.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

namespace {

using namespace nystrom_test;

#if defined(NYSTROM_TEST_EMULATED)
// The emulated CUDA backend serves CPU tensors; no CPU backend in this process.
const torch::Device kBackend(torch::kCPU);
constexpr bool kEmulated = true;
#define NYSTROM_REQUIRE_CUDA() \
  do {                         \
  } while (0)
#else
const torch::Device kBackend(torch::kCUDA);
constexpr bool kEmulated = false;
#define NYSTROM_REQUIRE_CUDA()                                   \
  do {                                                           \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)
#endif

Tensor on_backend(const Tensor& t) { return t.to(kBackend); }

TEST(NystromCuda, ForwardAndGradientsMatchReferenceWithPadding) {
  NYSTROM_REQUIRE_CUDA();
  torch::manual_seed(40);
  const int64_t L = 45, S = 39;
  const auto [q0, k0, v0] = random_qkv(4, 3, L, S, 24, 20);
  const Tensor qmask = make_mask(L), kmask = make_mask(S);
  for (const char* init : {"per_head", "original"}) {
    for (const int64_t m : {6, 17, 64}) {
      RefConfig cfg;
      cfg.num_landmarks = m;
      cfg.pinv_init = init;
      const std::string what = std::string(init) + ", m=" + std::to_string(m);
      const Tensor q = leaf(on_backend(q0)), k = leaf(on_backend(k0)), v = leaf(on_backend(v0));
      const Tensor out = call_op(q, k, v, cfg, on_backend(kmask), on_backend(qmask));
      ASSERT_EQ(out.device(), kBackend);
      const Tensor qr = leaf(q0), kr = leaf(k0), vr = leaf(v0);
      const Tensor expected = reference(qr, kr, vr, cfg, kmask, qmask);
      expect_close(out.cpu(), expected, 1e-7, 1e-9, "CUDA forward float64, " + what);
      torch::manual_seed(41);
      const Tensor grad_out = torch::randn_like(expected);
      out.backward(on_backend(grad_out));
      const auto grads = torch::autograd::grad({expected}, {qr, kr, vr}, {grad_out});
      expect_close(q.grad().cpu(), grads[0], 1e-6, 1e-8, "CUDA grad query, " + what);
      expect_close(k.grad().cpu(), grads[1], 1e-6, 1e-8, "CUDA grad key, " + what);
      expect_close(v.grad().cpu(), grads[2], 1e-6, 1e-8, "CUDA grad value, " + what);
    }
  }
}

TEST(NystromCuda, Float32AndHalfPrecisionMatchCpu) {
  NYSTROM_REQUIRE_CUDA();
  torch::manual_seed(42);
  const auto [q, k, v] = random_qkv(2, 4, 300, 257, 64, 64, torch::kFloat32);
  RefConfig cfg;
  cfg.num_landmarks = 32;
  // The CPU backend's result; the emulated backend has none in its process: the float64 reference.
  const Tensor cpu = kEmulated ? reference(q.to(torch::kFloat64), k.to(torch::kFloat64), v.to(torch::kFloat64), cfg)
                                     .to(torch::kFloat32)
                               : call_op(q, k, v, cfg);
  expect_close_scaled(call_op(on_backend(q), on_backend(k), on_backend(v), cfg).cpu(), cpu, 1e-4,
                      "CUDA float32 vs CPU");
  for (const auto dtype : {torch::kFloat16, torch::kBFloat16}) {
    const Tensor out = call_op(on_backend(q).to(dtype), on_backend(k).to(dtype), on_backend(v).to(dtype), cfg);
    EXPECT_EQ(out.scalar_type(), dtype);
    expect_close_scaled(out.cpu().to(torch::kFloat32), cpu, 3e-2, "CUDA half precision vs CPU float32");
  }
}

TEST(NystromCuda, ModuleTrainsOnCuda) {
  NYSTROM_REQUIRE_CUDA();
  torch::manual_seed(43);
  nystrom::NystromAttention mod(nystrom::NystromAttentionOptions(32, 4).num_landmarks(8));
  mod->to(kBackend);
  const Tensor x = torch::randn({3, 50, 32}, kBackend);
  Tensor mask = torch::zeros({3, 50}, torch::TensorOptions().dtype(torch::kBool).device(kBackend));
  mask[2].slice(0, 41, 50).fill_(true);
  const Tensor out = mod(x, mask);
  EXPECT_EQ(out.device(), kBackend);
  out.pow(2).mean().backward();
  for (const auto& p : mod->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
  }
}

}  // namespace
