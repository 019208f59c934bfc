// The launchers of launchers.h: a switch over the dtype into the launch
// templates (launch_templates.cuh), instantiated in inst_<dtype>.cu.
#include "launch_templates.cuh"
#include "grid.h"

namespace nystrom::cuda {
namespace kern {
NYSTROM_LAUNCHERS(extern, float)
NYSTROM_LAUNCHERS(extern, double)
NYSTROM_LAUNCHERS(extern, __half)
NYSTROM_LAUNCHERS(extern, __nv_bfloat16)
}  // namespace kern

namespace {
template <typename F>
cudaError_t by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}
}  // namespace

cudaError_t pool_landmarks(DType dt, const Problem& p, Side side, Only only, RowsView x, int d, void* out,
                           cudaStream_t stream) {
  if (p.B * p.H == 0 || p.ms == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) { return kern::pool_t<decltype(t)>(p, side, only, x, d, out, stream); });
}

int rows_per_block(DType dt) { return kern::kWarps * (dt == DType::kFloat64 ? kern::rpw<double>() : kern::rpw<float>()); }

int landmark_blocks_per_head(DType dt, const Problem& p) {
  if ((dt == DType::kFloat16 && kern::tc_usable<__half, true>(p)) ||
      (dt == DType::kBFloat16 && kern::tc_usable<__nv_bfloat16, true>(p)))
    return 1;
  const int rows = rows_per_block(dt);
  return (p.ms + rows - 1) / rows;
}

size_t softmax_matmul_smem(DType dt, int D, int Dv) {
  return dt == DType::kFloat64 ? kern::forward_smem_t<double>(D, Dv) : kern::forward_smem_t<float>(D, Dv);
}

size_t backward_smem(DType dt, int D, int Dv) {
  return dt == DType::kFloat64 ? kern::backward_smem_t<double>(D, Dv) : kern::backward_smem_t<float>(D, Dv);
}

bool landmark_pass_pools_keys(DType dt, const Problem& p) {
  if (dt == DType::kFloat16) return kern::landmark_pools_keys_t<__half>(p);
  if (dt == DType::kBFloat16) return kern::landmark_pools_keys_t<__nv_bfloat16>(p);
  return false;
}

cudaError_t landmark_partials(DType dt, const Problem& p, const void* q_lm, RowsView k, RowsView v, int splits,
                              void* part_max, void* part_sum, void* part_acc, void* part_klm, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.ms == 0) return cudaSuccess;
  if (part_klm != nullptr && !landmark_pass_pools_keys(dt, p)) return cudaErrorInvalidValue;
  return by_dtype(dt, [&](auto t) {
    return kern::landmark_partials_t<decltype(t)>(p, q_lm, k, v, splits, part_max, part_sum, part_acc, part_klm,
                                                  stream);
  });
}

cudaError_t merge_partials(DType dt, const Problem& p, int splits, const void* part_max, const void* part_sum,
                           const void* part_acc, void* bv, void* lse_l, const void* part_klm, void* k_lm,
                           cudaStream_t stream) {
  if (p.B * p.H == 0 || p.ms == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) {
    return kern::merge_t<decltype(t)>(p, splits, part_max, part_sum, part_acc, bv, lse_l, part_klm, k_lm, stream);
  });
}

cudaError_t query_rows(DType dt, const Problem& p, RowsView q, const void* k_lm, const void* w, MutRowsView out,
                       void* lse_q, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.L == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) { return kern::query_rows_t<decltype(t)>(p, q, k_lm, w, out, lse_q, stream); });
}

size_t newton_schulz_smem(DType dt, int ms) {
  return dt == DType::kFloat64 ? kern::newton_schulz_smem_t<double>(ms) : kern::newton_schulz_smem_t<float>(ms);
}

cudaError_t newton_schulz_fused(DType dt, int heads, int ms, int Dv, int iterations, const void* A, const void* c,
                                const void* bv, void* zbv, cudaStream_t stream) {
  if (heads == 0 || ms == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) {
    return kern::newton_schulz_t<decltype(t)>(heads, ms, Dv, iterations, A, c, bv, zbv, stream);
  });
}

size_t mm_backward_smem(DType dt, int ms) {
  return dt == DType::kFloat64 ? kern::mm_backward_smem_t<double>(ms) : kern::mm_backward_smem_t<float>(ms);
}

size_t mm_backward_workspace(DType dt, int ms, int iterations) {
  const int mp = dt == DType::kFloat64 ? kern::mm_backward_mp<double>(ms) : kern::mm_backward_mp<float>(ms);
  return static_cast<size_t>(iterations + 2) * mp * mp;
}

cudaError_t mm_backward(DType dt, const Problem& p, int iterations, bool original, int groups, const void* q_lm,
                        const void* k_lm, const void* bv, const void* c, const void* part_dkl, const void* part_dw,
                        void* dw, void* dkl, void* dql, void* dbv, void* delta, void* aux, void* work,
                        cudaStream_t stream) {
  if (p.B * p.H == 0 || p.ms == 0) return cudaSuccess;
  kern::MmBackwardArgs a{};
  a.p = p;
  a.iterations = iterations;
  a.groups = groups;
  a.original = original;
  a.q_lm = q_lm;
  a.k_lm = k_lm;
  a.bv = bv;
  a.c = c;
  a.part_dkl = part_dkl;
  a.part_dw = part_dw;
  a.dw = dw;
  a.dkl = dkl;
  a.dql = dql;
  a.dbv = dbv;
  a.delta = delta;
  a.aux = aux;
  a.work = work;
  return by_dtype(dt, [&](auto t) { return kern::mm_backward_t<decltype(t)>(a, stream); });
}

cudaError_t backward_query(DType dt, const Problem& p, RowsView q, RowsView dout, const void* k_lm, const void* w,
                           const void* lse_q, int groups, void* dq, void* part_dkl, void* part_dw,
                           cudaStream_t stream) {
  if (p.B * p.H == 0 || p.L == 0 || p.ms == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) {
    return kern::backward_query_t<decltype(t)>(p, q, dout, k_lm, w, lse_q, groups, dq, part_dkl, part_dw, stream);
  });
}

cudaError_t backward_key(DType dt, const Problem& p, RowsView k, RowsView v, const void* q_lm, const void* lse_l,
                         const void* dbv, const void* delta, int groups, void* dk, void* dv, void* part_dql,
                         cudaStream_t stream) {
  if (p.B * p.H == 0 || p.S == 0 || p.ms == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) {
    return kern::backward_key_t<decltype(t)>(p, k, v, q_lm, lse_l, dbv, delta, groups, dk, dv, part_dql, stream);
  });
}

bool tc_backward_serves(DType dt, const Problem& p, Side side) {
  const bool key = side == Side::kKey;
  if (dt == DType::kFloat16)
    return key ? kern::tc_backward_usable<__half, true>(p) : kern::tc_backward_usable<__half, false>(p);
  if (dt == DType::kBFloat16)
    return key ? kern::tc_backward_usable<__nv_bfloat16, true>(p) : kern::tc_backward_usable<__nv_bfloat16, false>(p);
  return false;
}

int tc_backward_blocks_per_sm(DType dt, const Problem& p, TcPass pass) {
  static_assert(kTcTileRows == kern::kTcWarps * kern::kTcRows, "the tensor-core backward's row tile");
  if (dt != DType::kFloat16 && dt != DType::kBFloat16) return 1;
  using T = __half;  // the shared memory of the two half types is the same
  const size_t smem =
      pass == TcPass::kQuerySide ? kern::tc_backward_query_smem<T>(p.D, p.Dv, kern::tc_backward_stages<T, false>(p))
      : pass == TcPass::kKeySide ? kern::tc_backward_key_smem<T>(p.D, p.Dv, kern::tc_backward_stages<T, true>(p))
                                 : kern::tc_backward_dq_smem<T>(p.D);
  return blocks_by_smem(smem, p.smem_optin);
}

cudaError_t backward_query_tc(DType dt, const Problem& p, RowsView q, RowsView dout, const void* k_lm, const void* w,
                              const void* lse_q, int groups, void* ds, void* part_dkl, void* part_dw,
                              cudaStream_t stream) {
  if (p.B * p.H == 0 || p.L == 0 || p.ms == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) {
    return kern::backward_query_tc_t<decltype(t)>(p, q, dout, k_lm, w, lse_q, groups, ds, part_dkl, part_dw, stream);
  });
}

cudaError_t backward_key_tc(DType dt, const Problem& p, RowsView k, RowsView v, const void* q_lm, const void* lse_l,
                            const void* dbv, const void* delta, const void* dkl, const void* dw, int groups,
                            void* dk, void* dv, void* part_dql, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.S == 0 || p.ms == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) {
    return kern::backward_key_tc_t<decltype(t)>(p, k, v, q_lm, lse_l, dbv, delta, dkl, dw, groups, dk, dv, part_dql,
                                                stream);
  });
}

cudaError_t backward_dq_tc(DType dt, const Problem& p, RowsView q, const void* k_lm, const void* ds, const void* dql,
                           int groups, void* dq, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.L == 0 || p.ms == 0) return cudaSuccess;
  return by_dtype(dt,
                  [&](auto t) { return kern::backward_dq_tc_t<decltype(t)>(p, q, k_lm, ds, dql, groups, dq, stream); });
}

cudaError_t spread_landmarks(DType dt, const Problem& p, Side side, Only only, const void* src, int d,
                             const int* index, void* dst, cudaStream_t stream) {
  if (p.B * p.H == 0 || p.ms == 0 || d == 0) return cudaSuccess;
  return by_dtype(dt, [&](auto t) { return kern::spread_t<decltype(t)>(p, side, only, src, d, index, dst, stream); });
}

}  // namespace nystrom::cuda
