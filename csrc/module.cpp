// The torch::nn layer NystromAttention (see nystrom/module.h).
#include <nystrom/module.h>

#include <torch/nn/init.h>

namespace nystrom {

NystromAttentionImpl::NystromAttentionImpl(NystromAttentionOptions options_) : options(std::move(options_)) {
  reset();
}

void NystromAttentionImpl::reset() {
  const int64_t E = options.embed_dim(), H = options.num_heads();
  TORCH_CHECK(E >= 1 && H >= 1 && E % H == 0, "NystromAttention: embed_dim (", E,
              ") must be a positive multiple of num_heads (", H, ")");
  TORCH_CHECK(options.num_landmarks() >= 1, "NystromAttention: num_landmarks must be >= 1, got ",
              options.num_landmarks());
  TORCH_CHECK(options.pinv_iterations() >= 0, "NystromAttention: pinv_iterations must be >= 0, got ",
              options.pinv_iterations());
  TORCH_CHECK(options.pinv_init() == "per_head" || options.pinv_init() == "original",
              "NystromAttention: pinv_init must be \"per_head\" or \"original\", got \"", options.pinv_init(),
              "\"");
  auto lin = torch::nn::LinearOptions(E, E).bias(options.bias());
  q_proj = register_module("q_proj", torch::nn::Linear(lin));
  k_proj = register_module("k_proj", torch::nn::Linear(lin));
  v_proj = register_module("v_proj", torch::nn::Linear(lin));
  out_proj = register_module("out_proj", torch::nn::Linear(lin));
  if (options.conv_kernel_size().has_value()) {
    const int64_t ks = *options.conv_kernel_size();
    TORCH_CHECK(ks >= 1 && ks % 2 == 1, "NystromAttention: conv_kernel_size must be a positive odd number, got ",
                ks);
    conv = register_module("conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(H, H, {ks, 1})
                                                         .padding({ks / 2, 0})
                                                         .groups(H)
                                                         .bias(false)));
  }
}

void NystromAttentionImpl::reset_parameters() {
  q_proj->reset_parameters();
  k_proj->reset_parameters();
  v_proj->reset_parameters();
  out_proj->reset_parameters();
  if (conv) conv->reset_parameters();
}

at::Tensor NystromAttentionImpl::forward(const at::Tensor& x, const std::optional<at::Tensor>& key_padding_mask) {
  const int64_t E = options.embed_dim(), H = options.num_heads();
  TORCH_CHECK(x.dim() == 3 && x.size(2) == E, "NystromAttention: x must have shape (B, L, embed_dim=", E,
              "), got ", x.sizes());
  const int64_t B = x.size(0), L = x.size(1), Dh = E / H;
  auto heads = [&](const at::Tensor& t) { return t.view({B, L, H, Dh}).transpose(1, 2); };
  at::Tensor q = heads(q_proj->forward(x));
  at::Tensor k = heads(k_proj->forward(x));
  at::Tensor v = heads(v_proj->forward(x));
  at::Tensor o = nystrom_attention(q, k, v, options.num_landmarks(), options.pinv_iterations(),
                                   options.pinv_init(), key_padding_mask, key_padding_mask);
  const bool masked = key_padding_mask.has_value() && key_padding_mask->defined();
  if (conv) {
    at::Tensor pad = masked ? key_padding_mask->view({B, 1, L, 1}) : at::Tensor();
    o = o + conv->forward(masked ? v.masked_fill(pad, 0) : v);
    if (masked) o = o.masked_fill(pad, 0);
  }
  return out_proj->forward(o.transpose(1, 2).reshape({B, L, E}));
}

}  // namespace nystrom
