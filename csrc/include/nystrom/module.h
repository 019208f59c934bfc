// torch::nn layer: multi-head self-attention with Nyström attention inside.
#pragma once

#include <nystrom/ops.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <optional>
#include <string>

namespace nystrom {

/// Options of NystromAttention; the same names and defaults as the Python
/// layer `torch_nystrom.NystromAttention`.
struct NystromAttentionOptions {
  NystromAttentionOptions(int64_t embed_dim, int64_t num_heads)
      : embed_dim_(embed_dim), num_heads_(num_heads) {}
  /// Model width E; must be divisible by num_heads.
  TORCH_ARG(int64_t, embed_dim);
  /// Number of heads H; the head dimension is E / H.
  TORCH_ARG(int64_t, num_heads);
  /// Landmarks m.
  TORCH_ARG(int64_t, num_landmarks) = 64;
  /// Newton–Schulz iterations.
  TORCH_ARG(int64_t, pinv_iterations) = 6;
  /// "per_head" or "original".
  TORCH_ARG(std::string, pinv_init) = "per_head";
  /// Kernel size of the depthwise convolution skip on V (the paper's, odd,
  /// along the sequence); nullopt disables it.
  TORCH_ARG(std::optional<int64_t>, conv_kernel_size) = std::nullopt;
  /// Whether the q/k/v/out projections have a bias.
  TORCH_ARG(bool, bias) = true;
};

/// Self-attention layer: input (B, L, E), optional key_padding_mask (B, L)
/// with true marking padding; output (B, L, E) with padded rows set to zero
/// before the output projection.
class NystromAttentionImpl : public torch::nn::Cloneable<NystromAttentionImpl> {
 public:
  NystromAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : NystromAttentionImpl(NystromAttentionOptions(embed_dim, num_heads)) {}
  explicit NystromAttentionImpl(NystromAttentionOptions options);

  void reset() override;
  void reset_parameters();

  /// @param x (B, L, E).
  /// @param key_padding_mask optional bool (B, L), true = padding.
  at::Tensor forward(const at::Tensor& x,
                     const std::optional<at::Tensor>& key_padding_mask = std::nullopt);

  NystromAttentionOptions options;
  torch::nn::Linear q_proj{nullptr};
  torch::nn::Linear k_proj{nullptr};
  torch::nn::Linear v_proj{nullptr};
  torch::nn::Linear out_proj{nullptr};
  /// Present only when options.conv_kernel_size() is set.
  torch::nn::Conv2d conv{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(std::optional<at::Tensor>())})
};

TORCH_MODULE(NystromAttention);

}  // namespace nystrom
