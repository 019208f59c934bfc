// Internal: the stage ops of sequence-parallel Nyström attention as the
// dispatcher calls them (schemas in stage_ops.cpp; docs/DESIGN.md §12): the
// argument checks, the default scale, and one wrapper per op around the
// kernels of stages.h. csrc/cpu/stages.cpp and csrc/cuda/stages.cpp register
// the wrappers with NYSTROM_REGISTER_STAGES at their dispatch key.
#pragma once

#include "stages.h"

#include <c10/util/string_view.h>

#include <cmath>

namespace nystrom::stages {

/// The arguments of the first stage, which every later stage's inputs come
/// from: the local shards (B, H, L_local, D), (B, H, S_local, D),
/// (B, H, S_local, Dv), their masks (B, L_local), (B, S_local), geometry (B, 4).
inline void check_shards(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& geometry,
                         int64_t m, int64_t ms, const std::optional<Tensor>& kpm, const std::optional<Tensor>& qpm) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": query, key and value must be 4-D (B, H, n, d) shards, got shapes ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              ": query must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(k.scalar_type() == t && v.scalar_type() == t, op, ": key and value must have query's dtype ", t);
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op,
              ": key and value must be on query's device ", q.device());
  TORCH_CHECK(k.sym_size(0) == q.sym_size(0) && v.sym_size(0) == q.sym_size(0) && k.sym_size(1) == q.sym_size(1) &&
                  v.sym_size(1) == q.sym_size(1),
              op, ": query, key and value must have the same (B, H); got ", q.sizes(), ", ", k.sizes(), ", ",
              v.sizes());
  TORCH_CHECK(k.sym_size(3) == q.sym_size(3), op, ": key must have query's head dimension D");
  TORCH_CHECK(v.sym_size(2) == k.sym_size(2), op, ": value must have key's length");
  TORCH_CHECK(m >= 1, op, ": num_landmarks must be >= 1, got ", m);
  TORCH_CHECK(ms >= 1, op, ": landmark_rows must be >= 1, got ", ms);
  TORCH_CHECK(geometry.dim() == 2 && geometry.sym_size(0) == q.sym_size(0) && geometry.sym_size(1) == 4 &&
                  geometry.scalar_type() == at::kLong,
              op, ": geometry must be an int64 tensor (B, 4), got ", geometry.scalar_type(), " ", geometry.sizes());
  auto mask = [&](const std::optional<Tensor>& x, const char* name, const c10::SymInt& n) {
    if (!given(x)) return;
    TORCH_CHECK(x->scalar_type() == at::kBool && x->dim() == 2 && x->sym_size(0) == q.sym_size(0) &&
                    x->sym_size(1) == n,
                op, ": ", name, " must be a bool tensor of shape (B, ", n, "), got ", x->scalar_type(), " ",
                x->sizes());
    TORCH_CHECK(x->device() == q.device(), op, ": ", name, " must be on query's device ", q.device());
  };
  mask(kpm, "key_padding_mask", k.sym_size(2));
  mask(qpm, "query_padding_mask", q.sym_size(2));
}

inline bool parse_init(const char* op, c10::string_view pinv_init, int64_t iterations) {
  TORCH_CHECK(iterations >= 0, op, ": pinv_iterations must be >= 0, got ", iterations);
  const bool original = pinv_init == "original";
  TORCH_CHECK(original || pinv_init == "per_head", op, ": pinv_init must be \"per_head\" or \"original\", got \"",
              std::string(pinv_init), "\"");
  return original;
}

inline double resolve_scale(const char* op, std::optional<double> scale, int64_t D) {
  if (!scale.has_value()) return D > 0 ? 1.0 / std::sqrt(static_cast<double>(D)) : 1.0;
  TORCH_CHECK(std::isfinite(*scale) && *scale > 0.0, op, ": scale must be a finite number > 0, got ", *scale);
  return *scale;
}

// ---------------------------------------------------------------- wrappers --

using OptTensor = const std::optional<Tensor>&;

inline Tensors3 segment_sums_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& geometry, int64_t m,
                                int64_t ms, OptTensor kpm, OptTensor qpm) {
  constexpr const char* op = "nystrom_sp_segment_sums";
  check_shards(op, q, k, v, geometry, m, ms, kpm, qpm);
  if (geometry.device().is_cpu()) {
    // Host-side geometry (gloo, or a caller that keeps it there): the checks
    // the single-process CPU kernel makes, at no cost. On a device they would
    // need a synchronisation (the CUDA backend's rule, docs/DESIGN.md §3.6).
    const Geometry g(op, geometry, m, geometry.device());
    const Tensor no_keys = g.q_tot.gt(0).logical_and(g.k_tot.eq(0));
    if (no_keys.any().item<bool>()) {
      TORCH_CHECK(false, op, ": key_padding_mask masks every key of batch element ",
                  no_keys.nonzero().select(1, 0)[0].item<int64_t>(),
                  " (over all the shards); each batch element with real queries needs at least one real key");
    }
    const int64_t need = at::stack({g.mq, g.mk, g.mv}).max().item<int64_t>();
    TORCH_CHECK(need <= ms, op, ": landmark_rows (", ms, ") is less than the ", need, " rows an element needs");
  }
  return segment_sums(q, k, v, geometry, m, ms, kpm, qpm);
}

inline Tensors4 landmark_values_op(const Tensor& q_sums, const Tensor& k, const Tensor& v, const Tensor& geometry,
                                   int64_t m, OptTensor kpm, std::optional<double> scale) {
  return landmark_values(q_sums, k, v, geometry, m, kpm,
                         resolve_scale("nystrom_sp_landmark_values", scale, q_sums.size(3)));
}

inline Tensors2 merge_landmark_values_op(const Tensor& part_max, const Tensor& part_sum, const Tensor& part_pv,
                                         const Tensor& global_max) {
  return merge_landmark_values(part_max, part_sum, part_pv, global_max);
}

inline Tensors5 pseudoinverse_op(const Tensor& q_landmarks, const Tensor& k_sums, const Tensor& v_sums,
                                 const Tensor& sum, const Tensor& pv, const Tensor& global_max, const Tensor& geometry,
                                 int64_t m, int64_t iterations, c10::string_view pinv_init,
                                 std::optional<double> scale) {
  constexpr const char* op = "nystrom_sp_pseudoinverse";
  const bool original = parse_init(op, pinv_init, iterations);
  return pseudoinverse(q_landmarks, k_sums, v_sums, sum, pv, global_max, geometry, m, iterations, original,
                       resolve_scale(op, scale, q_landmarks.size(3)));
}

inline Tensors2 query_forward_op(const Tensor& q, const Tensor& k_landmarks, const Tensor& zbv, const Tensor& geometry,
                                 int64_t m, OptTensor qpm, std::optional<double> scale) {
  return query_forward(q, k_landmarks, zbv, geometry, m, qpm,
                       resolve_scale("nystrom_sp_query_forward", scale, q.size(3)));
}

inline Tensors3 query_backward_op(const Tensor& grad_out, const Tensor& q, const Tensor& k_landmarks,
                                  const Tensor& zbv, const Tensor& lse_query, const Tensor& geometry, int64_t m,
                                  OptTensor qpm, std::optional<double> scale) {
  return query_backward(grad_out, q, k_landmarks, zbv, lse_query, geometry, m, qpm,
                        resolve_scale("nystrom_sp_query_backward", scale, q.size(3)));
}

inline Tensors4 pseudoinverse_backward_op(const Tensor& k_landmark_grad, const Tensor& zbv_grad,
                                          const Tensor& q_landmarks, const Tensor& k_landmarks, const Tensor& bv,
                                          const Tensor& pinv_scale, const Tensor& geometry, int64_t m,
                                          int64_t iterations, c10::string_view pinv_init,
                                          std::optional<double> scale) {
  constexpr const char* op = "nystrom_sp_pseudoinverse_backward";
  const bool original = parse_init(op, pinv_init, iterations);
  return pseudoinverse_backward(k_landmark_grad, zbv_grad, q_landmarks, k_landmarks, bv, pinv_scale, geometry, m,
                                iterations, original, resolve_scale(op, scale, q_landmarks.size(3)));
}

inline Tensors3 key_backward_op(const Tensor& k, const Tensor& v, const Tensor& q_landmarks, const Tensor& bv,
                                const Tensor& lse_landmark, const Tensor& bv_grad, const Tensor& k_share,
                                const Tensor& v_share, const Tensor& geometry, int64_t m, OptTensor kpm,
                                std::optional<double> scale) {
  return key_backward(k, v, q_landmarks, bv, lse_landmark, bv_grad, k_share, v_share, geometry, m, kpm,
                      resolve_scale("nystrom_sp_key_backward", scale, k.size(3)));
}

inline Tensor query_spread_op(const Tensor& grad_query, const Tensor& keys_part, const Tensor& kernel_part,
                              const Tensor& geometry, int64_t m, at::ScalarType dtype, OptTensor qpm) {
  return query_spread(grad_query, keys_part, kernel_part, geometry, m, qpm, dtype);
}

}  // namespace nystrom::stages

/// Registers the stage kernels at the dispatch key of the enclosing
/// TORCH_LIBRARY_IMPL block.
#define NYSTROM_REGISTER_STAGES(m)                                                                \
  do {                                                                                            \
    using namespace ::nystrom::stages;                                                            \
    m.impl("nystrom_sp_segment_sums", &segment_sums_op);                                          \
    m.impl("nystrom_sp_landmark_values", &landmark_values_op);                                    \
    m.impl("nystrom_sp_merge_landmark_values", &merge_landmark_values_op);                        \
    m.impl("nystrom_sp_pseudoinverse", &pseudoinverse_op);                                        \
    m.impl("nystrom_sp_query_forward", &query_forward_op);                                        \
    m.impl("nystrom_sp_query_backward", &query_backward_op);                                      \
    m.impl("nystrom_sp_pseudoinverse_backward", &pseudoinverse_backward_op);                      \
    m.impl("nystrom_sp_key_backward", &key_backward_op);                                          \
    m.impl("nystrom_sp_query_spread", &query_spread_op);                                          \
  } while (0)
