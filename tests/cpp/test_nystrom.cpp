// GoogleTest suite of the C++ API of torch-nystrom: the functional call
// nystrom::nystrom_attention (forward and backward through the dispatcher),
// the raw forward/backward ops, and the torch::nn layer
// nystrom::NystromAttention.
//
// Every numeric check compares with a dense float64 reference written below
// from the math in DESIGN.md (segment-mean landmarks, three softmaxes,
// Newton–Schulz pseudoinverse, out = F (Z (Bm v)), exact attention when the
// landmarks cover the sequence). Reference gradients come from LibTorch
// autograd applied to that reference, in float64.

#include <nystrom/nystrom.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr auto kF64 = torch::kFloat64;

// ----------------------------------------------------------- reference -----

struct RefConfig {
  int64_t num_landmarks = 64;
  int64_t pinv_iterations = 6;
  std::string pinv_init = "per_head";
  std::optional<double> scale = std::nullopt;
};

// x (H, n, D) -> (H, m, D): mean of segment j = tokens [floor(j n / m), floor((j + 1) n / m)).
Tensor segment_means(const Tensor& x, int64_t m) {
  const int64_t n = x.size(1);
  std::vector<Tensor> landmarks;
  landmarks.reserve(m);
  for (int64_t j = 0; j < m; ++j) {
    const int64_t begin = j * n / m;
    const int64_t end = (j + 1) * n / m;
    landmarks.push_back(x.slice(/*dim=*/1, begin, end).mean(/*dim=*/1));
  }
  return torch::stack(landmarks, /*dim=*/1);
}

// Positions of the real (not padded) tokens of batch element b, in order.
Tensor real_positions(const OptTensor& padding_mask, int64_t b, int64_t n) {
  if (!padding_mask.has_value()) {
    return torch::arange(n, torch::kLong);
  }
  return torch::nonzero(padding_mask->select(0, b).logical_not()).view({-1});
}

struct RefItem {
  Tensor query_pos;  // (L_b,)
  Tensor q, k, v;    // (H, L_b, D), (H, S_b, D), (H, S_b, Dv)
  bool exact = false;
  Tensor F, A, Bm;   // softmax factors (approximate branch only)
  Tensor c;          // (H,) largest column sum of A
};

struct RefResult {
  Tensor out;         // (B, H, L, Dv) float64
  Tensor pinv_scale;  // (B, H) float64, the c that was used (undefined for exact rows)
};

// Dense float64 Nyström attention, differentiable with LibTorch autograd.
RefResult reference_full(const Tensor& query, const Tensor& key, const Tensor& value,
                         const RefConfig& cfg, const OptTensor& key_padding_mask = std::nullopt,
                         const OptTensor& query_padding_mask = std::nullopt) {
  const Tensor q = query.to(kF64);
  const Tensor k = key.to(kF64);
  const Tensor v = value.to(kF64);
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t S = k.size(2), Dv = v.size(3);
  const double scale = cfg.scale.value_or(1.0 / std::sqrt(static_cast<double>(D)));
  const int64_t m = cfg.num_landmarks;

  std::vector<RefItem> items(B);
  std::vector<Tensor> column_maxima;
  for (int64_t b = 0; b < B; ++b) {
    RefItem& it = items[b];
    it.query_pos = real_positions(query_padding_mask, b, L);
    const Tensor key_pos = real_positions(key_padding_mask, b, S);
    it.q = q.select(0, b).index_select(1, it.query_pos);
    it.k = k.select(0, b).index_select(1, key_pos);
    it.v = v.select(0, b).index_select(1, key_pos);
    const int64_t Lb = it.q.size(1), Sb = it.k.size(1);
    it.exact = Lb <= m && Sb <= m;
    if (it.exact) {
      continue;
    }
    const Tensor q_land = segment_means(it.q, std::min(m, Lb));
    const Tensor k_land = segment_means(it.k, std::min(m, Sb));
    it.F = torch::softmax(scale * it.q.matmul(k_land.transpose(-1, -2)), -1);
    it.A = torch::softmax(scale * q_land.matmul(k_land.transpose(-1, -2)), -1);
    it.Bm = torch::softmax(scale * q_land.matmul(it.k.transpose(-1, -2)), -1);
    it.c = std::get<0>(it.A.sum(/*dim=*/-2).max(/*dim=*/-1));  // (H,)
    column_maxima.push_back(it.c);
  }
  if (cfg.pinv_init == "original" && !column_maxima.empty()) {
    const Tensor global = torch::stack(column_maxima).max();
    for (RefItem& it : items) {
      if (!it.exact) {
        it.c = global.expand({H});
      }
    }
  }

  std::vector<Tensor> outs, scales;
  for (int64_t b = 0; b < B; ++b) {
    RefItem& it = items[b];
    Tensor res;
    if (it.exact) {
      const Tensor p = torch::softmax(scale * it.q.matmul(it.k.transpose(-1, -2)), -1);
      res = p.matmul(it.v);
      scales.push_back(torch::full({H}, std::nan(""), q.options()));
    } else {
      const int64_t mq = it.A.size(-2);
      const Tensor eye = torch::eye(mq, q.options());
      Tensor Z = it.A.transpose(-1, -2) / it.c.view({H, 1, 1});
      for (int64_t i = 0; i < cfg.pinv_iterations; ++i) {
        const Tensor AZ = it.A.matmul(Z);
        Z = 0.25 * Z.matmul(13 * eye - AZ.matmul(15 * eye - AZ.matmul(7 * eye - AZ)));
      }
      res = it.F.matmul(Z.matmul(it.Bm.matmul(it.v)));
      scales.push_back(it.c);
    }
    outs.push_back(torch::zeros({H, L, Dv}, q.options()).index_copy(1, it.query_pos, res));
  }
  return {torch::stack(outs), torch::stack(scales)};
}

Tensor reference(const Tensor& q, const Tensor& k, const Tensor& v, const RefConfig& cfg,
                 const OptTensor& key_padding_mask = std::nullopt,
                 const OptTensor& query_padding_mask = std::nullopt) {
  return reference_full(q, k, v, cfg, key_padding_mask, query_padding_mask).out;
}

Tensor call_op(const Tensor& q, const Tensor& k, const Tensor& v, const RefConfig& cfg,
               const OptTensor& key_padding_mask = std::nullopt,
               const OptTensor& query_padding_mask = std::nullopt) {
  return nystrom::nystrom_attention(q, k, v, cfg.num_landmarks, cfg.pinv_iterations,
                                    cfg.pinv_init, key_padding_mask, query_padding_mask,
                                    cfg.scale);
}

// The same self-attention layer, written out with the layer's own parameters.
Tensor module_reference(nystrom::NystromAttention& mod, const Tensor& x,
                        const OptTensor& key_padding_mask = std::nullopt) {
  namespace F = torch::nn::functional;
  const auto& o = mod->options;
  const int64_t B = x.size(0), L = x.size(1), E = x.size(2);
  const int64_t H = o.num_heads(), Dh = E / H;
  auto heads = [&](torch::nn::Linear& lin) {
    return F::linear(x, lin->weight, lin->bias).view({B, L, H, Dh}).transpose(1, 2);
  };
  const Tensor q = heads(mod->q_proj), k = heads(mod->k_proj), v = heads(mod->v_proj);
  RefConfig cfg;
  cfg.num_landmarks = o.num_landmarks();
  cfg.pinv_iterations = o.pinv_iterations();
  cfg.pinv_init = o.pinv_init();
  Tensor att = reference(q, k, v, cfg, key_padding_mask, key_padding_mask);
  if (o.conv_kernel_size().has_value()) {
    // The paper's skip: a depthwise convolution along the sequence of the
    // (padding-zeroed) values, added to the attention output.
    Tensor v_in = key_padding_mask ? v.masked_fill(key_padding_mask->view({B, 1, L, 1}), 0.0) : v;
    att = att + mod->conv->forward(v_in);
  }
  if (key_padding_mask) {
    att = att.masked_fill(key_padding_mask->view({B, 1, L, 1}), 0.0);
  }
  const Tensor merged = att.transpose(1, 2).reshape({B, L, E});
  return F::linear(merged, mod->out_proj->weight, mod->out_proj->bias);
}

// ------------------------------------------------------------- helpers -----

void expect_close(const Tensor& actual, const Tensor& expected, double rtol, double atol,
                  const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what << ": result is undefined";
  ASSERT_TRUE(expected.defined()) << what << ": expected is undefined";
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what << ": shapes differ";
  const Tensor a = actual.detach().to(kF64);
  const Tensor e = expected.detach().to(kF64);
  ASSERT_TRUE(torch::isfinite(a).all().item<bool>()) << what << ": non-finite values";
  if (a.numel() == 0) {
    return;
  }
  const Tensor diff = (a - e).abs();
  const bool ok = (diff <= atol + rtol * e.abs()).all().item<bool>();
  EXPECT_TRUE(ok) << what << ": max |diff| = " << diff.max().item<double>()
                  << ", max |expected| = " << e.abs().max().item<double>() << " (rtol " << rtol
                  << ", atol " << atol << ")";
}

// Tolerance relative to the largest magnitude of the expected tensor.
void expect_close_scaled(const Tensor& actual, const Tensor& expected, double tol,
                         const std::string& what) {
  const double mag = expected.numel() ? expected.detach().abs().max().item<double>() : 0.0;
  expect_close(actual, expected, tol, tol * std::max(1.0, mag), what);
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return s;
}

// The call must throw c10::Error whose message names one of `words`.
template <class Fn>
void expect_error_naming(Fn&& fn, const std::vector<std::string>& words, const std::string& what) {
  EXPECT_THROW(fn(), c10::Error) << what;
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    bool named = false;
    for (const auto& w : words) {
      named = named || msg.find(w) != std::string::npos;
    }
    std::ostringstream expected;
    for (const auto& w : words) {
      expected << " '" << w << "'";
    }
    EXPECT_TRUE(named) << what << ": the message should name" << expected.str()
                       << "; it was: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected c10::Error, got std::exception: " << e.what();
  }
}

struct QKV {
  Tensor q, k, v;
};

QKV random_qkv(int64_t B, int64_t H, int64_t L, int64_t S, int64_t D, int64_t Dv,
               torch::Dtype dtype = kF64) {
  auto opts = torch::TensorOptions().dtype(dtype);
  return {torch::randn({B, H, L, D}, opts), torch::randn({B, H, S, D}, opts),
          torch::randn({B, H, S, Dv}, opts)};
}

Tensor leaf(const Tensor& t) { return t.detach().clone().requires_grad_(true); }

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

// ------------------------------------------------------------ padding -----

// b0: no padding; b1: trailing padding; b2: scattered padding; b3: 5 real
// tokens (<= m: exact branch for that element only).
Tensor make_mask(int64_t n) {
  Tensor mask = torch::zeros({4, n}, torch::kBool);
  mask[1].slice(0, n - 9, n).fill_(true);
  mask[2].slice(0, 0, n, 3).fill_(true);
  mask[2][n - 1] = true;
  mask[3].slice(0, 5, n).fill_(true);
  return mask;
}

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

// ------------------------------------------------------------- module -----

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

TEST(NystromModule, ForwardWithPaddingMatchesReference) {
  auto mod = make_module(24, 3, 5, std::nullopt, "original");
  torch::manual_seed(21);
  const int64_t L = 31;
  const Tensor x = torch::randn({4, L, 24}, kF64);
  const Tensor mask = make_mask(L);
  const Tensor out = mod(x, mask);
  expect_close(out, module_reference(mod, x, mask), 1e-7, 1e-9, "module forward, padded");
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
  torch::manual_seed(26);
  const int64_t L = 30;
  const Tensor x = torch::randn({4, L, 24}, kF64);
  const Tensor mask = make_mask(L);
  const Tensor out = mod(x, mask);
  expect_close(out, module_reference(mod, x, mask), 1e-7, 1e-9, "conv module forward, padded");
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

// --------------------------------------------------------------- CUDA -----
// The same op on CUDA tensors, checked against the float64 CPU reference;
// skipped where there is no GPU (the library still compiles its CUDA kernels).

#define NYSTROM_REQUIRE_CUDA()                                   \
  do {                                                           \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

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
      const Tensor q = leaf(q0.cuda()), k = leaf(k0.cuda()), v = leaf(v0.cuda());
      const Tensor out = call_op(q, k, v, cfg, kmask.cuda(), qmask.cuda());
      ASSERT_TRUE(out.is_cuda());
      const Tensor qr = leaf(q0), kr = leaf(k0), vr = leaf(v0);
      const Tensor expected = reference(qr, kr, vr, cfg, kmask, qmask);
      expect_close(out.cpu(), expected, 1e-7, 1e-9, "CUDA forward float64, " + what);
      torch::manual_seed(41);
      const Tensor grad_out = torch::randn_like(expected);
      out.backward(grad_out.cuda());
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
  const Tensor cpu = call_op(q, k, v, cfg);
  expect_close_scaled(call_op(q.cuda(), k.cuda(), v.cuda(), cfg).cpu(), cpu, 1e-4, "CUDA float32 vs CPU");
  for (const auto dtype : {torch::kFloat16, torch::kBFloat16}) {
    const Tensor out = call_op(q.cuda().to(dtype), k.cuda().to(dtype), v.cuda().to(dtype), cfg);
    EXPECT_EQ(out.scalar_type(), dtype);
    expect_close_scaled(out.cpu().to(torch::kFloat32), cpu, 3e-2, "CUDA half precision vs CPU float32");
  }
}

TEST(NystromCuda, ModuleTrainsOnCuda) {
  NYSTROM_REQUIRE_CUDA();
  torch::manual_seed(43);
  nystrom::NystromAttention mod(nystrom::NystromAttentionOptions(32, 4).num_landmarks(8));
  mod->to(torch::kCUDA);
  const Tensor x = torch::randn({3, 50, 32}, torch::kCUDA);
  Tensor mask = torch::zeros({3, 50}, torch::TensorOptions().dtype(torch::kBool).device(torch::kCUDA));
  mask[2].slice(0, 41, 50).fill_(true);
  const Tensor out = mod(x, mask);
  EXPECT_TRUE(out.is_cuda());
  out.pow(2).mean().backward();
  for (const auto& p : mod->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(torch::isfinite(p.value().grad()).all().item<bool>()) << p.key();
  }
}

}  // namespace
