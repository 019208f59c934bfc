// The saved-tensor contract (saved_tensors.h, docs/DESIGN.md §4).
#include "saved_tensors.h"

#include <ATen/ATen.h>

namespace nystrom::detail {

ForwardOutputs allocate_forward_outputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        int64_t num_landmarks, Fill fill, bool zero_out) {
  const auto B = q.sym_size(0), H = q.sym_size(1), L = q.sym_size(2), D = q.sym_size(3);
  const auto Dv = v.sym_size(3);
  const c10::SymInt m = saved_landmarks(num_landmarks, L, k.sym_size(2));
  const auto acc = q.options().dtype(accumulate_type(q.scalar_type()));
  const bool zeros = fill == Fill::kZeros;
  auto make = [&](c10::SymIntArrayRef shape, const at::TensorOptions& opts, bool zero) {
    return zero ? at::zeros_symint(shape, opts) : at::empty_symint(shape, opts);
  };
  ForwardOutputs r;
  r.out = make({B, H, L, Dv}, q.options(), zeros && zero_out);
  r.q_landmarks = make({B, H, m, D}, acc, zeros);
  r.k_landmarks = make({B, H, m, D}, acc, zeros);
  r.bv = make({B, H, m, Dv}, acc, zeros);
  r.zbv = make({B, H, m, Dv}, acc, zeros);
  r.lse_query = make({B, H, L}, acc, zeros);
  r.lse_landmark = make({B, H, m}, acc, zeros);
  r.pinv_scale = make({B, H}, acc, zeros);
  return r;
}

namespace {

bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void unpack(Call& c, const Options& o, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
            const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& query_padding_mask) {
  c.o = o;
  c.q = query.detach();
  c.k = key.detach();
  c.v = value.detach();
  c.B = c.q.size(0);
  c.H = c.q.size(1);
  c.L = c.q.size(2);
  c.D = c.q.size(3);
  c.S = c.k.size(2);
  c.Dv = c.v.size(3);
  c.ms = saved_landmarks(o.num_landmarks, c.L, c.S).expect_int();
  c.acc = accumulate_type(c.q.scalar_type());
  c.acc_opts = c.q.options().dtype(c.acc);
  c.has_query_mask = given(query_padding_mask);
  c.has_key_mask = given(key_padding_mask);
}

}  // namespace

Call forward_prologue(const char* op, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                      int64_t num_landmarks, int64_t pinv_iterations, c10::string_view pinv_init,
                      const std::optional<at::Tensor>& key_padding_mask,
                      const std::optional<at::Tensor>& query_padding_mask, std::optional<double> scale) {
  const Options o = check_inputs(op, query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                                 query_padding_mask, scale);
  Call c;
  unpack(c, o, query, key, value, key_padding_mask, query_padding_mask);
  return c;
}

BackwardCall backward_prologue(const char* op, const at::Tensor& grad_out, const at::Tensor& query,
                               const at::Tensor& key, const at::Tensor& value, const at::Tensor& q_landmarks,
                               const at::Tensor& k_landmarks, const at::Tensor& bv, const at::Tensor& zbv,
                               const at::Tensor& lse_query, const at::Tensor& lse_landmark,
                               const at::Tensor& pinv_scale, int64_t num_landmarks, int64_t pinv_iterations,
                               c10::string_view pinv_init, const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& query_padding_mask, std::optional<double> scale) {
  const Options o = check_inputs(op, query, key, value, num_landmarks, pinv_iterations, pinv_init, key_padding_mask,
                                 query_padding_mask, scale);
  check_backward_inputs(op, grad_out, query, key, value, num_landmarks, q_landmarks, k_landmarks, bv, zbv, lse_query,
                        lse_landmark, pinv_scale);
  BackwardCall c;
  unpack(c, o, query, key, value, key_padding_mask, query_padding_mask);
  c.grad_out = grad_out.detach();
  c.q_landmarks = q_landmarks.detach();
  c.k_landmarks = k_landmarks.detach();
  c.bv = bv.detach();
  c.zbv = zbv.detach();
  c.lse_query = lse_query.detach();
  c.lse_landmark = lse_landmark.detach();
  c.pinv_scale = pinv_scale.detach();
  return c;
}

}  // namespace nystrom::detail
