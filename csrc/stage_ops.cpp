// The stage ops of sequence-parallel Nyström attention (docs/DESIGN.md §12):
// their schemas and their shape (Meta) kernels. The computing kernels are
// csrc/stages.h, registered at CPU by csrc/cpu/stages.cpp and at CUDA by
// csrc/cuda/stages.cpp; torch_nystrom.distributed calls them between its
// collectives.
#include "stage_ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace nystrom::stages {
namespace {

using c10::SymInt;
using OptT = const std::optional<Tensor>&;

at::TensorOptions acc_options(const Tensor& t) { return t.options().dtype(acc_of(t)); }

Tensor empty_like_shape(std::initializer_list<SymInt> shape, const at::TensorOptions& o) {
  return at::empty_symint(c10::SymIntArrayRef(shape.begin(), shape.size()), o);
}

Tensors3 segment_sums_meta(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& geometry, int64_t m,
                           int64_t ms, OptT kpm, OptT qpm) {
  check_shards("nystrom_sp_segment_sums", q, k, v, geometry, m, ms, kpm, qpm);
  const auto o = acc_options(q);
  const SymInt B = q.sym_size(0), H = q.sym_size(1);
  return {empty_like_shape({B, H, ms, q.sym_size(3)}, o), empty_like_shape({B, H, ms, k.sym_size(3)}, o),
          empty_like_shape({B, H, ms, v.sym_size(3)}, o)};
}

Tensors4 landmark_values_meta(const Tensor& q_sums, const Tensor& k, const Tensor& v, const Tensor& geometry, int64_t m,
                              OptT kpm, std::optional<double> scale) {
  const SymInt B = q_sums.sym_size(0), H = q_sums.sym_size(1), ms = q_sums.sym_size(2);
  const auto o = q_sums.options();
  return {at::empty_symint(q_sums.sym_sizes(), o), empty_like_shape({B, H, ms}, o), empty_like_shape({B, H, ms}, o),
          empty_like_shape({B, H, ms, v.sym_size(3)}, o)};
}

Tensors2 merge_meta(const Tensor& part_max, const Tensor& part_sum, const Tensor& part_pv, const Tensor& global_max) {
  return {at::empty_symint(part_sum.sym_sizes(), part_sum.options()),
          at::empty_symint(part_pv.sym_sizes(), part_pv.options())};
}

Tensors5 pseudoinverse_meta(const Tensor& q_landmarks, const Tensor& k_sums, const Tensor& v_sums, const Tensor& sum,
                            const Tensor& pv, const Tensor& global_max, const Tensor& geometry, int64_t m,
                            int64_t iterations, c10::string_view pinv_init, std::optional<double> scale) {
  parse_init("nystrom_sp_pseudoinverse", pinv_init, iterations);
  const auto o = q_landmarks.options();
  return {at::empty_symint(k_sums.sym_sizes(), o), at::empty_symint(pv.sym_sizes(), o),
          at::empty_symint(v_sums.sym_sizes(), o), at::empty_symint(sum.sym_sizes(), o),
          empty_like_shape({q_landmarks.sym_size(0), q_landmarks.sym_size(1)}, o)};
}

Tensors2 query_forward_meta(const Tensor& q, const Tensor& k_landmarks, const Tensor& zbv, const Tensor& geometry,
                            int64_t m, OptT qpm, std::optional<double> scale) {
  const SymInt B = q.sym_size(0), H = q.sym_size(1), L = q.sym_size(2);
  return {empty_like_shape({B, H, L, zbv.sym_size(3)}, q.options()), empty_like_shape({B, H, L}, k_landmarks.options())};
}

Tensors3 query_backward_meta(const Tensor& grad_out, const Tensor& q, const Tensor& k_landmarks, const Tensor& zbv,
                             const Tensor& lse_query, const Tensor& geometry, int64_t m, OptT qpm,
                             std::optional<double> scale) {
  return {at::empty_symint(q.sym_sizes(), k_landmarks.options()),
          at::empty_symint(k_landmarks.sym_sizes(), k_landmarks.options()),
          at::empty_symint(zbv.sym_sizes(), zbv.options())};
}

Tensors4 pseudoinverse_backward_meta(const Tensor& k_landmark_grad, const Tensor& zbv_grad, const Tensor& q_landmarks,
                                     const Tensor& k_landmarks, const Tensor& bv, const Tensor& pinv_scale,
                                     const Tensor& geometry, int64_t m, int64_t iterations,
                                     c10::string_view pinv_init, std::optional<double> scale) {
  parse_init("nystrom_sp_pseudoinverse_backward", pinv_init, iterations);
  const auto o = q_landmarks.options();
  return {at::empty_symint(q_landmarks.sym_sizes(), o), at::empty_symint(k_landmarks.sym_sizes(), o),
          at::empty_symint(bv.sym_sizes(), o), at::empty_symint(zbv_grad.sym_sizes(), o)};
}

Tensors3 key_backward_meta(const Tensor& k, const Tensor& v, const Tensor& q_landmarks, const Tensor& bv,
                           const Tensor& lse_landmark, const Tensor& bv_grad, const Tensor& k_share,
                           const Tensor& v_share, const Tensor& geometry, int64_t m, OptT kpm,
                           std::optional<double> scale) {
  return {at::empty_symint(k.sym_sizes(), k.options()), at::empty_symint(v.sym_sizes(), v.options()),
          at::empty_symint(q_landmarks.sym_sizes(), q_landmarks.options())};
}

Tensor query_spread_meta(const Tensor& grad_query, const Tensor& keys_part, const Tensor& kernel_part,
                         const Tensor& geometry, int64_t m, at::ScalarType dtype, OptT qpm) {
  return at::empty_symint(grad_query.sym_sizes(), grad_query.options().dtype(dtype));
}

}  // namespace
}  // namespace nystrom::stages

TORCH_LIBRARY_FRAGMENT(nystrom, m) {
  m.def(
      "nystrom_sp_segment_sums(Tensor query, Tensor key, Tensor value, Tensor geometry, int num_landmarks, "
      "int landmark_rows, Tensor? key_padding_mask=None, Tensor? query_padding_mask=None) -> "
      "(Tensor q_sums, Tensor k_sums, Tensor v_sums)");
  m.def(
      "nystrom_sp_landmark_values(Tensor q_sums, Tensor key, Tensor value, Tensor geometry, int num_landmarks, "
      "Tensor? key_padding_mask=None, float? scale=None) -> "
      "(Tensor q_landmarks, Tensor part_max, Tensor part_sum, Tensor part_pv)");
  m.def(
      "nystrom_sp_merge_landmark_values(Tensor part_max, Tensor part_sum, Tensor part_pv, Tensor global_max) -> "
      "(Tensor sum, Tensor pv)");
  m.def(
      "nystrom_sp_pseudoinverse(Tensor q_landmarks, Tensor k_sums, Tensor v_sums, Tensor sum, Tensor pv, "
      "Tensor global_max, Tensor geometry, int num_landmarks, int pinv_iterations=6, str pinv_init=\"per_head\", "
      "float? scale=None) -> (Tensor k_landmarks, Tensor bv, Tensor zbv, Tensor lse_landmark, Tensor pinv_scale)");
  m.def(
      "nystrom_sp_query_forward(Tensor query, Tensor k_landmarks, Tensor zbv, Tensor geometry, int num_landmarks, "
      "Tensor? query_padding_mask=None, float? scale=None) -> (Tensor out, Tensor lse_query)");
  m.def(
      "nystrom_sp_query_backward(Tensor grad_out, Tensor query, Tensor k_landmarks, Tensor zbv, Tensor lse_query, "
      "Tensor geometry, int num_landmarks, Tensor? query_padding_mask=None, float? scale=None) -> "
      "(Tensor grad_query, Tensor k_landmark_grad, Tensor zbv_grad)");
  m.def(
      "nystrom_sp_pseudoinverse_backward(Tensor k_landmark_grad, Tensor zbv_grad, Tensor q_landmarks, "
      "Tensor k_landmarks, Tensor bv, Tensor pinv_scale, Tensor geometry, int num_landmarks, "
      "int pinv_iterations=6, str pinv_init=\"per_head\", float? scale=None) -> "
      "(Tensor q_landmark_grad, Tensor k_share, Tensor bv_grad, Tensor v_share)");
  m.def(
      "nystrom_sp_key_backward(Tensor key, Tensor value, Tensor q_landmarks, Tensor bv, Tensor lse_landmark, "
      "Tensor bv_grad, Tensor k_share, Tensor v_share, Tensor geometry, int num_landmarks, "
      "Tensor? key_padding_mask=None, float? scale=None) -> (Tensor grad_key, Tensor grad_value, "
      "Tensor q_landmark_grad)");
  m.def(
      "nystrom_sp_query_spread(Tensor grad_query, Tensor q_landmark_grad_keys, Tensor q_landmark_grad_kernel, "
      "Tensor geometry, int num_landmarks, ScalarType dtype, Tensor? query_padding_mask=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(nystrom, Meta, m) {
  using namespace nystrom::stages;
  m.impl("nystrom_sp_segment_sums", &segment_sums_meta);
  m.impl("nystrom_sp_landmark_values", &landmark_values_meta);
  m.impl("nystrom_sp_merge_landmark_values", &merge_meta);
  m.impl("nystrom_sp_pseudoinverse", &pseudoinverse_meta);
  m.impl("nystrom_sp_query_forward", &query_forward_meta);
  m.impl("nystrom_sp_query_backward", &query_backward_meta);
  m.impl("nystrom_sp_pseudoinverse_backward", &pseudoinverse_backward_meta);
  m.impl("nystrom_sp_key_backward", &key_backward_meta);
  m.impl("nystrom_sp_query_spread", &query_spread_meta);
}
