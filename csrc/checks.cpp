// The argument checks of the nystrom ops (checks.h): one set for every
// backend, written with symbolic sizes so that the Meta kernels run them under
// dynamic shapes too.
#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace nystrom {
namespace detail {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sym_sizes();
  return os.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_mask(const char* op, const char* name, const std::optional<at::Tensor>& mask,
                const at::Tensor& query, const c10::SymInt& batch, const c10::SymInt& len,
                const char* len_name) {
  if (!mask.has_value() || !mask->defined()) {
    return;
  }
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool, op, ": ", name,
              " must be a bool tensor (true marks padding), got dtype ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.sym_size(0) == batch && m.sym_size(1) == len, op, ": ", name,
              " must have shape (B, ", len_name, ") = (", batch, ", ", len, "), got ", shape_str(m));
  TORCH_CHECK(m.device() == query.device(), op, ": ", name,
              " must be on the same device as query (", query.device(), "), got ", m.device());
}

}  // namespace

Options check_inputs(const char* op,
                     const at::Tensor& q,
                     const at::Tensor& k,
                     const at::Tensor& v,
                     int64_t num_landmarks,
                     int64_t pinv_iterations,
                     c10::string_view pinv_init,
                     const std::optional<at::Tensor>& key_padding_mask,
                     const std::optional<at::Tensor>& query_padding_mask,
                     std::optional<double> scale) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), op,
              ": query, key and value must be defined tensors");
  TORCH_CHECK(q.dim() == 4, op, ": query must be a 4-D tensor (B, H, L, D), got shape ", shape_str(q));
  TORCH_CHECK(k.dim() == 4, op, ": key must be a 4-D tensor (B, H, S, D), got shape ", shape_str(k));
  TORCH_CHECK(v.dim() == 4, op, ": value must be a 4-D tensor (B, H, S, Dv), got shape ", shape_str(v));

  TORCH_CHECK(is_supported_float(q.scalar_type()), op,
              ": query must be a floating-point tensor (float32, float64, float16 or bfloat16), got dtype ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": key must have the same dtype as query (",
              q.scalar_type(), "), got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), op, ": value must have the same dtype as query (",
              q.scalar_type(), "), got ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device(), op, ": key must be on the same device as query (", q.device(),
              "), got ", k.device());
  TORCH_CHECK(v.device() == q.device(), op, ": value must be on the same device as query (", q.device(),
              "), got ", v.device());

  TORCH_CHECK(k.sym_size(0) == q.sym_size(0) && k.sym_size(1) == q.sym_size(1), op,
              ": key must have the same batch size and number of heads (B, H) as query; query is ",
              shape_str(q), ", key is ", shape_str(k));
  TORCH_CHECK(v.sym_size(0) == q.sym_size(0) && v.sym_size(1) == q.sym_size(1), op,
              ": value must have the same batch size and number of heads (B, H) as query; query is ",
              shape_str(q), ", value is ", shape_str(v));
  TORCH_CHECK(k.sym_size(3) == q.sym_size(3), op,
              ": key must have the same head dimension D as query; query is ", shape_str(q), ", key is ",
              shape_str(k));
  TORCH_CHECK(v.sym_size(2) == k.sym_size(2), op,
              ": value must have the same length S as key; key is ", shape_str(k), ", value is ",
              shape_str(v));
  TORCH_CHECK(!(k.sym_size(2) == 0 && q.sym_size(2) != 0 && q.sym_size(0) != 0), op,
              ": key must have at least one position (S >= 1) when there are queries; key is ",
              shape_str(k));

  TORCH_CHECK(num_landmarks >= 1, op, ": num_landmarks must be >= 1, got ", num_landmarks);
  TORCH_CHECK(pinv_iterations >= 0, op, ": pinv_iterations must be >= 0, got ", pinv_iterations);
  const bool original = pinv_init == "original";
  TORCH_CHECK(original || pinv_init == "per_head", op,
              ": pinv_init must be \"per_head\" or \"original\", got \"", std::string(pinv_init), "\"");

  double s;
  if (scale.has_value()) {
    s = *scale;
    TORCH_CHECK(std::isfinite(s) && s > 0.0, op, ": scale must be a finite number > 0, got ", s);
  } else {
    // Under dynamic shapes D may be symbolic (Meta kernels, tracing): the
    // default scale is needed only by the kernels that compute, which always
    // see concrete sizes, so a symbolic D is not specialised here.
    const std::optional<int64_t> d = q.sym_size(3).maybe_as_int();
    if (d.has_value()) {
      s = *d > 0 ? 1.0 / std::sqrt(static_cast<double>(*d)) : 1.0;
    } else {
      s = std::numeric_limits<double>::quiet_NaN();
    }
  }

  check_mask(op, "key_padding_mask", key_padding_mask, q, q.sym_size(0), k.sym_size(2), "S");
  check_mask(op, "query_padding_mask", query_padding_mask, q, q.sym_size(0), q.sym_size(2), "L");
  return Options{num_landmarks, pinv_iterations, original, s};
}

void check_backward_inputs(const char* op,
                           const at::Tensor& grad_out,
                           const at::Tensor& q,
                           const at::Tensor& k,
                           const at::Tensor& v,
                           int64_t num_landmarks,
                           const at::Tensor& q_landmarks,
                           const at::Tensor& k_landmarks,
                           const at::Tensor& bv,
                           const at::Tensor& zbv,
                           const at::Tensor& lse_query,
                           const at::Tensor& lse_landmark,
                           const at::Tensor& pinv_scale) {
  const auto B = q.sym_size(0), H = q.sym_size(1), L = q.sym_size(2), D = q.sym_size(3);
  const auto Dv = v.sym_size(3);
  const auto acc = accumulate_type(q.scalar_type());
  TORCH_CHECK(grad_out.defined() && grad_out.dim() == 4 && grad_out.sym_size(0) == B &&
                  grad_out.sym_size(1) == H && grad_out.sym_size(2) == L && grad_out.sym_size(3) == Dv,
              op, ": grad_out must have shape (B, H, L, Dv) = ", q.sym_size(0), ", ", H, ", ", L, ", ", Dv,
              "), got ", grad_out.defined() ? shape_str(grad_out) : std::string("an undefined tensor"));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.device() == q.device(), op,
              ": grad_out must have the dtype and device of query");
  auto expect = [&](const at::Tensor& t, const char* name, std::vector<c10::SymInt> shape) {
    TORCH_CHECK(t.defined() && t.sym_sizes().equals(shape), op, ": ", name,
                " (saved by nystrom_attention_forward) must have shape ", c10::SymIntArrayRef(shape),
                ", got ", t.defined() ? shape_str(t) : std::string("an undefined tensor"));
    TORCH_CHECK(t.scalar_type() == acc && t.device() == q.device(), op, ": ", name,
                " (saved by nystrom_attention_forward) must have dtype ", acc, " on ", q.device(),
                ", got ", t.scalar_type(), " on ", t.device());
  };
  const c10::SymInt m = saved_landmarks(num_landmarks, L, k.sym_size(2));
  expect(q_landmarks, "q_landmarks", {B, H, m, D});
  expect(k_landmarks, "k_landmarks", {B, H, m, D});
  expect(bv, "bv", {B, H, m, Dv});
  expect(zbv, "zbv", {B, H, m, Dv});
  expect(lse_query, "lse_query", {B, H, L});
  expect(lse_landmark, "lse_landmark", {B, H, m});
  expect(pinv_scale, "pinv_scale", {B, H});
}

}  // namespace detail
}  // namespace nystrom
