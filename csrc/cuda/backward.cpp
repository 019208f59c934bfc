// CUDA kernel of nystrom_attention_backward (docs/DESIGN.md §7): recomputes
// F and Bm tiles from the saved log-sum-exps. Steps:
//   1. query side, every element: dq (direct part), partial dk̃ and dW;
//   2. exact elements: dv from dW (their W is their values);
//   3. the m x m part: dbv, dA and dc through every Newton–Schulz iteration,
//      c's gradient to its column, the softmax of A: dq̃, dk̃. One fused
//      kernel per head (cuda/mm_backward_kernel.cuh) where its shared memory
//      fits (ms <= 64 in float32/float16/bfloat16, ms <= 32 in float64);
//      batched ATen (cuBLAS) products otherwise, or with NYSTROM_CUDA_FUSED_MM=0;
//   4. key side, Nyström elements: dk (direct part), dv, partial dq̃;
//   5. each token's share of its landmark's gradient (segment means).
// Where the tensor-core backward serves a side (gpu::tc_backward_serves), its
// gradients are written once in the input dtype, the shares folded in: the
// key side (step 4) writes dk and dv of every element; the query side (step
// 1) stores its rounded dS rows and a last pass after step 4 writes dq. Those
// outputs then have no float32 tensor, zero fill, spread or conversion.
// No step uses atomics: results are bitwise repeatable.
#include "cuda/layout.h"
#include "newton_schulz.h"
#include "saved_tensors.h"

#include <torch/library.h>

#include <tuple>
#include <vector>

namespace nystrom::cudaimpl {
namespace {

std::tuple<Tensor, Tensor, Tensor> backward_cuda(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& q_landmarks,
    const Tensor& k_landmarks, const Tensor& bv_in, const Tensor& zbv_in, const Tensor& lse_query,
    const Tensor& lse_landmark, const Tensor& pinv_scale, int64_t num_landmarks, int64_t pinv_iterations,
    c10::string_view pinv_init, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& query_padding_mask, std::optional<double> scale) {
  constexpr const char* op = "nystrom_attention_backward";
  const detail::BackwardCall call = detail::backward_prologue(
      op, grad_out, query, key, value, q_landmarks, k_landmarks, bv_in, zbv_in, lse_query, lse_landmark, pinv_scale,
      num_landmarks, pinv_iterations, pinv_init, key_padding_mask, query_padding_mask, scale);
  const detail::Options& o = call.o;
  const DeviceGuard guard(query.device());
  clear_pending_error(op);
  const Tensor q = rows_contiguous(call.q), k = rows_contiguous(call.k), v = rows_contiguous(call.v),
               dO = rows_contiguous(call.grad_out);
  const int64_t B = call.B, H = call.H, L = call.L, S = call.S, D = call.D, Dv = call.Dv, ms = call.ms;
  const auto& acc_opts = call.acc_opts;
  const Tensor q_lm = call.q_landmarks.contiguous(), k_lm = call.k_landmarks.contiguous();
  const Tensor bv = call.bv.contiguous(), zbv = call.zbv.contiguous();
  const Tensor lse_q = call.lse_query.contiguous(), lse_l = call.lse_landmark.contiguous();
  const Tensor& c_in = call.pinv_scale;

  if (B == 0 || H == 0 || L == 0) {
    return std::make_tuple(at::zeros({B, H, L, D}, q.options()), at::zeros({B, H, S, D}, q.options()),
                           at::zeros({B, H, S, Dv}, q.options()));
  }
  const Layout lay = make_layout(op, q, k, v, o, key_padding_mask, query_padding_mask);
  const gpu::Problem& p = lay.p;
  check_smem(op, lay, gpu::backward_smem(lay.dt, p.D, p.Dv), q);
  // Per side: the tensor-core kernels write the input dtype (every row, no
  // fill: poisoned in the emulation), the CUDA-core kernels add into zeroed
  // float32 gradients converted at the end.
  const bool tc_q = gpu::tc_backward_serves(lay.dt, p, gpu::Side::kQuery);
  const bool tc_k = gpu::tc_backward_serves(lay.dt, p, gpu::Side::kKey);
  const auto& in_opts = q.options();
  Tensor dq = tc_q ? at::empty({B, H, L, D}, in_opts) : at::zeros({B, H, L, D}, acc_opts);
  Tensor dk = tc_k ? at::empty({B, H, S, D}, in_opts) : at::zeros({B, H, S, D}, acc_opts);
  Tensor dv = tc_k ? at::empty({B, H, S, Dv}, in_opts) : at::zeros({B, H, S, Dv}, acc_opts);
  Tensor ds = tc_q ? at::empty({B * H, L, gpu::kTcDsWidth}, in_opts) : Tensor();
  if (tc_q) {
    poison_for_kernels(dq);
    poison_for_kernels(ds);
  }
  if (tc_k) {
    poison_for_kernels(dk);
    poison_for_kernels(dv);
  }
  auto finish = [&]() {
    return std::make_tuple(dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()));
  };
  const cudaStream_t stream = current_stream();
  const gpu::RowsView qv = view_of(q, lay.q_index), kv = view_of(k, lay.k_index), vv = view_of(v, lay.k_index),
                    gv = view_of(dO, lay.q_index);
  const int64_t rows = gpu::rows_per_block(lay.dt);
  // Blocks per head of a pass over n rows: the tensor-core passes (one to four
  // resident blocks per SM, 64-row tiles) in whole waves (grid.h:
  // groups_for_waves), at most 8 per head (each group of the two sides has a
  // zeroed partial slice of ms x (D + Dv) floats per head to sum, each block of
  // the dq pass converts k̃ once: more groups would buy a few percent of tail
  // for far more of that traffic); the CUDA-core kernels two blocks per SM,
  // rounded up, at most one per row tile.
  auto groups = [&](int64_t n, bool tc, gpu::TcPass pass) -> int64_t {
    if (tc) {
      const int64_t tiles = (n + gpu::kTcTileRows - 1) / gpu::kTcTileRows;
      return gpu::groups_for_waves(B * H, tiles, gpu::tc_backward_blocks_per_sm(lay.dt, p, pass), p.sm_count,
                                   /*max_groups=*/8);
    }
    return std::clamp<int64_t>((target_blocks(lay) + B * H - 1) / (B * H), 1, std::max<int64_t>(1, (n + rows - 1) / rows));
  };

  // Step 1. Query side, every element: dq (direct), dk̃ and dW partials.
  const int64_t g1 = groups(L, tc_q, gpu::TcPass::kQuerySide);
  Tensor part_dkl = at::zeros({B * H, g1, ms, D}, acc_opts);
  Tensor part_dw = at::zeros({B * H, g1, ms, Dv}, acc_opts);
  if (tc_q) {
    check_launch(gpu::backward_query_tc(lay.dt, p, qv, gv, k_lm.data_ptr(), zbv.data_ptr(), lse_q.data_ptr(),
                                        static_cast<int>(g1), ds.data_ptr(), part_dkl.data_ptr(), part_dw.data_ptr(),
                                        stream),
                 op, "query side");
  } else {
    check_launch(gpu::backward_query(lay.dt, p, qv, gv, k_lm.data_ptr(), zbv.data_ptr(), lse_q.data_ptr(),
                                     static_cast<int>(g1), dq.data_ptr(), part_dkl.data_ptr(), part_dw.data_ptr(),
                                     stream),
                 op, "query side");
  }
  const int64_t mm_smem = static_cast<int64_t>(gpu::mm_backward_smem(lay.dt, static_cast<int>(ms)));
  const bool fused = fused_mm_enabled() && mm_smem > 0 && static_cast<size_t>(mm_smem) <= p.smem_optin;
  Tensor dkl, dW, dql, dbv, delta;
  if (fused) {
    // Steps 3 (and the group sums of step 1) in one kernel per head.
    dkl = at::empty({B, H, ms, D}, acc_opts);
    dW = at::empty({B, H, ms, Dv}, acc_opts);
    dql = at::empty({B, H, ms, D}, acc_opts);
    dbv = at::empty({B, H, ms, Dv}, acc_opts);
    delta = at::empty({B, H, ms}, acc_opts);
    Tensor aux = at::empty({B * H, 3}, acc_opts);
    Tensor work = at::empty(
        {B * H, static_cast<int64_t>(gpu::mm_backward_workspace(lay.dt, static_cast<int>(ms), o.pinv_iterations))},
        acc_opts);
    for (const Tensor& t : {dkl, dW, dql, dbv, delta, aux}) poison_for_kernels(t);
    const Tensor c = call.pinv_scale.contiguous();
    check_launch(gpu::mm_backward(lay.dt, p, static_cast<int>(o.pinv_iterations), o.original_init,
                                  static_cast<int>(g1), q_lm.data_ptr(), k_lm.data_ptr(), bv.data_ptr(), c.data_ptr(),
                                  part_dkl.data_ptr(), part_dw.data_ptr(), dW.data_ptr(), dkl.data_ptr(),
                                  dql.data_ptr(), dbv.data_ptr(), delta.data_ptr(), aux.data_ptr(), work.data_ptr(),
                                  stream),
                 op, "m x m part");
    part_dkl.reset();
    part_dw.reset();
  } else {
    dkl = part_dkl.sum(1).view({B, H, ms, D});
    dW = part_dw.sum(1).view({B, H, ms, Dv});
    part_dkl.reset();
    part_dw.reset();
  }
  // Step 2. Exact elements: W is their values, one token per "segment" (on
  // the tensor cores: in step 4).
  if (!tc_k) {
    check_launch(gpu::spread_landmarks(lay.dt, p, gpu::Side::kKey, gpu::Only::kExact, dW.data_ptr(), p.Dv,
                                       lay.k_index.defined() ? lay.k_index.data_ptr<int>() : nullptr, dv.data_ptr(),
                                       stream),
                 op, "value gradient of exact elements");
  }

  if (!fused) {
    // Step 3 in batched ATen products (zero for elements off the Nyström
    // path), in float64 when torch's TF32 switches would round float32
    // products (layout.h).
    const at::ScalarType mt = m_by_m_in_float64(q_lm) ? at::kDouble : call.acc;
    const auto m_opts = acc_opts.dtype(mt);
    const Tensor q_lm_m = q_lm.to(mt), k_lm_m = k_lm.to(mt), bv_m = bv.to(mt), dW_m = dW.to(mt);
    Tensor A = landmark_kernel_matrix(lay, q_lm_m, k_lm_m);
    Tensor c = at::where(lay.nys.reshape({B, H}), c_in.to(mt), at::ones({}, m_opts)).view({B, H, 1, 1});
    std::vector<Tensor> Z = detail::newton_schulz_iterates(A, c, o.pinv_iterations);
    Tensor dbv_m = at::matmul(Z.back().transpose(-1, -2), dW_m);  // zbv = Z_T·bv
    auto [dA, dc] = detail::newton_schulz_backward(A, c, Z, at::matmul(dW_m, bv_m.transpose(-1, -2)));
    // c = the largest column sum of A: its gradient reaches that column (with
    // "original", all heads' dc reach the first head attaining the maximum).
    Tensor colsum = A.sum(-2);                          // (B, H, ms)
    Tensor col = colsum.argmax(-1);                     // (B, H)
    Tensor nysf = lay.nys.reshape({B, H}).to(mt);
    Tensor dcv = dc.view({B, H}).mul(nysf);
    if (o.original_init) {
      Tensor best = at::where(lay.nys.reshape({B, H}), colsum.amax(-1), at::full({}, -1.0, m_opts)).view({-1});
      Tensor arg = best.argmax();
      Tensor total = dcv.sum();
      dcv = at::zeros({B * H}, m_opts).scatter_(0, arg.view({1}), total.view({1})).view({B, H});
    }
    Tensor onehot = at::one_hot(col, ms).to(mt);  // (B, H, ms)
    dA.add_(dcv.view({B, H, 1, 1}) * onehot.unsqueeze(-2));
    Tensor dS = A * (dA - (A * dA).sum(-1, /*keepdim=*/true));
    dql = at::matmul(dS, k_lm_m).mul_(o.scale).to(call.acc);
    dkl.add_(at::matmul(dS.transpose(-1, -2), q_lm_m).mul_(o.scale).to(call.acc));
    delta = (dbv_m * bv_m).sum(-1).to(call.acc).contiguous();
    dbv = dbv_m.to(call.acc).contiguous();
  }

  // Step 4. Key side, Nyström elements: dk (direct), dv, dq̃ partials.
  const int64_t g3 = groups(S, tc_k, gpu::TcPass::kKeySide);
  Tensor part_dql = at::zeros({B * H, g3, ms, D}, acc_opts);
  dkl = dkl.contiguous();
  if (tc_k) {
    // dk, dv of every element in the input dtype, dk̃'s (and exact elements'
    // dW) shares folded in: steps 2 and 5 of the key side.
    dW = dW.contiguous();
    check_launch(gpu::backward_key_tc(lay.dt, p, kv, vv, q_lm.data_ptr(), lse_l.data_ptr(), dbv.data_ptr(),
                                      delta.data_ptr(), dkl.data_ptr(), dW.data_ptr(), static_cast<int>(g3),
                                      dk.data_ptr(), dv.data_ptr(), part_dql.data_ptr(), stream),
                 op, "key side");
  } else {
    check_launch(gpu::backward_key(lay.dt, p, kv, vv, q_lm.data_ptr(), lse_l.data_ptr(), dbv.data_ptr(),
                                   delta.data_ptr(), static_cast<int>(g3), dk.data_ptr(), dv.data_ptr(),
                                   part_dql.data_ptr(), stream),
                 op, "key side");
  }
  dql.add_(part_dql.sum(1).view({B, H, ms, D}));
  part_dql.reset();

  // Step 5. Each token's share of its landmark's gradient (the landmark is a mean).
  dql = dql.contiguous();
  if (!tc_k) {
    check_launch(gpu::spread_landmarks(lay.dt, p, gpu::Side::kKey, gpu::Only::kAll, dkl.data_ptr(), p.D,
                                       lay.k_index.defined() ? lay.k_index.data_ptr<int>() : nullptr, dk.data_ptr(),
                                       stream),
                 op, "key landmark gradient");
  }
  if (tc_q) {
    check_launch(gpu::backward_dq_tc(lay.dt, p, qv, k_lm.data_ptr(), ds.data_ptr(), dql.data_ptr(),
                                     static_cast<int>(groups(L, true, gpu::TcPass::kDq)), dq.data_ptr(), stream),
                 op, "query gradient");
  } else {
    check_launch(gpu::spread_landmarks(lay.dt, p, gpu::Side::kQuery, gpu::Only::kNystrom, dql.data_ptr(), p.D,
                                       lay.q_index.defined() ? lay.q_index.data_ptr<int>() : nullptr, dq.data_ptr(),
                                       stream),
                 op, "query landmark gradient");
  }
  fill_rows_without_keys(lay, dq, query_padding_mask);
  return finish();
}

}  // namespace
}  // namespace nystrom::cudaimpl

// The emulated build serves CPU tensors with this glue (cuda/device.h).
#if defined(NYSTROM_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(nystrom, CPU, m) { m.impl("nystrom_attention_backward", &nystrom::cudaimpl::backward_cuda); }
#else
TORCH_LIBRARY_IMPL(nystrom, CUDA, m) { m.impl("nystrom_attention_backward", &nystrom::cudaimpl::backward_cuda); }
#endif
