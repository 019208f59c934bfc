// The torch::nn layer nystrom::NystromAttention (NystromModule) against the
// layer written out with the float64 reference (reference.h): options,
// forward, backward, the convolution skip, padding, float32, clone.
#include "test_util.h"

#include <nystrom/nystrom.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

namespace {

using namespace nystrom_test;

nystrom::NystromAttention make_module(int64_t E, int64_t H, int64_t m,
                                      std::optional<int64_t> conv = std::nullopt,
                                      const std::string& init = "per_head", bool bias = true) {
  torch::manual_seed(42);
  nystrom::NystromAttention mod(nystrom::NystromAttentionOptions(E, H)
                                    .num_landmarks(m)
                                    .pinv_init(init)
                                    .conv_kernel_size(conv)
                                    .bias(bias));
  mod->to(kF64);
  if (bias) {
    // Non-zero biases so that the test sees them.
    torch::NoGradGuard no_grad;
    for (auto& p : mod->named_parameters()) {
      if (p.key().find("bias") != std::string::npos) {
        p.value().uniform_(-0.5, 0.5);
      }
    }
  }
  return mod;
}

TEST(NystromModule, OptionsAndParameters) {
  nystrom::NystromAttentionOptions defaults(32, 4);
  EXPECT_EQ(defaults.num_landmarks(), 64);
  EXPECT_EQ(defaults.pinv_iterations(), 6);
  EXPECT_EQ(defaults.pinv_init(), "per_head");
  EXPECT_FALSE(defaults.conv_kernel_size().has_value());
  EXPECT_TRUE(defaults.bias());

  nystrom::NystromAttention plain(32, 4);
  EXPECT_EQ(plain->options.embed_dim(), 32);
  EXPECT_TRUE(plain->conv.is_empty());
  const auto params = plain->named_parameters();
  EXPECT_EQ(params.size(), 8u);
  for (const char* name : {"q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight",
                           "out_proj.weight", "out_proj.bias"}) {
    EXPECT_TRUE(params.contains(name)) << name;
  }
  EXPECT_EQ(plain->q_proj->weight.sizes(), (std::vector<int64_t>{32, 32}));

  nystrom::NystromAttention no_bias(nystrom::NystromAttentionOptions(32, 4).bias(false));
  EXPECT_EQ(no_bias->named_parameters().size(), 4u);

  nystrom::NystromAttention with_conv(nystrom::NystromAttentionOptions(32, 4).conv_kernel_size(5));
  EXPECT_FALSE(with_conv->conv.is_empty());
  EXPECT_GT(with_conv->named_parameters().size(), 8u);
}

TEST(NystromModule, ForwardMatchesReference) {
  auto mod = make_module(24, 3, 5);
  torch::manual_seed(20);
  const Tensor x = torch::randn({2, 29, 24}, kF64);
  const Tensor out = mod(x);
  EXPECT_EQ(out.sizes(), x.sizes());
  expect_close(out, module_reference(mod, x), 1e-7, 1e-9, "module forward");
  // Default argument through the holder and through AnyModule (FORWARD_HAS_DEFAULT_ARGS).
  torch::nn::AnyModule any(mod);
  expect_close(any.forward(x), out, 1e-12, 1e-12, "AnyModule forward(x)");
  expect_close(mod->forward(x, std::nullopt), out, 1e-12, 1e-12, "forward(x, nullopt)");
}

struct Padded {
  Tensor x, mask, out;
};

// The layer on a random (4, L, E) float64 input padded with make_mask(L),
// checked against the layer written out with the reference.
Padded padded_forward(nystrom::NystromAttention& mod, uint64_t seed, int64_t L,
                      const std::string& what) {
  torch::manual_seed(seed);
  Padded p{torch::randn({4, L, mod->options.embed_dim()}, kF64), make_mask(L), Tensor()};
  p.out = mod(p.x, p.mask);
  expect_close(p.out, module_reference(mod, p.x, p.mask), 1e-7, 1e-9, what);
  return p;
}

TEST(NystromModule, ForwardWithPaddingMatchesReference) {
  auto mod = make_module(24, 3, 5, std::nullopt, "original");
  const int64_t L = 31;
  const auto [x, mask, out] = padded_forward(mod, 21, L, "module forward, padded");
  // Padded rows are zero before the output projection: they equal its bias.
  const Tensor bias_rows = mod->out_proj->bias.expand({4, L, 24});
  const Tensor pad = mask.unsqueeze(-1).expand({4, L, 24});
  expect_close(out.masked_select(pad), bias_rows.masked_select(pad), 1e-12, 1e-12,
               "padded rows = out_proj.bias");
}

TEST(NystromModule, BackwardMatchesReference) {
  for (const bool padded : {false, true}) {
    auto mod = make_module(16, 2, 4);
    torch::manual_seed(22);
    const int64_t L = 27;
    const Tensor x0 = torch::randn({4, L, 16}, kF64);
    const OptTensor mask = padded ? OptTensor(make_mask(L)) : std::nullopt;
    const Tensor x = leaf(x0);
    const Tensor out = mod(x, mask);
    torch::manual_seed(23);
    const Tensor grad_out = torch::randn_like(out);
    (out * grad_out).sum().backward();

    const Tensor xr = leaf(x0);
    std::vector<Tensor> wrt{xr};
    std::vector<std::string> names{"x"};
    for (const auto& p : mod->named_parameters()) {
      wrt.push_back(p.value());
      names.push_back(p.key());
    }
    const auto grads =
        torch::autograd::grad({(module_reference(mod, xr, mask) * grad_out).sum()}, wrt);
    const std::string tag = padded ? " (padded)" : "";
    expect_close(x.grad(), grads[0], 1e-6, 1e-8, "grad x" + tag);
    for (size_t i = 1; i < wrt.size(); ++i) {
      expect_close(wrt[i].grad(), grads[i], 1e-6, 1e-8, "grad " + names[i] + tag);
    }
  }
}

TEST(NystromModule, ConvSkipForwardBackward) {
  auto mod = make_module(24, 4, 6, /*conv=*/3);
  ASSERT_FALSE(mod->conv.is_empty());
  torch::manual_seed(24);
  const int64_t L = 37;
  const Tensor x0 = torch::randn({2, L, 24}, kF64);
  const Tensor x = leaf(x0);
  const Tensor out = mod(x);
  expect_close(out, module_reference(mod, x0), 1e-7, 1e-9, "conv module forward");

  torch::manual_seed(25);
  const Tensor grad_out = torch::randn_like(out);
  out.backward(grad_out);
  const Tensor xr = leaf(x0);
  const auto grads = torch::autograd::grad({(module_reference(mod, xr) * grad_out).sum()},
                                           {xr, mod->conv->weight, mod->v_proj->weight});
  expect_close(x.grad(), grads[0], 1e-6, 1e-8, "conv module grad x");
  expect_close(mod->conv->weight.grad(), grads[1], 1e-6, 1e-8, "grad conv.weight");
  expect_close(mod->v_proj->weight.grad(), grads[2], 1e-6, 1e-8, "grad v_proj.weight");
}

TEST(NystromModule, ConvSkipWithPadding) {
  auto mod = make_module(24, 4, 6, /*conv=*/5);
  const int64_t L = 30;
  const auto [x, mask, out] = padded_forward(mod, 26, L, "conv module forward, padded");
  // Trailing padding is invisible: element 1 (last 9 padded) and element 3
  // (5 real tokens) give at their real tokens what the unpadded input gives.
  for (const int64_t b : {1, 3}) {
    const int64_t real = L - mask[b].sum().item<int64_t>();
    const Tensor alone = mod(x.slice(0, b, b + 1).slice(1, 0, real));
    expect_close(out.slice(0, b, b + 1).slice(1, 0, real), alone, 1e-9, 1e-11,
                 "conv module, trailing padding removed, element " + std::to_string(b));
  }
}

TEST(NystromModule, Float32ForwardBackwardAndClone) {
  torch::manual_seed(27);
  nystrom::NystromAttention mod(nystrom::NystromAttentionOptions(32, 4).num_landmarks(8));
  const Tensor x = torch::randn({3, 50, 32});
  Tensor mask = torch::zeros({3, 50}, torch::kBool);
  mask[2].slice(0, 41, 50).fill_(true);
  const Tensor out = mod(x, mask);
  EXPECT_EQ(out.scalar_type(), torch::kFloat32);
  EXPECT_EQ(out.sizes(), x.sizes());
  out.pow(2).mean().backward();
  for (const auto& p : mod->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
  }

  // Cloneable: a deep copy with equal output and its own parameters.
  auto copy = std::dynamic_pointer_cast<nystrom::NystromAttentionImpl>(mod->clone());
  ASSERT_TRUE(copy);
  expect_close(copy->forward(x, mask), out, 1e-6, 1e-7, "clone output");
  {
    torch::NoGradGuard no_grad;
    copy->q_proj->weight.add_(1.0);
  }
  EXPECT_FALSE(torch::equal(copy->q_proj->weight, mod->q_proj->weight));
}

TEST(NystromModule, MatchesFunctionalCallOnProjections) {
  // The layer is the functional op on its projections (no conv, no padding).
  auto mod = make_module(20, 4, 3, std::nullopt, "per_head", /*bias=*/false);
  torch::manual_seed(28);
  const Tensor x = torch::randn({2, 17, 20}, kF64);
  const auto split = [&](const Tensor& t) { return t.view({2, 17, 4, 5}).transpose(1, 2); };
  const Tensor att = nystrom::nystrom_attention(split(mod->q_proj(x)), split(mod->k_proj(x)),
                                                split(mod->v_proj(x)), 3);
  const Tensor expected = mod->out_proj(att.transpose(1, 2).reshape({2, 17, 20}));
  expect_close(mod(x), expected, 1e-10, 1e-12, "layer = op on projections");
}

}  // namespace
