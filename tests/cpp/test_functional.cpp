// The functional C++ API against the float64 reference (reference.h): the
// parameterised shapes (NystromCase), then NystromFunctional: exact attention,
// scale, strides, the raw forward/backward ops, partial and no gradients,
// reduced precision, the refusal of double backward.
#include "test_util.h"

#include <nystrom/nystrom.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

namespace {

using namespace nystrom_test;

// ----------------------------------------------- parameterized functional -----

struct Case {
  const char* name;
  int64_t B, H, L, S, D, Dv, m, iters;
  const char* init;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.name << "{B=" << c.B << " H=" << c.H << " L=" << c.L << " S=" << c.S
            << " D=" << c.D << " Dv=" << c.Dv << " m=" << c.m << " iters=" << c.iters
            << " init=" << c.init << "}";
}

class NystromCase : public ::testing::TestWithParam<Case> {
 protected:
  RefConfig cfg() const {
    RefConfig r;
    r.num_landmarks = GetParam().m;
    r.pinv_iterations = GetParam().iters;
    r.pinv_init = GetParam().init;
    return r;
  }
  QKV inputs(torch::Dtype dtype) const {
    const Case& c = GetParam();
    torch::manual_seed(1234);
    return random_qkv(c.B, c.H, c.L, c.S, c.D, c.Dv, dtype);
  }
};

TEST_P(NystromCase, ForwardFloat64MatchesReference) {
  const auto [q, k, v] = inputs(kF64);
  const Tensor out = call_op(q, k, v, cfg());
  EXPECT_EQ(out.scalar_type(), kF64);
  expect_close(out, reference(q, k, v, cfg()), 1e-7, 1e-9, "forward float64");
}

TEST_P(NystromCase, ForwardFloat32MatchesReference) {
  const auto [q, k, v] = inputs(torch::kFloat32);
  const Tensor out = call_op(q, k, v, cfg());
  EXPECT_EQ(out.scalar_type(), torch::kFloat32);
  expect_close_scaled(out, reference(q, k, v, cfg()), 2e-4, "forward float32");
}

TEST_P(NystromCase, BackwardFloat64MatchesAutogradOfReference) {
  const auto [q0, k0, v0] = inputs(kF64);
  const Tensor q = leaf(q0), k = leaf(k0), v = leaf(v0);
  const Tensor out = call_op(q, k, v, cfg());
  torch::manual_seed(99);
  const Tensor grad_out = torch::randn_like(out);
  out.backward(grad_out);

  const Tensor qr = leaf(q0), kr = leaf(k0), vr = leaf(v0);
  const Tensor ref = reference(qr, kr, vr, cfg());
  const auto grads = torch::autograd::grad({ref}, {qr, kr, vr}, {grad_out});
  expect_close(q.grad(), grads[0], 1e-6, 1e-8, "grad query");
  expect_close(k.grad(), grads[1], 1e-6, 1e-8, "grad key");
  expect_close(v.grad(), grads[2], 1e-6, 1e-8, "grad value");
}

TEST_P(NystromCase, BackwardFloat32MatchesFloat64Reference) {
  const auto [q0, k0, v0] = inputs(torch::kFloat32);
  const Tensor q = leaf(q0), k = leaf(k0), v = leaf(v0);
  const Tensor out = call_op(q, k, v, cfg());
  torch::manual_seed(99);
  const Tensor grad_out = torch::randn_like(out);
  out.backward(grad_out);
  EXPECT_EQ(q.grad().scalar_type(), torch::kFloat32);

  const Tensor qr = leaf(q0.to(kF64)), kr = leaf(k0.to(kF64)), vr = leaf(v0.to(kF64));
  const Tensor ref = reference(qr, kr, vr, cfg());
  const auto grads = torch::autograd::grad({ref}, {qr, kr, vr}, {grad_out.to(kF64)});
  expect_close_scaled(q.grad(), grads[0], 2e-3, "grad query (float32)");
  expect_close_scaled(k.grad(), grads[1], 2e-3, "grad key (float32)");
  expect_close_scaled(v.grad(), grads[2], 2e-3, "grad value (float32)");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, NystromCase,
    ::testing::Values(
        // Odd sizes, unequal segments (37 tokens into 5 landmarks), Dv != D.
        Case{"odd", 2, 3, 37, 37, 11, 7, 5, 6, "per_head"},
        // Landmarks divide the length: equal segments.
        Case{"equal_segments", 1, 2, 48, 48, 16, 16, 8, 6, "per_head"},
        // Cross-attention, S != L, both longer than m.
        Case{"cross", 2, 2, 23, 41, 9, 5, 6, 6, "per_head"},
        // The paper's initial scale, one maximum over batch and heads.
        Case{"original_init", 3, 2, 29, 29, 8, 8, 4, 6, "original"},
        Case{"original_init_cross", 2, 3, 19, 33, 7, 6, 5, 4, "original"},
        // No Newton–Schulz step: Z = A^T / c.
        Case{"zero_iterations", 2, 1, 17, 17, 5, 3, 4, 0, "per_head"},
        Case{"one_landmark", 2, 2, 31, 31, 6, 6, 1, 3, "per_head"},
        Case{"many_iterations", 1, 2, 40, 40, 8, 8, 7, 12, "per_head"},
        // Fewer queries than landmarks but more keys: q landmarks are the queries.
        Case{"short_queries", 2, 2, 5, 30, 7, 7, 8, 6, "per_head"},
        Case{"short_keys", 2, 2, 30, 5, 7, 7, 8, 6, "per_head"},
        // Landmarks cover the sequence: exact attention.
        Case{"m_equals_L", 2, 3, 13, 13, 7, 5, 13, 6, "per_head"},
        Case{"m_exceeds_L_S", 2, 3, 13, 9, 7, 5, 20, 6, "original"},
        Case{"single_token", 2, 2, 1, 1, 4, 3, 3, 6, "per_head"}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

// ------------------------------------------------------ functional extras -----

TEST(NystromFunctional, ExactSoftmaxAttentionWhenLandmarksCoverSequence) {
  torch::manual_seed(0);
  const auto [q, k, v] = random_qkv(2, 3, 11, 9, 6, 5);
  const double scale = 1.0 / std::sqrt(6.0);
  const Tensor dense = torch::softmax(scale * q.matmul(k.transpose(-1, -2)), -1).matmul(v);
  expect_close(nystrom::nystrom_attention(q, k, v, /*num_landmarks=*/11), dense, 1e-9, 1e-11,
               "m == L > S");
  expect_close(nystrom::nystrom_attention(q, k, v, /*num_landmarks=*/64), dense, 1e-9, 1e-11,
               "m = 64 (default)");
  expect_close(nystrom::nystrom_attention(q, k, v), dense, 1e-9, 1e-11, "default arguments");
}

TEST(NystromFunctional, CustomScale) {
  torch::manual_seed(1);
  const auto [q, k, v] = random_qkv(2, 2, 27, 27, 10, 6);
  RefConfig cfg;
  cfg.num_landmarks = 4;
  cfg.scale = 0.7;
  expect_close(call_op(q, k, v, cfg), reference(q, k, v, cfg), 1e-7, 1e-9, "scale = 0.7");
  // Default scale is D^-0.5.
  RefConfig explicit_default = cfg;
  explicit_default.scale = 1.0 / std::sqrt(10.0);
  RefConfig implicit_default = cfg;
  implicit_default.scale = std::nullopt;
  expect_close(call_op(q, k, v, implicit_default), call_op(q, k, v, explicit_default), 1e-12,
               1e-12, "default scale = D^-0.5");
}

TEST(NystromFunctional, NonContiguousInputs) {
  torch::manual_seed(2);
  // (B, L, H, D) viewed as (B, H, L, D), as a projection-and-split produces it.
  const Tensor q = torch::randn({2, 29, 3, 8}, kF64).transpose(1, 2);
  const Tensor k = torch::randn({2, 29, 3, 8}, kF64).transpose(1, 2);
  const Tensor v = torch::randn({2, 3, 12, 29}, kF64).transpose(-1, -2).narrow(-1, 0, 7);
  ASSERT_FALSE(q.is_contiguous());
  ASSERT_FALSE(v.is_contiguous());
  RefConfig cfg;
  cfg.num_landmarks = 6;
  const Tensor out = call_op(q, k, v, cfg);
  expect_close(out, call_op(q.contiguous(), k.contiguous(), v.contiguous(), cfg), 1e-12, 1e-12,
               "non-contiguous vs contiguous");
  expect_close(out, reference(q, k, v, cfg), 1e-7, 1e-9, "non-contiguous vs reference");
}

TEST(NystromFunctional, PinvScaleIsLargestColumnSum) {
  torch::manual_seed(3);
  const auto [q, k, v] = random_qkv(3, 2, 25, 25, 8, 8);
  for (const char* init : {"per_head", "original"}) {
    RefConfig cfg;
    cfg.num_landmarks = 5;
    cfg.pinv_init = init;
    const auto res = nystrom::nystrom_attention_forward(q, k, v, cfg.num_landmarks,
                                                        cfg.pinv_iterations, cfg.pinv_init,
                                                        std::nullopt, std::nullopt, std::nullopt);
    const RefResult ref = reference_full(q, k, v, cfg);
    expect_close(std::get<0>(res), ref.out, 1e-7, 1e-9, std::string("out, ") + init);
    expect_close(std::get<7>(res), ref.pinv_scale, 1e-10, 1e-12,
                 std::string("pinv_scale, ") + init);
  }
  // per_head: one element's result does not depend on the rest of the batch;
  // original: it does (the batch's maximum), and equals the reference for the batch.
  RefConfig per_head;
  per_head.num_landmarks = 5;
  expect_close(call_op(q.slice(0, 1, 2), k.slice(0, 1, 2), v.slice(0, 1, 2), per_head),
               call_op(q, k, v, per_head).slice(0, 1, 2), 1e-10, 1e-12,
               "per_head is batch-independent");
}

TEST(NystromFunctional, RawForwardAndBackwardOps) {
  torch::manual_seed(4);
  const auto [q, k, v] = random_qkv(2, 3, 26, 21, 7, 5);
  const Tensor kpm = torch::zeros({2, 21}, torch::kBool).index_fill_(1, torch::arange(17, 21), true);
  const Tensor qpm = torch::zeros({2, 26}, torch::kBool).index_fill_(1, torch::arange(0, 3), true);
  RefConfig cfg;
  cfg.num_landmarks = 6;
  const auto [out, ql, kl, bv, zbv, lse_q, lse_l, c] = nystrom::nystrom_attention_forward(
      q, k, v, cfg.num_landmarks, cfg.pinv_iterations, cfg.pinv_init, kpm, qpm, std::nullopt);
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 3, 26, 5}));
  EXPECT_EQ(lse_q.sizes(), (std::vector<int64_t>{2, 3, 26}));
  EXPECT_EQ(c.sizes(), (std::vector<int64_t>{2, 3}));
  expect_close(out, reference(q, k, v, cfg, kpm, qpm), 1e-7, 1e-9, "raw forward");

  torch::manual_seed(5);
  const Tensor grad_out = torch::randn_like(out);
  const auto [gq, gk, gv] = nystrom::nystrom_attention_backward(
      grad_out, q, k, v, ql, kl, bv, zbv, lse_q, lse_l, c, cfg.num_landmarks,
      cfg.pinv_iterations, cfg.pinv_init, kpm, qpm, std::nullopt);
  const Tensor qr = leaf(q), kr = leaf(k), vr = leaf(v);
  const auto grads =
      torch::autograd::grad({reference(qr, kr, vr, cfg, kpm, qpm)}, {qr, kr, vr}, {grad_out});
  expect_close(gq, grads[0], 1e-6, 1e-8, "raw backward, query");
  expect_close(gk, grads[1], 1e-6, 1e-8, "raw backward, key");
  expect_close(gv, grads[2], 1e-6, 1e-8, "raw backward, value");
}

TEST(NystromFunctional, GradientOnlyForInputsThatRequireIt) {
  torch::manual_seed(6);
  const auto [q0, k0, v0] = random_qkv(2, 2, 19, 19, 6, 4);
  RefConfig cfg;
  cfg.num_landmarks = 4;
  const Tensor v = leaf(v0);
  const Tensor out = call_op(q0, k0, v, cfg);
  ASSERT_TRUE(out.requires_grad());
  out.sum().backward();
  const Tensor vr = leaf(v0);
  const auto g = torch::autograd::grad({reference(q0, k0, vr, cfg).sum()}, {vr});
  expect_close(v.grad(), g[0], 1e-6, 1e-8, "grad value only");

  const Tensor plain = call_op(q0, k0, v0, cfg);
  EXPECT_FALSE(plain.requires_grad());
}

TEST(NystromFunctional, RunsUnderNoGradAndInferenceMode) {
  torch::manual_seed(7);
  const auto [q0, k0, v0] = random_qkv(1, 2, 21, 21, 6, 6);
  RefConfig cfg;
  cfg.num_landmarks = 5;
  const Tensor expected = reference(q0, k0, v0, cfg);
  const Tensor q = leaf(q0), k = leaf(k0), v = leaf(v0);
  {
    torch::NoGradGuard no_grad;
    const Tensor out = call_op(q, k, v, cfg);
    EXPECT_FALSE(out.requires_grad());
    expect_close(out, expected, 1e-7, 1e-9, "no_grad");
  }
  {
    c10::InferenceMode guard;
    expect_close(call_op(q0, k0, v0, cfg), expected, 1e-7, 1e-9, "inference mode");
  }
}

TEST(NystromFunctional, ReducedPrecisionInputsKeepTheirDtype) {
  torch::manual_seed(8);
  const auto [q, k, v] = random_qkv(2, 2, 33, 33, 16, 16, torch::kFloat32);
  RefConfig cfg;
  cfg.num_landmarks = 8;
  for (const auto dtype : {torch::kBFloat16, torch::kFloat16}) {
    const Tensor qh = q.to(dtype), kh = k.to(dtype), vh = v.to(dtype);
    const Tensor out = call_op(qh, kh, vh, cfg);
    EXPECT_EQ(out.scalar_type(), dtype);
    // Reference on the rounded inputs; the output itself is rounded once more.
    const double tol = dtype == torch::kBFloat16 ? 3e-2 : 5e-3;
    expect_close_scaled(out, reference(qh, kh, vh, cfg), tol,
                        std::string("forward ") + c10::toString(dtype));
  }
}

TEST(NystromFunctional, RefusesDoubleBackward) {
  torch::manual_seed(9);
  const QKV in = random_qkv(1, 2, 20, 20, 6, 6);
  const Tensor &q0 = in.q, &k0 = in.k, &v0 = in.v;
  const Tensor q = leaf(q0), k = leaf(k0), v = leaf(v0);
  auto second_order = [&] {
    const Tensor out = nystrom::nystrom_attention(q, k, v, /*num_landmarks=*/4);
    const auto first = torch::autograd::grad({out.pow(2).sum()}, {q, k, v}, {},
                                             /*retain_graph=*/true, /*create_graph=*/true);
    // Only the gradient itself must be right; differentiating it again is refused.
    const Tensor total = first[0].pow(2).sum() + first[1].pow(2).sum() + first[2].pow(2).sum();
    torch::autograd::grad({total}, {q, k, v});
  };
  EXPECT_THROW(second_order(), c10::Error);
  try {
    second_order();
  } catch (const c10::Error& e) {
    const std::string msg = lower(e.what_without_backtrace());
    EXPECT_NE(msg.find("backward"), std::string::npos)
        << "double backward should be refused with a message about it; got: " << msg;
  }

  // The first-order gradient with create_graph=true is still the right one.
  const Tensor out = nystrom::nystrom_attention(q, k, v, 4);
  const auto first = torch::autograd::grad({out.pow(2).sum()}, {q}, {}, true, true);
  RefConfig cfg;
  cfg.num_landmarks = 4;
  const Tensor qr = leaf(q0);
  const auto ref = torch::autograd::grad({reference(qr, k0, v0, cfg).pow(2).sum()}, {qr});
  expect_close(first[0], ref[0], 1e-6, 1e-8, "first-order grad with create_graph");
}

}  // namespace
