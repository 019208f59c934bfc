// Internal: the saved-tensor contract between the forward and the backward
// op (docs/DESIGN.md §4), in one place for every backend:
//   - allocate_forward_outputs: the eight outputs of nystrom_attention_forward,
//     with their shapes and dtypes, for the Meta, CPU and CUDA kernels;
//   - forward_prologue / backward_prologue: the checks, the detached inputs
//     and the sizes every real (CPU, CUDA) kernel starts from.
#pragma once

#include "checks.h"

#include <nystrom/ops.h>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace nystrom::detail {

/// The outputs of nystrom_attention_forward by name (ops.h: ForwardResult).
struct ForwardOutputs {
  at::Tensor out;           // (B, H, L, Dv), input dtype
  at::Tensor q_landmarks;   // (B, H, ms, D), accumulate type
  at::Tensor k_landmarks;   // (B, H, ms, D)
  at::Tensor bv;            // (B, H, ms, Dv): Bm·V
  at::Tensor zbv;           // (B, H, ms, Dv): Z·Bm·V (the values W of the query pass)
  at::Tensor lse_query;     // (B, H, L)
  at::Tensor lse_landmark;  // (B, H, ms)
  at::Tensor pinv_scale;    // (B, H): the c of Z_0 = Aᵀ / c
  ForwardResult tuple() const {
    return {out, q_landmarks, k_landmarks, bv, zbv, lse_query, lse_landmark, pinv_scale};
  }
};

enum class Fill {
  kUninitialized,  // shapes only (Meta)
  kZeros,          // what the kernels do not write reads as 0 (CPU, CUDA)
};

/// The forward's outputs for query (B, H, L, D), key (B, H, S, D) and value
/// (B, H, S, Dv), with ms = saved_landmarks(num_landmarks, L, S) landmark
/// rows. With Fill::kZeros every saved tensor starts at zero, and `out` too
/// when zero_out (rows of padded queries are never written); otherwise `out`
/// is uninitialised. Symbolic sizes throughout (Meta under dynamic shapes).
ForwardOutputs allocate_forward_outputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                        int64_t num_landmarks, Fill fill, bool zero_out);

/// A checked call with concrete sizes, inputs detached (no autograd history:
/// the kernels run ATen ops on them).
struct Call {
  Options o;
  at::Tensor q, k, v;
  int64_t B = 0, H = 0, L = 0, S = 0, D = 0, Dv = 0;
  int64_t ms = 0;  // landmark rows of the saved tensors: min(m, max(L, S))
  at::ScalarType acc = at::kFloat;  // the accumulate type (checks.h)
  at::TensorOptions acc_opts;       // q's device, dtype acc
  bool has_query_mask = false, has_key_mask = false;
};

/// Checks the forward op's arguments (check_inputs) and unpacks them.
Call forward_prologue(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                      int64_t num_landmarks, int64_t pinv_iterations, c10::string_view pinv_init,
                      const std::optional<at::Tensor>& key_padding_mask,
                      const std::optional<at::Tensor>& query_padding_mask, std::optional<double> scale);

/// The backward op's call: the forward's call plus grad_out and the saved
/// outputs, all checked (check_backward_inputs) and detached.
struct BackwardCall : Call {
  at::Tensor grad_out, q_landmarks, k_landmarks, bv, zbv, lse_query, lse_landmark, pinv_scale;
};

BackwardCall backward_prologue(const char* op, const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const at::Tensor& q_landmarks,
                               const at::Tensor& k_landmarks, const at::Tensor& bv, const at::Tensor& zbv,
                               const at::Tensor& lse_query, const at::Tensor& lse_landmark,
                               const at::Tensor& pinv_scale, int64_t num_landmarks, int64_t pinv_iterations,
                               c10::string_view pinv_init, const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& query_padding_mask, std::optional<double> scale);

}  // namespace nystrom::detail
