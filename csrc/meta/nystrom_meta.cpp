// Shape (Meta) kernels: output shapes and dtypes without computing anything,
// for fake tensors, torch.compile and torch.export. Symbolic sizes are used
// throughout, so dynamic sequence lengths trace without specialising. The
// argument checks and the allocation of the saved outputs are the same calls
// as in the real kernels (checks.h, saved_tensors.h).
#include "checks.h"
#include "saved_tensors.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace nystrom {
namespace meta {
namespace {

using at::Tensor;

ForwardResult forward_meta(
    const Tensor& q,
    const Tensor& k,
    const Tensor& v,
    int64_t num_landmarks,
    int64_t pinv_iterations,
    c10::string_view pinv_init,
    const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& query_padding_mask,
    std::optional<double> scale) {
  detail::check_inputs("nystrom_attention_forward", q, k, v, num_landmarks, pinv_iterations, pinv_init,
                       key_padding_mask, query_padding_mask, scale);
  return detail::allocate_forward_outputs(q, k, v, num_landmarks, detail::Fill::kUninitialized, false).tuple();
}

std::tuple<Tensor, Tensor, Tensor> backward_meta(const Tensor& grad_out,
                                                 const Tensor& q,
                                                 const Tensor& k,
                                                 const Tensor& v,
                                                 const Tensor& q_landmarks,
                                                 const Tensor& k_landmarks,
                                                 const Tensor& bv,
                                                 const Tensor& zbv,
                                                 const Tensor& lse_query,
                                                 const Tensor& lse_landmark,
                                                 const Tensor& pinv_scale,
                                                 int64_t num_landmarks,
                                                 int64_t pinv_iterations,
                                                 c10::string_view pinv_init,
                                                 const std::optional<Tensor>& key_padding_mask,
                                                 const std::optional<Tensor>& query_padding_mask,
                                                 std::optional<double> scale) {
  constexpr const char* op = "nystrom_attention_backward";
  detail::check_inputs(op, q, k, v, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                       query_padding_mask, scale);
  detail::check_backward_inputs(op, grad_out, q, k, v, num_landmarks, q_landmarks, k_landmarks, bv, zbv,
                                lse_query, lse_landmark, pinv_scale);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

}  // namespace
}  // namespace meta
}  // namespace nystrom

TORCH_LIBRARY_IMPL(nystrom, Meta, m) {
  m.impl("nystrom_attention_forward", &nystrom::meta::forward_meta);
  m.impl("nystrom_attention_backward", &nystrom::meta::backward_meta);
}
