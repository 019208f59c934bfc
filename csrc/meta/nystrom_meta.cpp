// Shape (Meta) kernels: output shapes and dtypes without computing anything,
// for fake tensors, torch.compile and torch.export. Symbolic sizes are used
// throughout, so dynamic sequence lengths trace without specialising. The
// argument checks are the same calls as in the real kernels.
#include "nystrom_common.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace nystrom {
namespace meta {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_meta(
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
  const auto B = q.sym_size(0), H = q.sym_size(1), L = q.sym_size(2), D = q.sym_size(3);
  const auto Dv = v.sym_size(3);
  const c10::SymInt m = detail::saved_landmarks(num_landmarks, L, k.sym_size(2));
  const auto acc = q.options().dtype(detail::accumulate_type(q.scalar_type()));
  return {at::empty_symint({B, H, L, Dv}, q.options()), at::empty_symint({B, H, m, D}, acc),
          at::empty_symint({B, H, m, D}, acc),         at::empty_symint({B, H, m, Dv}, acc),
          at::empty_symint({B, H, m, Dv}, acc),        at::empty_symint({B, H, L}, acc),
          at::empty_symint({B, H, m}, acc),            at::empty_symint({B, H}, acc)};
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
