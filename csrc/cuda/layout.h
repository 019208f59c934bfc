// Internal: what the CUDA glue's forward (forward.cpp) and backward
// (backward.cpp) share: padding as per-element counts and index lists, the
// views the torch-free launchers of cuda/launchers.h take, the m x m
// matrix A in batched ATen calls, and launch-size and shared-memory checks.
// docs/DESIGN.md §7.
#pragma once

#include "checks.h"
#include "cuda/device.h"

#include "grid.h"
#include "launchers.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

namespace nystrom::cudaimpl {

using at::Tensor;
namespace gpu = ::nystrom::cuda;

inline void check_launch(cudaError_t err, const char* op, const char* step) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed in ", step, ": ", cudaGetErrorString(err));
}

inline gpu::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return gpu::DType::kFloat32;
    case at::kDouble: return gpu::DType::kFloat64;
    case at::kHalf: return gpu::DType::kFloat16;
    case at::kBFloat16: return gpu::DType::kBFloat16;
    default: TORCH_CHECK(false, "nystrom: unsupported dtype ", t);
  }
}

inline int to_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), op, ": ", what, " = ", v, " is too large for the CUDA kernels");
  return static_cast<int>(v);
}

// The last dimension contiguous (the kernels read rows); anything else is kept.
inline Tensor rows_contiguous(const Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

inline gpu::RowsView view_of(const Tensor& t, const Tensor& index) {
  gpu::RowsView v;
  v.data = t.data_ptr();
  v.sb = t.stride(0);
  v.sh = t.stride(1);
  v.sr = t.stride(2);
  v.index = index.defined() ? index.data_ptr<int>() : nullptr;
  v.npad = static_cast<int>(t.size(2));
  return v;
}

inline gpu::MutRowsView mut_view_of(const Tensor& t, const Tensor& index) {
  const gpu::RowsView r = view_of(t, index);
  return gpu::MutRowsView{t.data_ptr(), r.sb, r.sh, r.sr, r.index, r.npad};
}

// NYSTROM_CUDA_TENSOR_CORES=0 turns the tensor-core kernels of float16/bfloat16
// off, forward and backward (every call then takes the generic kernels): a way to
// tell a tensor-core problem from any other when checking a new GPU.
inline bool tensor_cores_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("NYSTROM_CUDA_TENSOR_CORES");
    return env == nullptr || std::string(env) != "0";
  }();
  return enabled;
}

// NYSTROM_CUDA_TC_BACKWARD=0 turns the tensor-core backward kernels off (the
// float32 CUDA-core backward kernels then serve float16/bfloat16 too), the
// forward keeping its tensor cores; read at every call, for A/B comparisons.
inline bool tc_backward_enabled() {
  const char* env = std::getenv("NYSTROM_CUDA_TC_BACKWARD");
  return env == nullptr || std::string(env) != "0";
}

// NYSTROM_CUDA_TC_STAGES: owner-row buffers of the tensor-core backward's
// query and key sides, 2 (default: the next tile's rows load by cp.async
// while the warps work on this one, where the shared memory fits) or 1 (each
// tile loads, then computes). Read at every call, for A/B comparisons.
inline int tc_stages_requested() {
  const char* env = std::getenv("NYSTROM_CUDA_TC_STAGES");
  if (env == nullptr || *env == '\0') return 2;
  const std::string v(env);
  TORCH_CHECK(v == "1" || v == "2", "NYSTROM_CUDA_TC_STAGES must be 1 or 2 (owner-row buffers of the tensor-core ",
              "backward), got \"", v, "\"");
  return v == "1" ? 1 : 2;
}

// NYSTROM_CUDA_FUSED_MM=0 turns the fused m x m kernels off (the forward's
// Newton–Schulz kernel and the backward's mm_backward kernel): those steps
// then run as batched ATen products, as they do where no fused variant fits.
// For A/B comparisons on a GPU and for tests; read at every call.
inline bool fused_mm_enabled() {
  const char* env = std::getenv("NYSTROM_CUDA_FUSED_MM");
  return env == nullptr || std::string(env) != "0";
}

// Padding, per batch element, on the device; plus what the m x m ATen steps
// need: which elements take the Nyström path and their landmark counts.
struct Layout {
  gpu::Problem p;
  Tensor q_count, k_count;  // int32 (B) or undefined
  Tensor q_index, k_index;  // int32 (B, L) / (B, S) or undefined
  Tensor nys;               // bool (B, H, 1, 1): the element takes the Nyström path
  Tensor no_key;            // bool (B): real queries but no real key, or undefined when impossible
  Tensor row_ok, col_ok;    // bool (B, 1, ms, 1) / (B, 1, 1, ms): real landmark rows / columns
  gpu::DType dt;
};

// Real counts and index lists of one mask (true = padding), on its device.
inline void compact(const Tensor& mask, Tensor* count, Tensor* index) {
  *count = mask.logical_not().sum(1, /*keepdim=*/false, at::kInt);
  // A stable sort puts the real (false) positions first, in order.
  *index = std::get<1>(at::sort(mask.to(at::kByte), /*stable=*/true, /*dim=*/1, /*descending=*/false))
               .to(at::kInt)
               .contiguous();
}

inline Layout make_layout(const char* op, const Tensor& q, const Tensor& k, const Tensor& v, const detail::Options& o,
                   const std::optional<Tensor>& kpm, const std::optional<Tensor>& qpm) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = k.size(2), Dv = v.size(3);
  TORCH_CHECK(D <= gpu::kMaxHeadDim && Dv <= gpu::kMaxHeadDim, op, ": on CUDA the head dimensions must be at most ",
              gpu::kMaxHeadDim, " (query/key D = ", D, ", value Dv = ", Dv, ")");
  Layout lay;
  lay.dt = dtype_of(q.scalar_type());
  gpu::Problem& p = lay.p;
  p.B = to_int(B, op, "batch size");
  p.H = to_int(H, op, "number of heads");
  TORCH_CHECK(B * H <= std::numeric_limits<int>::max(), op, ": batch x heads = ", B * H,
              " is too large for the CUDA kernels");
  p.L = to_int(L, op, "query length");
  p.S = to_int(S, op, "key length");
  p.D = static_cast<int>(D);
  p.Dv = static_cast<int>(Dv);
  p.m = to_int(std::min<int64_t>(o.num_landmarks, std::numeric_limits<int>::max()), op, "num_landmarks");
  p.ms = to_int(detail::saved_landmarks(o.num_landmarks, L, S).expect_int(), op, "landmark rows");
  p.scale = o.scale;
  p.tensor_cores = tensor_cores_enabled();
  p.tc_backward = tc_backward_enabled();
  p.tc_stages = tc_stages_requested();
  const DeviceInfo dev = device_info();
  p.sm_count = dev.sm_count;
  p.smem_optin = dev.smem_optin;
  const bool has_q = qpm.has_value() && qpm->defined();
  const bool has_k = kpm.has_value() && kpm->defined();
  if (has_q) compact(*qpm, &lay.q_count, &lay.q_index);
  if (has_k) compact(*kpm, &lay.k_count, &lay.k_index);
  p.q_count = has_q ? lay.q_count.data_ptr<int>() : nullptr;
  p.k_count = has_k ? lay.k_count.data_ptr<int>() : nullptr;

  const auto iopts = q.options().dtype(at::kLong);
  Tensor Lb = has_q ? lay.q_count.to(at::kLong) : at::full({B}, L, iopts);
  Tensor Sb = has_k ? lay.k_count.to(at::kLong) : at::full({B}, S, iopts);
  // An element with real queries but no real key (every key masked) is an
  // error on the CPU; here it would cost a host synchronisation on every
  // masked call (and break CUDA-graph capture), so it is not checked: the
  // element's real query rows get NaN instead (its softmax has no key; the
  // gradients of those rows are NaN too). docs/DESIGN.md §3.
  if (L > 0 && (has_k || S == 0)) lay.no_key = (Sb == 0).logical_and(Lb > 0);
  const int64_t m = o.num_landmarks;
  Tensor nys = (Lb > 0).logical_and((Lb > m).logical_or(Sb > m));
  lay.nys = nys.view({B, 1, 1, 1}).expand({B, H, 1, 1});
  Tensor ar = at::arange(p.ms, iopts);
  lay.row_ok = ar.view({1, -1}).lt(Lb.clamp_max(m).view({-1, 1})).view({B, 1, p.ms, 1});
  lay.col_ok = ar.view({1, -1}).lt(Sb.clamp_max(m).view({-1, 1})).view({B, 1, 1, p.ms});
  return lay;
}

// A = softmax(scale q̃ k̃ᵀ) of every Nyström element, zero elsewhere (outside
// its mq x mk block, and for elements on the other paths).
inline Tensor landmark_kernel_matrix(const Layout& lay, const Tensor& q_lm, const Tensor& k_lm) {
  Tensor logits = at::matmul(q_lm, k_lm.transpose(-1, -2)).mul_(lay.p.scale);
  logits.masked_fill_(lay.col_ok.logical_not(), -std::numeric_limits<double>::infinity());
  Tensor A = at::softmax(logits, -1);
  return at::where(lay.row_ok.logical_and(lay.nys), A, at::zeros({}, A.options()));
}

// Thread blocks to keep every multiprocessor busy.
inline int64_t target_blocks(const Layout& lay) { return 2 * static_cast<int64_t>(lay.p.sm_count); }

inline void check_smem(const char* op, const Layout& lay, size_t need, const Tensor& q) {
  TORCH_CHECK(need <= lay.p.smem_optin, op, ": head dims D = ", lay.p.D, ", Dv = ", lay.p.Dv, " in ", q.scalar_type(),
              " need ", need, " bytes of shared memory per block; this GPU allows ", lay.p.smem_optin, " (",
              q.scalar_type() == at::kDouble ? "float32 needs half as much; " : "", "smaller head dims need less)");
}

// Real query rows of the elements without a real key get NaN (make_layout).
// x: (B, H, L, d) output or query gradient.
inline void fill_rows_without_keys(const Layout& lay, const Tensor& x, const std::optional<Tensor>& qpm) {
  if (!lay.no_key.defined()) return;
  Tensor rows = lay.no_key.view({-1, 1, 1, 1});
  if (qpm.has_value() && qpm->defined()) rows = rows.logical_and(qpm->logical_not().view({x.size(0), 1, -1, 1}));
  x.masked_fill_(rows, std::numeric_limits<double>::quiet_NaN());
}

// An error left pending in the CUDA runtime by earlier, unrelated code would
// be reported by this op's first launch check as its own; it is taken off
// (with a warning that names it) when the op starts.
inline void clear_pending_error(const char* op) {
  const cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess) {
    TORCH_WARN(op, ": a CUDA error was pending before this call (", cudaGetErrorString(pending),
               "); it comes from earlier work on this thread and is not this op's");
  }
}

// The m x m steps (A's logits, Newton–Schulz and its derivative, the
// landmark gradients) are float32 products, and torch's TF32 switches
// (allow_tf32, set_float32_matmul_precision("high"/"medium")) would round
// them to TF32 inside cuBLAS, against the float32 contract (docs/DESIGN.md
// §5). When those switches are on, the m x m steps of float32 calls run in
// float64 instead (they are small) and are rounded back to float32.
inline bool m_by_m_in_float64(const Tensor& t) {
  if (t.scalar_type() != at::kFloat) return false;
  const at::Context& ctx = at::globalContext();
  return ctx.allowTF32CuBLAS() || ctx.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
}

}  // namespace nystrom::cudaimpl
