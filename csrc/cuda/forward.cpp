// CUDA kernel of nystrom_attention_forward: tensors in, launches of the
// torch-free kernels (cuda/launchers.h) out, on the current stream of the
// inputs' device (docs/DESIGN.md §7). Per call:
//   1. padding: per-element real counts and index lists of the real rows
//      (a stable sort of the mask), so kernels see only real tokens;
//   2. landmarks q̃, k̃ (segment means; for elements on the exact path the
//      "segments" are single tokens, so k̃ is the keys themselves and the
//      pooled values W are the values); where the tensor-core Bm·V kernel
//      serves the call, k̃ of the Nyström elements comes from step 3 instead,
//      so that k is read once;
//   3. Bm·V: softmax over the keys with the key length split across thread
//      blocks (online softmax partials, then a merge); it needs only q̃ (and
//      on the tensor cores pools k̃ from the key rows it stages);
//   4. A = softmax(scale q̃ k̃ᵀ) and its column-sum scale c: m x m per head,
//      batched ATen calls (cuBLAS);
//   5. Z = pinv(A) by Newton–Schulz (a fused shared-memory kernel for m up to
//      64, or 128 in float32 where the GPU has the shared memory; batched
//      cuBLAS products otherwise) and zbv = Z·bv;
//   6. out = softmax(scale q k̃ᵀ)·W per query tile, with its log-sum-exp.
// Nothing n x m or n x n is stored, and no step uses atomics: results are
// bitwise repeatable.
#include "cuda/layout.h"
#include "newton_schulz.h"
#include "saved_tensors.h"

#include <torch/library.h>

namespace nystrom::cudaimpl {
namespace {

ForwardResult forward_cuda(const Tensor& query, const Tensor& key, const Tensor& value, int64_t num_landmarks,
                           int64_t pinv_iterations, c10::string_view pinv_init,
                           const std::optional<Tensor>& key_padding_mask,
                           const std::optional<Tensor>& query_padding_mask, std::optional<double> scale) {
  constexpr const char* op = "nystrom_attention_forward";
  const detail::Call call = detail::forward_prologue(op, query, key, value, num_landmarks, pinv_iterations, pinv_init,
                                                     key_padding_mask, query_padding_mask, scale);
  const detail::Options& o = call.o;
  const DeviceGuard guard(query.device());
  clear_pending_error(op);
  const Tensor q = rows_contiguous(call.q), k = rows_contiguous(call.k), v = rows_contiguous(call.v);
  const int64_t B = call.B, H = call.H, S = call.S, D = call.D, Dv = call.Dv, ms = call.ms;
  detail::ForwardOutputs r =
      detail::allocate_forward_outputs(q, k, v, num_landmarks, detail::Fill::kZeros, call.has_query_mask);
  if (B == 0 || H == 0 || call.L == 0) return r.tuple();
  if (!call.has_query_mask) poison_for_kernels(r.out);  // every row is written
  const Layout lay = make_layout(op, q, k, v, o, key_padding_mask, query_padding_mask);
  const gpu::Problem& p = lay.p;
  check_smem(op, lay, gpu::softmax_matmul_smem(lay.dt, p.D, p.Dv), q);
  const cudaStream_t stream = current_stream();
  const gpu::RowsView qv = view_of(q, lay.q_index), kv = view_of(k, lay.k_index), vv = view_of(v, lay.k_index);

  // Step 2: landmarks; pooled values for the exact path. Where the
  // tensor-core Bm·V pass serves the call it pools k̃ of the Nyström elements
  // (step 3): here only the exact elements' k̃ (their keys).
  const bool keys_in_pass = gpu::landmark_pass_pools_keys(lay.dt, p);
  Tensor v_lm = at::zeros({B, H, ms, Dv}, call.acc_opts);
  check_launch(gpu::pool_landmarks(lay.dt, p, gpu::Side::kQuery, gpu::Only::kAll, qv, p.D, r.q_landmarks.data_ptr(),
                                   stream),
               op, "query landmarks");
  check_launch(gpu::pool_landmarks(lay.dt, p, gpu::Side::kKey, keys_in_pass ? gpu::Only::kExact : gpu::Only::kAll, kv,
                                   p.D, r.k_landmarks.data_ptr(), stream),
               op, "key landmarks");
  check_launch(gpu::pool_landmarks(lay.dt, p, gpu::Side::kKey, gpu::Only::kExact, vv, p.Dv, v_lm.data_ptr(), stream),
               op, "values of exact elements");

  // Step 3: Bm·V with the keys split across blocks: as many splits as keep
  // the grid within two blocks per multiprocessor (one wave). With B·H = 64
  // on 132 SMs the tensor-core kernel (one block per head and split) gets 4
  // splits, 256 blocks on 264 slots; counting it as two blocks per head and
  // rounding up gave 3 splits, 192 blocks: 60 SMs ran two, 72 one.
  const int64_t per_head = gpu::landmark_blocks_per_head(lay.dt, p);
  const int64_t splits = std::clamp<int64_t>(target_blocks(lay) / (B * H * per_head), 1,
                                             std::max<int64_t>(1, std::min<int64_t>(1024, S / 256)));
  Tensor part_max = at::empty({B * H, splits, ms}, call.acc_opts);
  Tensor part_sum = at::empty({B * H, splits, ms}, call.acc_opts);
  Tensor part_acc = at::empty({B * H, splits, ms, Dv}, call.acc_opts);
  // The key segment sums of each split (float32 (B·H, splits, ms, D)).
  Tensor part_klm = keys_in_pass ? at::empty({B * H, splits, ms, D}, call.acc_opts) : Tensor();
  for (const Tensor& t : {part_max, part_sum, part_acc, part_klm})
    if (t.defined()) poison_for_kernels(t);
  void* const part_klm_ptr = keys_in_pass ? part_klm.data_ptr() : nullptr;
  check_launch(gpu::landmark_partials(lay.dt, p, r.q_landmarks.data_ptr(), kv, vv, static_cast<int>(splits),
                                      part_max.data_ptr(), part_sum.data_ptr(), part_acc.data_ptr(), part_klm_ptr,
                                      stream),
               op, "Bm·V partials");
  check_launch(gpu::merge_partials(lay.dt, p, static_cast<int>(splits), part_max.data_ptr(), part_sum.data_ptr(),
                                   part_acc.data_ptr(), r.bv.data_ptr(), r.lse_landmark.data_ptr(), part_klm_ptr,
                                   r.k_landmarks.data_ptr(), stream),
               op, "Bm·V merge");

  // Step 4: A and c (k̃ is complete now), in float64 when torch's TF32
  // switches would round float32 products (layout.h).
  const at::ScalarType mt = m_by_m_in_float64(r.q_landmarks) ? at::kDouble : call.acc;
  Tensor A = landmark_kernel_matrix(lay, r.q_landmarks.to(mt), r.k_landmarks.to(mt));
  Tensor c = A.sum(-2).amax(-1);  // (B, H); 0 off the Nyström path
  if (o.original_init) c = at::where(lay.nys.reshape({B, H}), c.amax(), c);
  r.pinv_scale.copy_(c);
  Tensor c_safe = at::where(lay.nys.reshape({B, H}), c, at::ones({}, c.options())).contiguous();

  // Step 5: Z = pinv(A), zbv = Z·bv: the fused kernel where the shared memory
  // allows, batched ATen products (in the m x m dtype) otherwise.
  const size_t ns_smem = gpu::newton_schulz_smem(lay.dt, static_cast<int>(ms));
  if (ns_smem > 0 && ns_smem <= p.smem_optin && fused_mm_enabled()) {
    const Tensor Ac = A.to(call.acc).contiguous(), cc = c_safe.to(call.acc).contiguous();
    check_launch(gpu::newton_schulz_fused(lay.dt, static_cast<int>(B * H), static_cast<int>(ms), p.Dv,
                                          static_cast<int>(o.pinv_iterations), Ac.data_ptr(), cc.data_ptr(),
                                          r.bv.data_ptr(), r.zbv.data_ptr(), stream),
                 op, "Newton–Schulz");
  } else {
    r.zbv.copy_(at::matmul(detail::newton_schulz_last(A, c_safe.view({B, H, 1, 1}), o.pinv_iterations), r.bv.to(mt)));
  }
  r.zbv.add_(v_lm);  // exact elements: W is their values (zbv is zero there)

  // Step 6: out = softmax(scale q k̃ᵀ)·W.
  check_launch(gpu::query_rows(lay.dt, p, qv, r.k_landmarks.data_ptr(), r.zbv.data_ptr(),
                               mut_view_of(r.out, lay.q_index), r.lse_query.data_ptr(), stream),
               op, "query rows");
  fill_rows_without_keys(lay, r.out, query_padding_mask);
  return r.tuple();
}

}  // namespace
}  // namespace nystrom::cudaimpl

// The emulated build serves CPU tensors with this glue (cuda/device.h).
#if defined(NYSTROM_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(nystrom, CPU, m) { m.impl("nystrom_attention_forward", &nystrom::cudaimpl::forward_cuda); }
#else
TORCH_LIBRARY_IMPL(nystrom, CUDA, m) { m.impl("nystrom_attention_forward", &nystrom::cudaimpl::forward_cuda); }
#endif
