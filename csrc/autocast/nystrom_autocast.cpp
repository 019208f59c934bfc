// Autocast: under torch.autocast the op runs in the autocast dtype (float16
// or bfloat16); its softmax statistics and pseudoinverse stay in float32, as
// for any half-precision input. float64 inputs are left alone, as autocast
// does for every op it casts.
#include <nystrom/ops.h>

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace nystrom {
namespace {

template <c10::DeviceType device>
at::Tensor nystrom_attention_autocast(const at::Tensor& query,
                                      const at::Tensor& key,
                                      const at::Tensor& value,
                                      int64_t num_landmarks,
                                      int64_t pinv_iterations,
                                      c10::string_view pinv_init,
                                      const std::optional<at::Tensor>& key_padding_mask,
                                      const std::optional<at::Tensor>& query_padding_mask,
                                      std::optional<double> scale) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return nystrom_attention(at::autocast::cached_cast(dtype, query, device),
                           at::autocast::cached_cast(dtype, key, device),
                           at::autocast::cached_cast(dtype, value, device), num_landmarks, pinv_iterations,
                           std::string(pinv_init), key_padding_mask, query_padding_mask, scale);
}

}  // namespace
}  // namespace nystrom

TORCH_LIBRARY_IMPL(nystrom, AutocastCPU, m) {
  m.impl("nystrom_attention", &nystrom::nystrom_attention_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(nystrom, AutocastCUDA, m) {
  m.impl("nystrom_attention", &nystrom::nystrom_attention_autocast<c10::DeviceType::CUDA>);
}
