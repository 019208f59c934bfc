// The float64 reference of the C++ tests: Nyström attention written out
// densely from the math of docs/DESIGN.md (segment-mean landmarks, three
// softmaxes, Newton–Schulz pseudoinverse, out = F (Z (Bm v)), exact attention
// for a batch element whose real tokens the landmarks cover), and the
// torch::nn layer written out with its own parameters. Differentiable with
// LibTorch autograd: reference gradients are its gradients, in float64.
#pragma once

#include <nystrom/nystrom.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

namespace nystrom_test {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr auto kF64 = torch::kFloat64;

struct RefConfig {
  int64_t num_landmarks = 64;
  int64_t pinv_iterations = 6;
  std::string pinv_init = "per_head";
  std::optional<double> scale = std::nullopt;
};

// x (H, n, D) -> (H, m, D): mean of segment j = tokens [floor(j n / m), floor((j + 1) n / m)).
inline Tensor segment_means(const Tensor& x, int64_t m) {
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
inline Tensor real_positions(const OptTensor& padding_mask, int64_t b, int64_t n) {
  if (!padding_mask.has_value()) {
    return torch::arange(n, torch::kLong);
  }
  return torch::nonzero(padding_mask->select(0, b).logical_not()).view({-1});
}

struct RefItem {
  Tensor query_pos;  // (L_b,)
  Tensor q, k, v;    // (H, L_b, D), (H, S_b, D), (H, S_b, Dv)
  bool exact = false;
  Tensor F, A, Bm;  // softmax factors (approximate branch only)
  Tensor c;         // (H,) largest column sum of A
};

struct RefResult {
  Tensor out;         // (B, H, L, Dv) float64
  Tensor pinv_scale;  // (B, H) float64, the c that was used (undefined for exact rows)
};

// Dense float64 Nyström attention, differentiable with LibTorch autograd.
inline RefResult reference_full(const Tensor& query, const Tensor& key, const Tensor& value,
                                const RefConfig& cfg,
                                const OptTensor& key_padding_mask = std::nullopt,
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

inline Tensor reference(const Tensor& q, const Tensor& k, const Tensor& v, const RefConfig& cfg,
                        const OptTensor& key_padding_mask = std::nullopt,
                        const OptTensor& query_padding_mask = std::nullopt) {
  return reference_full(q, k, v, cfg, key_padding_mask, query_padding_mask).out;
}

// The same self-attention layer, written out with the layer's own parameters.
inline Tensor module_reference(nystrom::NystromAttention& mod, const Tensor& x,
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

}  // namespace nystrom_test
