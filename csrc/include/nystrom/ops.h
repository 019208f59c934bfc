// Public functional API of torch-nystrom.
//
// Nyström self-attention (Xiong et al., AAAI 2021) as a LibTorch operator.
// Every function here calls through the PyTorch dispatcher, so it has
// autograd and runs on whichever backend the inputs live on.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace nystrom {

/// Nyström approximation of softmax attention.
///
/// @param query  (B, H, L, D) floating tensor.
/// @param key    (B, H, S, D), same dtype and device as @p query.
/// @param value  (B, H, S, Dv), same dtype and device as @p query.
/// @param num_landmarks  m >= 1. Batch elements with at most m real queries
///        and at most m real keys get exact softmax attention.
/// @param pinv_iterations  Newton–Schulz iterations (>= 0).
/// @param pinv_init  "per_head" (default) or "original" (the paper's and
///        Hugging Face's choice of the initial scale: one maximum over the
///        whole batch and all heads).
/// @param key_padding_mask  optional bool (B, S), true marks padding.
/// @param query_padding_mask  optional bool (B, L), true marks padding;
///        output rows of padded queries are zero.
/// @param scale  optional softmax scale, default D^-0.5.
/// @return (B, H, L, Dv) tensor of the input's dtype.
at::Tensor nystrom_attention(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    int64_t num_landmarks = 64,
    int64_t pinv_iterations = 6,
    const std::string& pinv_init = "per_head",
    const std::optional<at::Tensor>& key_padding_mask = std::nullopt,
    const std::optional<at::Tensor>& query_padding_mask = std::nullopt,
    std::optional<double> scale = std::nullopt);

/// The tensors the forward pass returns: the output and what the backward
/// pass needs (all small except `out` and `lse_query`). Here
/// m = min(num_landmarks, max(L, S)); rows past a batch element's own
/// landmark count are zero.
using ForwardResult = std::tuple<
    at::Tensor,  // out            (B, H, L, Dv), input dtype
    at::Tensor,  // q_landmarks    (B, H, m, D), float32 or float64
    at::Tensor,  // k_landmarks    (B, H, m, D)
    at::Tensor,  // bv = Bm·V      (B, H, m, Dv)
    at::Tensor,  // zbv = Z·Bm·V   (B, H, m, Dv)
    at::Tensor,  // lse_query      (B, H, L): log-sum-exp of each query row
    at::Tensor,  // lse_landmark   (B, H, m): log-sum-exp of each row of Bm
    at::Tensor>; // pinv_scale     (B, H): the c that Z0 = A^T / c used

/// The forward op without autograd (`torch.ops.nystrom.nystrom_attention_forward`).
ForwardResult nystrom_attention_forward(
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    int64_t num_landmarks,
    int64_t pinv_iterations,
    const std::string& pinv_init,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask,
    std::optional<double> scale);

/// The backward op (`torch.ops.nystrom.nystrom_attention_backward`): the
/// gradients with respect to query, key and value. Double backward is refused.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nystrom_attention_backward(
    const at::Tensor& grad_out,
    const at::Tensor& query,
    const at::Tensor& key,
    const at::Tensor& value,
    const at::Tensor& q_landmarks,
    const at::Tensor& k_landmarks,
    const at::Tensor& bv,
    const at::Tensor& zbv,
    const at::Tensor& lse_query,
    const at::Tensor& lse_landmark,
    const at::Tensor& pinv_scale,
    int64_t num_landmarks,
    int64_t pinv_iterations,
    const std::string& pinv_init,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask,
    std::optional<double> scale);

}  // namespace nystrom
