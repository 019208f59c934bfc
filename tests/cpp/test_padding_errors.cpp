// Padding masks (NystromPadding: against the reference, invisible padding,
// zero gradients at padded positions) and argument errors of the functional
// call and of the layer (NystromErrors: the message names the argument).
#include "test_util.h"

#include <nystrom/nystrom.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

namespace {

using namespace nystrom_test;

TEST(NystromPadding, KeyPaddingMaskMatchesReference) {
  torch::manual_seed(10);
  const int64_t L = 40;
  const auto [q, k, v] = random_qkv(4, 2, L, L, 8, 6);
  const Tensor mask = make_mask(L);
  for (const char* init : {"per_head", "original"}) {
    RefConfig cfg;
    cfg.num_landmarks = 6;
    cfg.pinv_init = init;
    expect_close(call_op(q, k, v, cfg, mask), reference(q, k, v, cfg, mask), 1e-7, 1e-9,
                 std::string("key padding only, ") + init);
    const Tensor both = call_op(q, k, v, cfg, mask, mask);
    expect_close(both, reference(q, k, v, cfg, mask, mask), 1e-7, 1e-9,
                 std::string("key and query padding, ") + init);
    // Rows of padded queries are exactly zero.
    const Tensor padded_rows = both.masked_select(mask.view({4, 1, L, 1}));
    EXPECT_EQ(padded_rows.abs().max().item<double>(), 0.0) << init;
  }
}

TEST(NystromPadding, AllFalseMaskEqualsNoMask) {
  torch::manual_seed(11);
  const auto [q, k, v] = random_qkv(2, 3, 31, 31, 8, 8);
  RefConfig cfg;
  cfg.num_landmarks = 7;
  const Tensor none = torch::zeros({2, 31}, torch::kBool);
  expect_close(call_op(q, k, v, cfg, none, none), call_op(q, k, v, cfg), 1e-12, 1e-12,
               "all-false masks");
}

TEST(NystromPadding, PaddingIsInvisible) {
  torch::manual_seed(12);
  const int64_t L = 40, S = 33;
  const auto [q, k, v] = random_qkv(4, 2, L, S, 8, 6, torch::kFloat32);
  const Tensor qmask = make_mask(L);
  const Tensor kmask = make_mask(S);
  RefConfig cfg;
  cfg.num_landmarks = 6;
  const Tensor out = call_op(q, k, v, cfg, kmask, qmask);
  for (int64_t b = 0; b < 4; ++b) {
    const Tensor qi = real_positions(qmask, b, L);
    const Tensor ki = real_positions(kmask, b, S);
    const Tensor qb = q.slice(0, b, b + 1).index_select(2, qi);
    const Tensor kb = k.slice(0, b, b + 1).index_select(2, ki);
    const Tensor vb = v.slice(0, b, b + 1).index_select(2, ki);
    const Tensor alone = call_op(qb, kb, vb, cfg);
    expect_close(out.slice(0, b, b + 1).index_select(2, qi), alone, 1e-5, 1e-6,
                 "batch element " + std::to_string(b) + " with padding removed");
  }
}

TEST(NystromPadding, GradientsMatchReferenceAndIgnorePadding) {
  torch::manual_seed(13);
  const int64_t L = 40;
  const auto [q0, k0, v0] = random_qkv(4, 2, L, L, 7, 5);
  const Tensor mask = make_mask(L);
  RefConfig cfg;
  cfg.num_landmarks = 6;
  const Tensor q = leaf(q0), k = leaf(k0), v = leaf(v0);
  const Tensor out = call_op(q, k, v, cfg, mask, mask);
  torch::manual_seed(14);
  const Tensor grad_out = torch::randn_like(out);
  out.backward(grad_out);
  const Tensor qr = leaf(q0), kr = leaf(k0), vr = leaf(v0);
  const auto grads = torch::autograd::grad({reference(qr, kr, vr, cfg, mask, mask)},
                                           {qr, kr, vr}, {grad_out});
  expect_close(q.grad(), grads[0], 1e-6, 1e-8, "grad query, padded");
  expect_close(k.grad(), grads[1], 1e-6, 1e-8, "grad key, padded");
  expect_close(v.grad(), grads[2], 1e-6, 1e-8, "grad value, padded");
  const Tensor pad = mask.view({4, 1, L, 1}).expand({4, 2, L, 1});
  const std::vector<std::pair<std::string, Tensor>> input_grads{
      {"query", q.grad()}, {"key", k.grad()}, {"value", v.grad()}};
  for (const auto& [name, g] : input_grads) {
    EXPECT_EQ(g.masked_select(pad).abs().max().item<double>(), 0.0)
        << "grad " << name << " at padded positions";
  }
}

// ------------------------------------------------------------- errors -----

TEST(NystromErrors, FunctionalArgumentChecksNameTheArgument) {
  const QKV in = random_qkv(2, 2, 10, 12, 4, 3);
  const Tensor &q = in.q, &k = in.k, &v = in.v;
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const Tensor kpm = torch::zeros({2, 12}, torch::kBool);
  using nystrom::nystrom_attention;
  expect_error_naming([&] { nystrom_attention(q, k, v, 0); }, {"num_landmarks"},
                      "num_landmarks = 0");
  expect_error_naming([&] { nystrom_attention(q, k, v, -3); }, {"num_landmarks"},
                      "num_landmarks < 0");
  expect_error_naming([&] { nystrom_attention(q, k, v, 4, -1); }, {"pinv_iterations"},
                      "pinv_iterations < 0");
  expect_error_naming([&] { nystrom_attention(q, k, v, 4, 6, "newton"); }, {"pinv_init"},
                      "unknown pinv_init");
  expect_error_naming([&] { nystrom_attention(q[0], k, v, 4); }, {"query"}, "3-D query");
  expect_error_naming([&] { nystrom_attention(q, k[0], v, 4); }, {"key"}, "3-D key");
  expect_error_naming([&] { nystrom_attention(q, k, v[0], 4); }, {"value"}, "3-D value");
  expect_error_naming([&] { nystrom_attention(q, torch::randn({2, 2, 12, 5}, kF64), v, 4); },
                      {"key"}, "key head dim differs from query");
  expect_error_naming([&] { nystrom_attention(q, torch::randn({3, 2, 12, 4}, kF64), v, 4); },
                      {"key"}, "key batch differs");
  expect_error_naming([&] { nystrom_attention(q, torch::randn({2, 3, 12, 4}, kF64), v, 4); },
                      {"key"}, "key heads differ");
  expect_error_naming([&] { nystrom_attention(q, k, torch::randn({2, 2, 11, 3}, kF64), 4); },
                      {"value"}, "value length differs from key");
  expect_error_naming([&] { nystrom_attention(q, k.to(torch::kFloat32), v, 4); }, {"key"},
                      "key dtype differs");
  expect_error_naming([&] { nystrom_attention(q, k, v.to(torch::kFloat32), 4); }, {"value"},
                      "value dtype differs");
  expect_error_naming(
      [&] {
        nystrom_attention(q.to(torch::kLong), k.to(torch::kLong), v.to(torch::kLong), 4);
      },
      {"query", "floating"}, "integer inputs");
  expect_error_naming(
      [&] { nystrom_attention(q, k, v, 4, 6, "per_head", torch::zeros({2, 13}, torch::kBool)); },
      {"key_padding_mask"}, "key_padding_mask length");
  expect_error_naming(
      [&] { nystrom_attention(q, k, v, 4, 6, "per_head", torch::zeros({1, 12}, torch::kBool)); },
      {"key_padding_mask"}, "key_padding_mask batch");
  expect_error_naming(
      [&] { nystrom_attention(q, k, v, 4, 6, "per_head", torch::zeros({2, 12}, f32)); },
      {"key_padding_mask"}, "float key_padding_mask");
  expect_error_naming(
      [&] {
        nystrom_attention(q, k, v, 4, 6, "per_head", kpm, torch::zeros({2, 12}, torch::kBool));
      },
      {"query_padding_mask"}, "query_padding_mask length");
  expect_error_naming(
      [&] {
        nystrom_attention(q, k, v, 4, 6, "per_head", std::nullopt,
                          torch::zeros({2, 10}, torch::kInt));
      },
      {"query_padding_mask"}, "int query_padding_mask");
}

TEST(NystromErrors, ModuleOptionChecksNameTheOption) {
  using nystrom::NystromAttention;
  using nystrom::NystromAttentionOptions;
  const Tensor x = torch::randn({2, 9, 32});
  expect_error_naming([&] { NystromAttention(NystromAttentionOptions(30, 4))->forward(x); },
                      {"num_heads", "embed_dim"}, "embed_dim not divisible by num_heads");
  expect_error_naming([&] { NystromAttention(NystromAttentionOptions(32, 0))->forward(x); },
                      {"num_heads"}, "num_heads = 0");
  expect_error_naming(
      [&] { NystromAttention(NystromAttentionOptions(32, 4).conv_kernel_size(4))->forward(x); },
      {"conv_kernel_size"}, "even conv_kernel_size");
  expect_error_naming(
      [&] { NystromAttention(NystromAttentionOptions(32, 4).conv_kernel_size(0))->forward(x); },
      {"conv_kernel_size"}, "conv_kernel_size = 0");
  expect_error_naming(
      [&] { NystromAttention(NystromAttentionOptions(32, 4).num_landmarks(0))->forward(x); },
      {"num_landmarks"}, "num_landmarks = 0");
  expect_error_naming(
      [&] { NystromAttention(NystromAttentionOptions(32, 4).pinv_init("svd"))->forward(x); },
      {"pinv_init"}, "unknown pinv_init");

  NystromAttention mod(NystromAttentionOptions(32, 4).num_landmarks(4));
  EXPECT_THROW(mod(torch::randn({2, 9, 16})), c10::Error) << "wrong embedding width";
  EXPECT_THROW(mod(torch::randn({9, 32})), c10::Error) << "2-D input";
  expect_error_naming([&] { mod(x, torch::zeros({2, 8}, torch::kBool)); }, {"key_padding_mask"},
                      "key_padding_mask length");
  expect_error_naming([&] { mod(x, torch::zeros({2, 9})); }, {"key_padding_mask"},
                      "float key_padding_mask");
}

}  // namespace
