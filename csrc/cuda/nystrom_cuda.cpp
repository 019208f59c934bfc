// CUDA backend of the Nyström attention ops: tensors in, kernel launches
// (cuda/nystrom_cuda.h) out, on the current stream of the inputs' device.
//
// Forward, per call:
//   1. padding: per-element real counts and index lists of the real rows
//      (a stable sort of the mask), so kernels see only real tokens;
//   2. landmarks q̃, k̃ (segment means; for elements on the exact path the
//      "segments" are single tokens, so k̃ is the keys themselves and the
//      pooled values W are the values);
//   3. A = softmax(scale q̃ k̃ᵀ) and its column-sum scale c: m x m per head,
//      batched ATen calls (cuBLAS);
//   4. Bm·V: softmax over the keys with the key length split across thread
//      blocks (online softmax partials, then a merge);
//   5. Z = pinv(A) by Newton–Schulz (a fused shared-memory kernel for m up to
//      64, or 128 in float32 where the GPU has the shared memory; batched
//      cuBLAS products otherwise) and zbv = Z·bv;
//   6. out = softmax(scale q k̃ᵀ)·W per query tile, with its log-sum-exp.
// Backward recomputes F and Bm tiles from the saved log-sum-exps; the m x m
// part (Newton–Schulz iterates and their derivative) runs as batched cuBLAS
// products. Nothing n x m or n x n is stored, and no step uses atomics:
// results are bitwise repeatable.
#include "newton_schulz.h"
#include "nystrom_common.h"

#include "nystrom_cuda.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <limits>
#include <tuple>
#include <vector>

namespace nystrom {
namespace cudaimpl {
namespace {

using at::Tensor;
namespace k = ::nystrom::cuda;

void check_launch(cudaError_t err, const char* op, const char* step) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed in ", step, ": ", cudaGetErrorString(err));
}

k::DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return k::DType::kFloat32;
    case at::kDouble: return k::DType::kFloat64;
    case at::kHalf: return k::DType::kFloat16;
    case at::kBFloat16: return k::DType::kBFloat16;
    default: TORCH_CHECK(false, "nystrom: unsupported dtype ", t);
  }
}

int to_int(int64_t v, const char* op, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), op, ": ", what, " = ", v, " is too large for the CUDA kernels");
  return static_cast<int>(v);
}

// The last dimension contiguous (the kernels read rows); anything else is kept.
Tensor rows_contiguous(const Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

k::RowsView view_of(const Tensor& t, const Tensor& index) {
  k::RowsView v;
  v.data = t.data_ptr();
  v.sb = t.stride(0);
  v.sh = t.stride(1);
  v.sr = t.stride(2);
  v.index = index.defined() ? index.data_ptr<int>() : nullptr;
  v.npad = static_cast<int>(t.size(2));
  return v;
}

k::MutRowsView mut_view_of(const Tensor& t, const Tensor& index) {
  const k::RowsView r = view_of(t, index);
  return k::MutRowsView{t.data_ptr(), r.sb, r.sh, r.sr, r.index, r.npad};
}

// NYSTROM_CUDA_TENSOR_CORES=0 turns the tensor-core forward kernels of
// float16/bfloat16 off (every call then takes the generic kernels): a way to
// tell a tensor-core problem from any other when checking a new GPU.
bool tensor_cores_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("NYSTROM_CUDA_TENSOR_CORES");
    return env == nullptr || std::string(env) != "0";
  }();
  return enabled;
}

// Padding, per batch element, on the device; plus what the m x m ATen steps
// need: which elements take the Nyström path and their landmark counts.
struct Layout {
  k::Problem p;
  Tensor q_count, k_count;  // int32 (B) or undefined
  Tensor q_index, k_index;  // int32 (B, L) / (B, S) or undefined
  Tensor nys;               // bool (B, H, 1, 1): the element takes the Nyström path
  Tensor row_ok, col_ok;    // bool (B, 1, ms, 1) / (B, 1, 1, ms): real landmark rows / columns
  k::DType dt;
};

// Real counts and index lists of one mask (true = padding), on its device.
void compact(const Tensor& mask, Tensor* count, Tensor* index) {
  *count = mask.logical_not().sum(1, /*keepdim=*/false, at::kInt);
  // A stable sort puts the real (false) positions first, in order.
  *index = std::get<1>(at::sort(mask.to(at::kByte), /*stable=*/true, /*dim=*/1, /*descending=*/false))
               .to(at::kInt)
               .contiguous();
}

Layout make_layout(const char* op, const Tensor& q, const Tensor& kk, const Tensor& v, const detail::Options& o,
                   const std::optional<Tensor>& kpm, const std::optional<Tensor>& qpm) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = kk.size(2), Dv = v.size(3);
  TORCH_CHECK(D <= k::kMaxHeadDim && Dv <= k::kMaxHeadDim, op, ": on CUDA the head dimensions must be at most ",
              k::kMaxHeadDim, " (query/key D = ", D, ", value Dv = ", Dv, ")");
  Layout lay;
  lay.dt = dtype_of(q.scalar_type());
  k::Problem& p = lay.p;
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
  const bool has_q = qpm.has_value() && qpm->defined();
  const bool has_k = kpm.has_value() && kpm->defined();
  if (has_q) compact(*qpm, &lay.q_count, &lay.q_index);
  if (has_k) compact(*kpm, &lay.k_count, &lay.k_index);
  p.q_count = has_q ? lay.q_count.data_ptr<int>() : nullptr;
  p.k_count = has_k ? lay.k_count.data_ptr<int>() : nullptr;

  const auto iopts = q.options().dtype(at::kLong);
  Tensor Lb = has_q ? lay.q_count.to(at::kLong) : at::full({B}, L, iopts);
  Tensor Sb = has_k ? lay.k_count.to(at::kLong) : at::full({B}, S, iopts);
  // Every element with real queries needs a real key (the same check as on
  // the CPU; it reads back one flag, only when keys can be masked).
  if (L > 0 && (has_k || S == 0)) {
    Tensor bad = (Sb == 0).logical_and(Lb > 0);
    if (bad.any().item<bool>()) {
      const int64_t b = at::nonzero(bad.cpu()).view({-1})[0].item<int64_t>();
      TORCH_CHECK(false, op, ": key_padding_mask masks every key of batch element ", b,
                  "; each batch element with real queries needs at least one real key");
    }
  }
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
Tensor landmark_kernel_matrix(const Layout& lay, const Tensor& q_lm, const Tensor& k_lm) {
  Tensor logits = at::matmul(q_lm, k_lm.transpose(-1, -2)).mul_(lay.p.scale);
  logits.masked_fill_(lay.col_ok.logical_not(), -std::numeric_limits<double>::infinity());
  Tensor A = at::softmax(logits, -1);
  return at::where(lay.row_ok.logical_and(lay.nys), A, at::zeros({}, A.options()));
}

// Thread blocks to keep every multiprocessor busy.
int64_t target_blocks() { return 2 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount); }

size_t smem_limit() { return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin; }

void check_smem(const char* op, size_t need, const Tensor& q, int64_t D, int64_t Dv) {
  TORCH_CHECK(need <= smem_limit(), op, ": head dims D = ", D, ", Dv = ", Dv, " in ", q.scalar_type(), " need ", need,
              " bytes of shared memory per block; this GPU allows ", smem_limit(),
              " (use float32, or smaller head dims)");
}

// ---------------------------------------------------------------------------
// Forward

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_cuda(
    const Tensor& query_in,
    const Tensor& key_in,
    const Tensor& value_in,
    int64_t num_landmarks,
    int64_t pinv_iterations,
    c10::string_view pinv_init,
    const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& query_padding_mask,
    std::optional<double> scale_opt) {
  constexpr const char* op = "nystrom_attention_forward";
  const detail::Options o = detail::check_inputs(op, query_in, key_in, value_in, num_landmarks, pinv_iterations,
                                                 pinv_init, key_padding_mask, query_padding_mask, scale_opt);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const Tensor q = rows_contiguous(query_in.detach()), kk = rows_contiguous(key_in.detach()),
               v = rows_contiguous(value_in.detach());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = kk.size(2), Dv = v.size(3);
  const int64_t ms = detail::saved_landmarks(o.num_landmarks, L, S).expect_int();
  const auto acc_opts = q.options().dtype(detail::accumulate_type(q.scalar_type()));
  const bool has_qmask = query_padding_mask.has_value() && query_padding_mask->defined();

  Tensor out = has_qmask ? at::zeros({B, H, L, Dv}, q.options()) : at::empty({B, H, L, Dv}, q.options());
  Tensor q_lm = at::zeros({B, H, ms, D}, acc_opts);
  Tensor k_lm = at::zeros({B, H, ms, D}, acc_opts);
  Tensor bv = at::zeros({B, H, ms, Dv}, acc_opts);
  Tensor zbv = at::zeros({B, H, ms, Dv}, acc_opts);
  Tensor lse_q = at::zeros({B, H, L}, acc_opts);
  Tensor lse_l = at::zeros({B, H, ms}, acc_opts);
  Tensor c_out = at::zeros({B, H}, acc_opts);
  if (B == 0 || H == 0 || L == 0) {
    return {out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c_out};
  }
  const Layout lay = make_layout(op, q, kk, v, o, key_padding_mask, query_padding_mask);
  const k::Problem& p = lay.p;
  check_smem(op, k::softmax_matmul_smem(lay.dt, p.D, p.Dv), q, D, Dv);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const k::RowsView qv = view_of(q, lay.q_index), kv = view_of(kk, lay.k_index), vv = view_of(v, lay.k_index);

  // Landmarks; pooled values for the exact path.
  Tensor v_lm = at::zeros({B, H, ms, Dv}, acc_opts);
  check_launch(k::pool_landmarks(lay.dt, p, k::Side::kQuery, k::Only::kAll, qv, p.D, q_lm.data_ptr(), stream), op,
               "query landmarks");
  check_launch(k::pool_landmarks(lay.dt, p, k::Side::kKey, k::Only::kAll, kv, p.D, k_lm.data_ptr(), stream), op,
               "key landmarks");
  check_launch(k::pool_landmarks(lay.dt, p, k::Side::kKey, k::Only::kExact, vv, p.Dv, v_lm.data_ptr(), stream), op,
               "values of exact elements");

  // A and c.
  Tensor A = landmark_kernel_matrix(lay, q_lm, k_lm);
  Tensor c = A.sum(-2).amax(-1);  // (B, H); 0 off the Nyström path
  if (o.original_init) c = at::where(lay.nys.reshape({B, H}), c.amax(), c);
  c_out.copy_(c);
  Tensor c_safe = at::where(lay.nys.reshape({B, H}), c, at::ones({}, c.options())).contiguous();

  // Bm·V with the keys split across blocks.
  const int64_t rows = k::rows_per_block(lay.dt);
  const int64_t per_head = (ms + rows - 1) / rows;
  const int64_t splits =
      std::clamp<int64_t>((target_blocks() + B * H * per_head - 1) / (B * H * per_head), 1,
                          std::max<int64_t>(1, std::min<int64_t>(1024, S / 256)));
  Tensor part_max = at::empty({B * H, splits, ms}, acc_opts);
  Tensor part_sum = at::empty({B * H, splits, ms}, acc_opts);
  Tensor part_acc = at::empty({B * H, splits, ms, Dv}, acc_opts);
  check_launch(k::landmark_partials(lay.dt, p, q_lm.data_ptr(), kv, vv, static_cast<int>(splits),
                                    part_max.data_ptr(), part_sum.data_ptr(), part_acc.data_ptr(), stream),
               op, "Bm·V partials");
  check_launch(k::merge_partials(lay.dt, p, static_cast<int>(splits), part_max.data_ptr(), part_sum.data_ptr(),
                                 part_acc.data_ptr(), bv.data_ptr(), lse_l.data_ptr(), stream),
               op, "Bm·V merge");

  // Z = pinv(A), zbv = Z·bv.
  const size_t ns_smem = k::newton_schulz_smem(lay.dt, static_cast<int>(ms));
  if (ns_smem > 0 && ns_smem <= smem_limit()) {
    const Tensor Ac = A.contiguous();
    check_launch(k::newton_schulz_fused(lay.dt, static_cast<int>(B * H), static_cast<int>(ms), p.Dv,
                                        static_cast<int>(o.pinv_iterations), Ac.data_ptr(), c_safe.data_ptr(),
                                        bv.data_ptr(), zbv.data_ptr(), stream),
                 op, "Newton–Schulz");
  } else {
    at::matmul_out(zbv, detail::newton_schulz_last(A, c_safe.view({B, H, 1, 1}), o.pinv_iterations), bv);
  }
  zbv.add_(v_lm);  // exact elements: W is their values (zbv is zero there)

  // out = softmax(scale q k̃ᵀ)·W.
  check_launch(k::query_rows(lay.dt, p, qv, k_lm.data_ptr(), zbv.data_ptr(), mut_view_of(out, lay.q_index),
                             lse_q.data_ptr(), stream),
               op, "query rows");
  return {out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c_out};
}

// ---------------------------------------------------------------------------
// Backward

std::tuple<Tensor, Tensor, Tensor> backward_cuda(const Tensor& grad_out_in,
                                                 const Tensor& query_in,
                                                 const Tensor& key_in,
                                                 const Tensor& value_in,
                                                 const Tensor& q_lm_in,
                                                 const Tensor& k_lm_in,
                                                 const Tensor& bv_in,
                                                 const Tensor& zbv_in,
                                                 const Tensor& lse_q_in,
                                                 const Tensor& lse_l_in,
                                                 const Tensor& c_in,
                                                 int64_t num_landmarks,
                                                 int64_t pinv_iterations,
                                                 c10::string_view pinv_init,
                                                 const std::optional<Tensor>& key_padding_mask,
                                                 const std::optional<Tensor>& query_padding_mask,
                                                 std::optional<double> scale_opt) {
  constexpr const char* op = "nystrom_attention_backward";
  const detail::Options o = detail::check_inputs(op, query_in, key_in, value_in, num_landmarks, pinv_iterations,
                                                 pinv_init, key_padding_mask, query_padding_mask, scale_opt);
  detail::check_backward_inputs(op, grad_out_in, query_in, key_in, value_in, num_landmarks, q_lm_in, k_lm_in,
                                bv_in, zbv_in, lse_q_in, lse_l_in, c_in);
  const c10::cuda::CUDAGuard guard(query_in.device());
  const Tensor q = rows_contiguous(query_in.detach()), kk = rows_contiguous(key_in.detach()),
               v = rows_contiguous(value_in.detach()), dO = rows_contiguous(grad_out_in.detach());
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), S = kk.size(2), Dv = v.size(3);
  const int64_t ms = detail::saved_landmarks(o.num_landmarks, L, S).expect_int();
  const auto acc_opts = q.options().dtype(detail::accumulate_type(q.scalar_type()));
  const Tensor q_lm = q_lm_in.detach().contiguous(), k_lm = k_lm_in.detach().contiguous();
  const Tensor bv = bv_in.detach().contiguous(), zbv = zbv_in.detach().contiguous();
  const Tensor lse_q = lse_q_in.detach().contiguous(), lse_l = lse_l_in.detach().contiguous();

  Tensor dq = at::zeros({B, H, L, D}, acc_opts);
  Tensor dk = at::zeros({B, H, S, D}, acc_opts);
  Tensor dv = at::zeros({B, H, S, Dv}, acc_opts);
  auto finish = [&]() {
    return std::make_tuple(dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()));
  };
  if (B == 0 || H == 0 || L == 0) return finish();
  const Layout lay = make_layout(op, q, kk, v, o, key_padding_mask, query_padding_mask);
  const k::Problem& p = lay.p;
  check_smem(op, k::backward_smem(lay.dt, p.D, p.Dv), q, D, Dv);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const k::RowsView qv = view_of(q, lay.q_index), kv = view_of(kk, lay.k_index), vv = view_of(v, lay.k_index),
                    gv = view_of(dO, lay.q_index);
  const int64_t rows = k::rows_per_block(lay.dt);

  // Query side, every element: dq (direct), dk̃ and dW partials.
  const int64_t g1 = std::clamp<int64_t>((target_blocks() + B * H - 1) / (B * H), 1, std::max<int64_t>(1, (L + rows - 1) / rows));
  Tensor part_dkl = at::zeros({B * H, g1, ms, D}, acc_opts);
  Tensor part_dw = at::zeros({B * H, g1, ms, Dv}, acc_opts);
  check_launch(k::backward_query(lay.dt, p, qv, gv, k_lm.data_ptr(), zbv.data_ptr(), lse_q.data_ptr(),
                                 static_cast<int>(g1), dq.data_ptr(), part_dkl.data_ptr(), part_dw.data_ptr(), stream),
               op, "query side");
  Tensor dkl = part_dkl.sum(1).view({B, H, ms, D});
  Tensor dW = part_dw.sum(1).view({B, H, ms, Dv});
  part_dkl.reset();
  part_dw.reset();
  // Exact elements: W is their values, one token per "segment".
  check_launch(k::spread_landmarks(lay.dt, p, k::Side::kKey, k::Only::kExact, dW.data_ptr(), p.Dv,
                                   lay.k_index.defined() ? lay.k_index.data_ptr<int>() : nullptr, dv.data_ptr(),
                                   stream),
               op, "value gradient of exact elements");

  // The m x m part (zero for elements off the Nyström path).
  Tensor A = landmark_kernel_matrix(lay, q_lm, k_lm);
  Tensor c = at::where(lay.nys.reshape({B, H}), c_in.detach(), at::ones({}, acc_opts)).view({B, H, 1, 1});
  std::vector<Tensor> Z = detail::newton_schulz_iterates(A, c, o.pinv_iterations);
  Tensor dbv = at::matmul(Z.back().transpose(-1, -2), dW);  // zbv = Z_T·bv
  auto [dA, dc] = detail::newton_schulz_backward(A, c, Z, at::matmul(dW, bv.transpose(-1, -2)));
  // c = the largest column sum of A: its gradient reaches that column (with
  // "original", all heads' dc reach the first head attaining the maximum).
  Tensor colsum = A.sum(-2);                          // (B, H, ms)
  Tensor col = colsum.argmax(-1);                     // (B, H)
  Tensor nysf = lay.nys.reshape({B, H}).to(acc_opts.dtype());
  Tensor dcv = dc.view({B, H}).mul(nysf);
  if (o.original_init) {
    Tensor best = at::where(lay.nys.reshape({B, H}), colsum.amax(-1), at::full({}, -1.0, acc_opts)).view({-1});
    Tensor arg = best.argmax();
    Tensor total = dcv.sum();
    dcv = at::zeros({B * H}, acc_opts).scatter_(0, arg.view({1}), total.view({1})).view({B, H});
  }
  Tensor onehot = at::one_hot(col, ms).to(acc_opts.dtype());  // (B, H, ms)
  dA.add_(dcv.view({B, H, 1, 1}) * onehot.unsqueeze(-2));
  Tensor dS = A * (dA - (A * dA).sum(-1, /*keepdim=*/true));
  Tensor dql = at::matmul(dS, k_lm).mul_(o.scale);
  dkl.add_(at::matmul(dS.transpose(-1, -2), q_lm).mul_(o.scale));
  Tensor delta = (dbv * bv).sum(-1).contiguous();
  dbv = dbv.contiguous();

  // Key side, Nyström elements: dk (direct), dv, dq̃ partials.
  const int64_t g3 = std::clamp<int64_t>((target_blocks() + B * H - 1) / (B * H), 1, std::max<int64_t>(1, (S + rows - 1) / rows));
  Tensor part_dql = at::zeros({B * H, g3, ms, D}, acc_opts);
  check_launch(k::backward_key(lay.dt, p, kv, vv, q_lm.data_ptr(), lse_l.data_ptr(), dbv.data_ptr(),
                               delta.data_ptr(), static_cast<int>(g3), dk.data_ptr(), dv.data_ptr(),
                               part_dql.data_ptr(), stream),
               op, "key side");
  dql.add_(part_dql.sum(1).view({B, H, ms, D}));
  part_dql.reset();

  // Each token's share of its landmark's gradient (the landmark is a mean).
  dkl = dkl.contiguous();
  dql = dql.contiguous();
  check_launch(k::spread_landmarks(lay.dt, p, k::Side::kKey, k::Only::kAll, dkl.data_ptr(), p.D,
                                   lay.k_index.defined() ? lay.k_index.data_ptr<int>() : nullptr, dk.data_ptr(),
                                   stream),
               op, "key landmark gradient");
  check_launch(k::spread_landmarks(lay.dt, p, k::Side::kQuery, k::Only::kNystrom, dql.data_ptr(), p.D,
                                   lay.q_index.defined() ? lay.q_index.data_ptr<int>() : nullptr, dq.data_ptr(),
                                   stream),
               op, "query landmark gradient");
  return finish();
}

}  // namespace
}  // namespace cudaimpl
}  // namespace nystrom

TORCH_LIBRARY_IMPL(nystrom, CUDA, m) {
  m.impl("nystrom_attention_forward", &nystrom::cudaimpl::forward_cuda);
  m.impl("nystrom_attention_backward", &nystrom::cudaimpl::backward_cuda);
}
