// Internal: the argument checks and option parsing of the nystrom ops, shared
// by every backend (CPU, CUDA, Meta) so that the same bad call fails with the
// same words everywhere (docs/DESIGN.md §4). Implemented in checks.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace nystrom::detail {

/// The validated, parsed form of the op's non-tensor arguments.
struct Options {
  int64_t num_landmarks;
  int64_t pinv_iterations;
  bool original_init;  // pinv_init == "original"
  double scale;        // resolved: D^-0.5 when the caller gave none (NaN when D is symbolic)
};

/// Checks query/key/value/masks/options; throws c10::Error naming the
/// offending argument. Uses only symbolic sizes, so it runs in Meta kernels
/// under dynamic shapes too.
Options check_inputs(const char* op,
                     const at::Tensor& query,
                     const at::Tensor& key,
                     const at::Tensor& value,
                     int64_t num_landmarks,
                     int64_t pinv_iterations,
                     c10::string_view pinv_init,
                     const std::optional<at::Tensor>& key_padding_mask,
                     const std::optional<at::Tensor>& query_padding_mask,
                     std::optional<double> scale);

/// Checks the saved tensors and grad_out handed to the backward op.
void check_backward_inputs(const char* op,
                           const at::Tensor& grad_out,
                           const at::Tensor& query,
                           const at::Tensor& key,
                           const at::Tensor& value,
                           int64_t num_landmarks,
                           const at::Tensor& q_landmarks,
                           const at::Tensor& k_landmarks,
                           const at::Tensor& bv,
                           const at::Tensor& zbv,
                           const at::Tensor& lse_query,
                           const at::Tensor& lse_landmark,
                           const at::Tensor& pinv_scale);

/// Rows of the saved per-landmark tensors: min(m, max(L, S)). No batch element
/// has more landmarks (when m >= max(L, S) every element is exact), so a huge
/// num_landmarks costs no memory.
inline c10::SymInt saved_landmarks(int64_t num_landmarks, const c10::SymInt& L, const c10::SymInt& S) {
  return c10::SymInt(num_landmarks).min(L.max(S));
}

/// float32 for float32/float16/bfloat16 inputs, float64 for float64.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace nystrom::detail
