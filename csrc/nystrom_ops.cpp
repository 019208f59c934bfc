// Schema of the nystrom ops and the C++ entry points that call through the
// dispatcher (so C++ callers get autograd and device dispatch exactly as
// Python callers do). The argument checks every backend shares: checks.cpp.

#include <nystrom/ops.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace nystrom {

// ------------------------------------------------------------------------
// C++ entry points: through the dispatcher.

at::Tensor nystrom_attention(const at::Tensor& query,
                             const at::Tensor& key,
                             const at::Tensor& value,
                             int64_t num_landmarks,
                             int64_t pinv_iterations,
                             const std::string& pinv_init,
                             const std::optional<at::Tensor>& key_padding_mask,
                             const std::optional<at::Tensor>& query_padding_mask,
                             std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nystrom::nystrom_attention", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         int64_t, c10::string_view, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, std::optional<double>)>();
  return op.call(query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                 query_padding_mask, scale);
}

ForwardResult nystrom_attention_forward(const at::Tensor& query,
                                        const at::Tensor& key,
                                        const at::Tensor& value,
                                        int64_t num_landmarks,
                                        int64_t pinv_iterations,
                                        const std::string& pinv_init,
                                        const std::optional<at::Tensor>& key_padding_mask,
                                        const std::optional<at::Tensor>& query_padding_mask,
                                        std::optional<double> scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("nystrom::nystrom_attention_forward", "")
                       .typed<ForwardResult(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                            int64_t, c10::string_view, const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&, std::optional<double>)>();
  return op.call(query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                 query_padding_mask, scale);
}

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
    std::optional<double> scale) {
  using T = const at::Tensor&;
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("nystrom::nystrom_attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              T, T, T, T, T, T, T, T, T, T, T, int64_t, int64_t, c10::string_view,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, std::optional<double>)>();
  return op.call(grad_out, query, key, value, q_landmarks, k_landmarks, bv, zbv, lse_query, lse_landmark,
                 pinv_scale, num_landmarks, pinv_iterations, pinv_init, key_padding_mask, query_padding_mask,
                 scale);
}

namespace {

// Without autograd (inference, Meta/fake tensors, torch.compile tracing) the
// top-level op is the forward op's first output.
at::Tensor nystrom_attention_composite(const at::Tensor& query,
                                       const at::Tensor& key,
                                       const at::Tensor& value,
                                       int64_t num_landmarks,
                                       int64_t pinv_iterations,
                                       c10::string_view pinv_init,
                                       const std::optional<at::Tensor>& key_padding_mask,
                                       const std::optional<at::Tensor>& query_padding_mask,
                                       std::optional<double> scale) {
  return std::get<0>(nystrom_attention_forward(query, key, value, num_landmarks, pinv_iterations,
                                               std::string(pinv_init), key_padding_mask,
                                               query_padding_mask, scale));
}

}  // namespace
}  // namespace nystrom

TORCH_LIBRARY(nystrom, m) {
  m.def(
      "nystrom_attention(Tensor query, Tensor key, Tensor value, int num_landmarks=64, "
      "int pinv_iterations=6, str pinv_init=\"per_head\", Tensor? key_padding_mask=None, "
      "Tensor? query_padding_mask=None, float? scale=None) -> Tensor");
  m.def(
      "nystrom_attention_forward(Tensor query, Tensor key, Tensor value, int num_landmarks=64, "
      "int pinv_iterations=6, str pinv_init=\"per_head\", Tensor? key_padding_mask=None, "
      "Tensor? query_padding_mask=None, float? scale=None) -> "
      "(Tensor out, Tensor q_landmarks, Tensor k_landmarks, Tensor bv, Tensor zbv, Tensor lse_query, "
      "Tensor lse_landmark, Tensor pinv_scale)");
  m.def(
      "nystrom_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor q_landmarks, Tensor k_landmarks, Tensor bv, Tensor zbv, Tensor lse_query, "
      "Tensor lse_landmark, Tensor pinv_scale, int num_landmarks, int pinv_iterations, str pinv_init, "
      "Tensor? key_padding_mask=None, Tensor? query_padding_mask=None, float? scale=None) -> "
      "(Tensor grad_query, Tensor grad_key, Tensor grad_value)");
}

TORCH_LIBRARY_IMPL(nystrom, CompositeExplicitAutograd, m) {
  m.impl("nystrom_attention", &nystrom::nystrom_attention_composite);
}
