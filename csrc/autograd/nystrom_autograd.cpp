// Autograd of the nystrom ops, registered in C++ at the Autograd key so that
// TorchScript and C++ callers get gradients without Python.
//
// nystrom_attention's backward is the exact derivative of the computed
// function (through every Newton–Schulz iteration and the init scale c),
// evaluated by the nystrom_attention_backward op. That op is itself
// registered here with a backward that refuses: double backward is not
// implemented, and a silent zero would be wrong. The forward op, likewise,
// refuses to be differentiated on its own (docs/DESIGN.md §8).
#include <nystrom/ops.h>

#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace nystrom {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class NystromBackwardFunction : public torch::autograd::Function<NystromBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx,
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
                               std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = nystrom_attention_backward(grad_out, query, key, value, q_landmarks, k_landmarks, bv, zbv,
                                                   lse_query, lse_landmark, pinv_scale, num_landmarks,
                                                   pinv_iterations, pinv_init, key_padding_mask,
                                                   query_padding_mask, scale);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(false,
                "nystrom_attention: double backward (a gradient of the gradient) is not implemented; "
                "call backward/autograd.grad without create_graph=True through this op");
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_op_autograd(
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
    c10::string_view pinv_init,
    const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& query_padding_mask,
    std::optional<double> scale) {
  auto r = NystromBackwardFunction::apply(grad_out, query, key, value, q_landmarks, k_landmarks, bv, zbv,
                                          lse_query, lse_landmark, pinv_scale, num_landmarks, pinv_iterations,
                                          std::string(pinv_init), key_padding_mask, query_padding_mask, scale);
  return {r[0], r[1], r[2]};
}

// The forward op is an internal piece: gradients come through
// nystrom_attention. Backpropagating through the forward op itself is
// refused with a message, instead of torch's "no autograd kernel" warning
// and a silently missing gradient.
class ForwardOpFunction : public torch::autograd::Function<ForwardOpFunction> {
 public:
  static variable_list forward(AutogradContext* ctx,
                               const at::Tensor& query,
                               const at::Tensor& key,
                               const at::Tensor& value,
                               int64_t num_landmarks,
                               int64_t pinv_iterations,
                               const std::string& pinv_init,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& query_padding_mask,
                               std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c] =
        nystrom_attention_forward(query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                                  query_padding_mask, scale);
    return {out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(false,
                "nystrom_attention_forward: this op has no gradient of its own (it is the internal forward "
                "piece); call nystrom_attention (torch.ops.nystrom.nystrom_attention) to differentiate");
  }
};

ForwardResult forward_op_autograd(const at::Tensor& query,
                                  const at::Tensor& key,
                                  const at::Tensor& value,
                                  int64_t num_landmarks,
                                  int64_t pinv_iterations,
                                  c10::string_view pinv_init,
                                  const std::optional<at::Tensor>& key_padding_mask,
                                  const std::optional<at::Tensor>& query_padding_mask,
                                  std::optional<double> scale) {
  auto r = ForwardOpFunction::apply(query, key, value, num_landmarks, pinv_iterations, std::string(pinv_init),
                                    key_padding_mask, query_padding_mask, scale);
  return {r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
}

class NystromFunction : public torch::autograd::Function<NystromFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx,
                            const at::Tensor& query,
                            const at::Tensor& key,
                            const at::Tensor& value,
                            int64_t num_landmarks,
                            int64_t pinv_iterations,
                            const std::string& pinv_init,
                            const std::optional<at::Tensor>& key_padding_mask,
                            const std::optional<at::Tensor>& query_padding_mask,
                            std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c] =
        nystrom_attention_forward(query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                                  query_padding_mask, scale);
    ctx->save_for_backward({query, key, value, q_lm, k_lm, bv, zbv, lse_q, lse_l, c});
    ctx->saved_data["num_landmarks"] = num_landmarks;
    ctx->saved_data["pinv_iterations"] = pinv_iterations;
    ctx->saved_data["pinv_init"] = pinv_init;
    ctx->saved_data["key_padding_mask"] = key_padding_mask;
    ctx->saved_data["query_padding_mask"] = query_padding_mask;
    ctx->saved_data["scale"] = scale;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto s = ctx->get_saved_variables();
    at::Tensor grad = grad_outputs[0];
    if (!grad.defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto [dq, dk, dv] = nystrom_attention_backward(
        grad, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9],
        ctx->saved_data["num_landmarks"].toInt(), ctx->saved_data["pinv_iterations"].toInt(),
        ctx->saved_data["pinv_init"].toStringRef(), ctx->saved_data["key_padding_mask"].toOptional<at::Tensor>(),
        ctx->saved_data["query_padding_mask"].toOptional<at::Tensor>(),
        ctx->saved_data["scale"].toOptional<double>());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor nystrom_attention_autograd(const at::Tensor& query,
                                      const at::Tensor& key,
                                      const at::Tensor& value,
                                      int64_t num_landmarks,
                                      int64_t pinv_iterations,
                                      c10::string_view pinv_init,
                                      const std::optional<at::Tensor>& key_padding_mask,
                                      const std::optional<at::Tensor>& query_padding_mask,
                                      std::optional<double> scale) {
  return NystromFunction::apply(query, key, value, num_landmarks, pinv_iterations, std::string(pinv_init),
                                key_padding_mask, query_padding_mask, scale);
}

}  // namespace
}  // namespace nystrom

TORCH_LIBRARY_IMPL(nystrom, Autograd, m) {
  m.impl("nystrom_attention", &nystrom::nystrom_attention_autograd);
  m.impl("nystrom_attention_forward", &nystrom::forward_op_autograd);
  m.impl("nystrom_attention_backward", &nystrom::backward_op_autograd);
}
