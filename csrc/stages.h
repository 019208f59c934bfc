// Internal: the stages of sequence-parallel Nyström attention (docs/DESIGN.md
// §12), the pieces torch_nystrom.distributed runs between its collectives.
//
// Each rank holds a contiguous shard of the queries and of the keys/values of
// every batch element. A (B, 4) int64 `geometry` tensor says where the shard
// lies in the whole sequence: per element [q_offset, q_total, k_offset,
// k_total], the real (unpadded) tokens of the lower ranks and of all ranks.
// Segments are cut at global positions (element.h: segment_of), so the sums
// of the shards' partial segment sums are the single-process landmarks.
//
// Every stage is written once here, in ATen operations on whole (B, H) stacks
// with padding handled by masks (no host synchronisation, no per-element
// loops): the CPU registration (csrc/cpu/stages.cpp) and the CUDA one
// (csrc/cuda/stages.cpp) run this same code on their tensors. The
// Newton–Schulz iteration and its exact derivative are newton_schulz.h, the
// CPU backend's batched path.
//
// Exact-path elements (L_b, S_b <= m, §2 step 1) take the CUDA backend's
// formulation (§3.4): single-token key "segments", so that k_landmarks holds
// the element's real keys and zbv its real values, and the query-side stage
// serves both paths.
#pragma once

#include "element.h"
#include "newton_schulz.h"

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace nystrom::stages {

using at::Tensor;
using Tensors2 = std::tuple<Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

/// Rows of the long axis (queries or keys of the shard) per step of the stages that run over it: their
/// temporaries are (B, H, kChunkRows, ms), not (B, H, n, ms).
constexpr int64_t kChunkRows = 2048;

/// Rows [r0, r0 + n) of a (B, n_all) mask, if any.
inline std::optional<Tensor> mask_rows(const std::optional<Tensor>& mask, int64_t r0, int64_t n) {
  if (!mask.has_value() || !mask->defined()) return std::nullopt;
  return mask->narrow(1, r0, n);
}

inline at::ScalarType acc_of(const Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

inline bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

/// The per-element quantities every stage derives from `geometry` (B, 4) and
/// m: counts as (B,) int64 tensors on `device`.
struct Geometry {
  Tensor q_off, q_tot, k_off, k_tot;
  Tensor nystrom, exact;  // (B,) bool
  Tensor mq;              // query landmarks: min(m, L_b) on the Nyström path, else 0
  Tensor mk;              // key rows: min(m, S_b) (Nyström), S_b (exact: single tokens), else 0
  Tensor mv;              // value rows: S_b on the exact path, else 0
  bool maybe_exact = true;  // false: no element takes the exact path (known when geometry is on the host)
  Geometry(const char* op, const Tensor& geometry, int64_t m, const at::Device& device) {
    TORCH_CHECK(geometry.dim() == 2 && geometry.size(1) == 4 && geometry.scalar_type() == at::kLong, op,
                ": geometry must be an int64 tensor of shape (B, 4) [q_offset, q_total, k_offset, k_total], got ",
                geometry.scalar_type(), " ", geometry.sizes());
    const Tensor g = geometry.to(device);
    q_off = g.select(1, 0);
    q_tot = g.select(1, 1);
    k_off = g.select(1, 2);
    k_tot = g.select(1, 3);
    const Tensor some = q_tot.gt(0).logical_and(k_tot.gt(0));
    exact = some.logical_and(q_tot.le(m)).logical_and(k_tot.le(m));
    nystrom = some.logical_and(exact.logical_not());
    const Tensor zero = at::zeros_like(q_tot);
    mq = at::where(nystrom, q_tot.clamp_max(m), zero);
    mk = at::where(nystrom, k_tot.clamp_max(m), at::where(exact, k_tot, zero));
    mv = at::where(exact, k_tot, zero);
    if (geometry.is_cpu()) maybe_exact = exact.any().to(at::kCPU).item<bool>();
  }
};

/// (B, 1, rows, 1) bool: row j < count[b].
inline Tensor rows_below(const Tensor& count, int64_t rows) {
  return at::arange(rows, count.options()).view({1, rows}).lt(count.view({-1, 1})).view({-1, 1, rows, 1});
}

/// The segment (0 .. ms-1) of each of the n local positions of a shard, for
/// the tokens that count (real, nseg > 0); ms for the rest (a dump row).
/// Position p is the element's real token off + (real tokens before p) of
/// tot, in nseg segments (element.h: segment_of). (B, n) int64.
inline Tensor segment_index(const std::optional<Tensor>& mask, int64_t B, int64_t n, const Tensor& off,
                            const Tensor& tot, const Tensor& nseg, int64_t ms) {
  const auto opts = off.options();
  Tensor real = given(mask) ? mask->logical_not() : at::ones({B, n}, opts.dtype(at::kBool));
  Tensor local = real.to(at::kLong).cumsum(1).sub_(1);
  Tensor r = local.add_(off.view({-1, 1}));
  Tensor seg = r.add(1).mul_(nseg.view({-1, 1})).sub_(1).div_(tot.clamp_min(1).view({-1, 1}), "floor");
  Tensor counts = real.logical_and(nseg.gt(0).view({-1, 1}));
  return at::where(counts, seg.clamp(0, std::max<int64_t>(ms - 1, 0)), at::full_like(seg, ms));
}

/// 1 / (size of segment j) for j < nseg of tot tokens, 0 for the other rows:
/// (B, 1, ms, 1) in dtype acc.
inline Tensor inverse_sizes(const Tensor& tot, const Tensor& nseg, int64_t ms, at::ScalarType acc) {
  Tensor j = at::arange(ms + 1, tot.options()).view({1, ms + 1});
  Tensor bounds = j.mul(tot.view({-1, 1})).div_(nseg.clamp_min(1).view({-1, 1}), "floor");
  Tensor sizes = bounds.narrow(1, 1, ms) - bounds.narrow(1, 0, ms);
  Tensor valid = j.narrow(1, 0, ms).lt(nseg.view({-1, 1}));
  Tensor inv = at::where(valid, sizes.to(acc).clamp_min(1).reciprocal(), at::zeros({}, sizes.options().dtype(acc)));
  return inv.view({-1, 1, ms, 1});
}

/// x (B, H, n, d) in dtype acc with the rows of padded positions zeroed (their
/// values, NaN included, reach nothing).
inline Tensor real_rows(const Tensor& x, const std::optional<Tensor>& mask, at::ScalarType acc) {
  Tensor y = x.to(acc);
  if (given(mask)) y = y.masked_fill(mask->reshape({mask->size(0), 1, mask->size(1), 1}), 0);
  return y;
}

/// Sums of the rows of x (B, H, n, d) per segment: (B, H, ms, d) in acc.
inline Tensor segment_sums_of(const Tensor& x, const std::optional<Tensor>& mask, const Tensor& off,
                              const Tensor& tot, const Tensor& nseg, int64_t ms, at::ScalarType acc) {
  const int64_t B = x.size(0), H = x.size(1), n = x.size(2), d = x.size(3);
  Tensor out = at::zeros({B, H, ms + 1, d}, x.options().dtype(acc));
  if (n > 0 && B > 0) {
    // per element, whole rows at a time (a scatter-add with an index expanded to every entry took 4x longer)
    const Tensor idx = segment_index(mask, B, n, off, tot, nseg, ms);
    const Tensor xr = real_rows(x, mask, acc);
    for (int64_t b = 0; b < B; ++b) out[b].index_add_(1, idx[b], xr[b]);
  }
  return out.narrow(2, 0, ms).contiguous();
}

/// Row j of src (B, H, ms, d) at each local position of its segment (0 for
/// positions off every segment): (B, H, n, d).
inline Tensor segment_rows_of(const Tensor& src, const std::optional<Tensor>& mask, int64_t n, const Tensor& off,
                              const Tensor& tot, const Tensor& nseg) {
  const int64_t B = src.size(0), H = src.size(1), ms = src.size(2), d = src.size(3);
  if (n == 0 || B == 0) return at::zeros({B, H, n, d}, src.options());
  Tensor padded = at::cat({src, at::zeros({B, H, 1, d}, src.options())}, 2);
  const Tensor idx = segment_index(mask, B, n, off, tot, nseg, ms);
  // per element, whole rows at a time (a gather with an index expanded to every entry took 6x longer)
  std::vector<Tensor> rows;
  rows.reserve(B);
  for (int64_t b = 0; b < B; ++b) rows.push_back(padded[b].index_select(1, idx[b]));
  return at::stack(rows);
}

/// Softmax along the last axis of logits over the columns where col_valid,
/// for the rows where row_valid (both broadcast against logits); other rows
/// are 0. Returns the probabilities and the rows' log-sum-exps (0 on other rows).
inline Tensors2 masked_softmax(const Tensor& logits, const Tensor& col_valid, const Tensor& row_valid) {
  const double ninf = -std::numeric_limits<double>::infinity();
  Tensor x = logits.masked_fill(col_valid.logical_not(), ninf);
  Tensor lse = x.size(-1) == 0 ? at::full(x.sizes().slice(0, x.dim() - 1), ninf, x.options())
                               : at::logsumexp(x, -1, /*keepdim=*/false);
  Tensor rows = row_valid.squeeze(-1).logical_and(lse.isfinite());
  Tensor lse0 = at::where(rows, lse, at::zeros({}, lse.options()));
  Tensor p = at::where(rows.unsqueeze(-1), x.sub(lse0.unsqueeze(-1)).exp_(), at::zeros({}, x.options()));
  return {p, lse0};
}

/// A = softmax(scale q̃ k̃ᵀ) of every head, zero outside its mq x mk block
/// (only Nyström heads have one): (B, H, ms, ms).
inline Tensor landmark_kernel(const Tensor& q_landmarks, const Tensor& k_landmarks, const Geometry& g, double scale) {
  const int64_t ms = q_landmarks.size(2);
  Tensor logits = at::matmul(q_landmarks, k_landmarks.mul(scale).transpose(-1, -2));
  Tensor cols = rows_below(g.mk.where(g.nystrom, at::zeros_like(g.mk)), ms).transpose(-1, -2);
  return std::get<0>(masked_softmax(logits, cols, rows_below(g.mq, ms)));
}

/// The Newton–Schulz init scale per head and, for the backward, the column
/// attaining it: c = the largest column sum of A (§2 step 4), per head, or
/// with `original` its maximum over every Nyström head (§3.1). (B, H) each;
/// c is 0 off the Nyström path.
inline Tensors3 init_scales(const Tensor& A, const Geometry& g, bool original) {
  const int64_t B = A.size(0), H = A.size(1);
  if (A.size(-1) == 0) {
    Tensor z = at::zeros({B, H}, A.options());
    return {z, z, at::zeros({B, H}, A.options().dtype(at::kLong))};
  }
  auto [colmax, col] = A.sum(-2).max(-1);
  Tensor nys = g.nystrom.view({B, 1}).expand({B, H});
  Tensor zero = at::zeros({}, A.options());
  Tensor c = at::where(nys, colmax, zero);
  if (original) c = at::where(nys, c.max().expand({B, H}), zero);
  return {c, colmax, col};
}

/// c as the (B, H, 1, 1) stack of the batched Newton–Schulz steps: 1 off the
/// Nyström path (A = 0 there).
inline Tensor scale_stack(const Tensor& c, const Geometry& g) {
  const int64_t B = c.size(0), H = c.size(1);
  return at::where(g.nystrom.view({B, 1}).expand({B, H}), c, at::ones({}, c.options())).view({B, H, 1, 1});
}

// ---------------------------------------------------------------- forward --

/// Partial segment sums of this shard: q into the mq query segments, k into
/// the mk key segments (single tokens on the exact path), v into the mv
/// exact-path value rows. (B, H, ms, D), (B, H, ms, D), (B, H, ms, Dv) in acc.
inline Tensors3 segment_sums(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& geometry, int64_t m,
                             int64_t ms, const std::optional<Tensor>& kpm, const std::optional<Tensor>& qpm) {
  const Geometry g("nystrom_sp_segment_sums", geometry, m, q.device());
  const at::ScalarType acc = acc_of(q);
  return {segment_sums_of(q, qpm, g.q_off, g.q_tot, g.mq, ms, acc),
          segment_sums_of(k, kpm, g.k_off, g.k_tot, g.mk, ms, acc),
          g.maybe_exact ? segment_sums_of(v, kpm, g.k_off, g.k_tot, g.mv, ms, acc)
                        : at::zeros({q.size(0), q.size(1), ms, v.size(3)}, q.options().dtype(acc))};
}

/// The partials of landmark_values rescaled to the global maximum (an
/// all-reduce max of part_max), ready to be summed over the ranks.
inline Tensors2 merge_landmark_values(const Tensor& part_max, const Tensor& part_sum, const Tensor& part_pv,
                                      const Tensor& global_max) {
  Tensor w = at::where(part_max.isneginf(), at::zeros({}, part_max.options()), part_max.sub(global_max).exp());
  return {part_sum.mul(w), part_pv.mul(w.unsqueeze(-1))};
}

/// q̃ = the global query sums divided by the segment sizes, and this shard's
/// part of Bm·V (§2 step 3): per landmark row, the maximum of scale q̃ kᵀ over
/// the shard's real keys (-inf without any), the sum of exp(logit - max) and
/// the unnormalised product with v. Rows past mq: -inf, 0, 0.
inline Tensors4 landmark_values(const Tensor& q_sums, const Tensor& k, const Tensor& v, const Tensor& geometry,
                                int64_t m, const std::optional<Tensor>& kpm, double scale) {
  const Geometry g("nystrom_sp_landmark_values", geometry, m, k.device());
  const at::ScalarType acc = acc_of(k);
  const int64_t B = k.size(0), H = k.size(1), S = k.size(2), ms = q_sums.size(2), Dv = v.size(3);
  const double ninf = -std::numeric_limits<double>::infinity();
  Tensor ql = q_sums.mul(inverse_sizes(g.q_tot, g.mq, ms, acc));
  const auto opts = q_sums.options();
  if (S == 0 || ms == 0) {
    return {ql, at::full({B, H, ms}, ninf, opts), at::zeros({B, H, ms}, opts), at::zeros({B, H, ms, Dv}, opts)};
  }
  const Tensor ql_s = ql.mul(scale), rows = rows_below(g.mq, ms);
  Tensor mx, sum, pv;  // the running partials, merged chunk by chunk as the ranks' are
  for (int64_t r0 = 0; r0 < S; r0 += kChunkRows) {
    const int64_t n = std::min(kChunkRows, S - r0);
    const std::optional<Tensor> mask = mask_rows(kpm, r0, n);
    Tensor logits = at::matmul(ql_s, real_rows(k.narrow(2, r0, n), mask, acc).transpose(-1, -2));
    Tensor valid = given(mask) ? rows.logical_and(mask->logical_not().view({B, 1, 1, n})) : rows;
    logits.masked_fill_(valid.logical_not(), ninf);
    Tensor cmx = logits.amax(-1);
    Tensor p = logits.sub_(at::where(cmx.isneginf(), at::zeros({}, opts), cmx).unsqueeze(-1)).exp_();
    Tensor csum = p.sum(-1), cpv = at::matmul(p, real_rows(v.narrow(2, r0, n), mask, acc));
    if (r0 == 0) {
      mx = cmx, sum = csum, pv = cpv;
      continue;
    }
    Tensor both = at::maximum(mx, cmx);
    auto [s0, p0] = merge_landmark_values(mx, sum, pv, both);
    auto [s1, p1] = merge_landmark_values(cmx, csum, cpv, both);
    mx = both, sum = s0.add_(s1), pv = p0.add_(p1);
  }
  return {ql, mx, sum, pv};
}

/// The m x m part, identical on every rank: k̃ (the global key sums over the
/// segment sizes; the keys themselves on the exact path), bv = Bm·V and its
/// log-sum-exps from the merged partials, A, c, Z = pinv(A) by Newton–Schulz
/// and zbv = Z·bv (the values themselves on the exact path).
inline Tensors5 pseudoinverse(const Tensor& q_landmarks, const Tensor& k_sums, const Tensor& v_sums,
                              const Tensor& sum, const Tensor& pv, const Tensor& global_max, const Tensor& geometry,
                              int64_t m, int64_t iterations, bool original, double scale) {
  const Geometry g("nystrom_sp_pseudoinverse", geometry, m, q_landmarks.device());
  const at::ScalarType acc = q_landmarks.scalar_type();
  const int64_t B = q_landmarks.size(0), ms = q_landmarks.size(2);
  Tensor kl = k_sums.mul(inverse_sizes(g.k_tot, g.mk, ms, acc));
  Tensor rows = rows_below(g.mq, ms).squeeze(-1);
  const Tensor zero = at::zeros({}, sum.options());
  Tensor den = at::where(rows, sum, at::ones({}, sum.options()));
  Tensor bv = at::where(rows.unsqueeze(-1), pv.div(den.unsqueeze(-1)), zero);
  Tensor lse = at::where(rows, den.log().add(global_max.masked_fill(rows.logical_not(), 0)), zero);
  Tensor A = landmark_kernel(q_landmarks, kl, g, scale);
  Tensor c = std::get<0>(init_scales(A, g, original));
  Tensor zbv = at::matmul(detail::newton_schulz_last(A, scale_stack(c, g), iterations), bv);
  zbv = at::where(g.exact.view({B, 1, 1, 1}), v_sums, zbv);
  return {kl, bv, zbv, lse, c};
}

/// out = softmax(scale q k̃ᵀ)·zbv for this shard's queries (exact path:
/// softmax(scale q kᵀ)·v over all the element's keys), with the rows'
/// log-sum-exps; padded rows 0. out in q's dtype.
inline Tensors2 query_forward(const Tensor& q, const Tensor& k_landmarks, const Tensor& zbv, const Tensor& geometry,
                              int64_t m, const std::optional<Tensor>& qpm, double scale) {
  const Geometry g("nystrom_sp_query_forward", geometry, m, q.device());
  const at::ScalarType acc = k_landmarks.scalar_type();
  const int64_t B = q.size(0), L = q.size(2), ms = k_landmarks.size(2);
  const Tensor kl_s = k_landmarks.mul(scale).transpose(-1, -2), cols = rows_below(g.mk, ms).transpose(-1, -2);
  Tensor out = at::empty({B, q.size(1), L, zbv.size(3)}, q.options());
  Tensor lse = at::empty({B, q.size(1), L}, k_landmarks.options());
  for (int64_t r0 = 0; r0 < L; r0 += kChunkRows) {
    const int64_t n = std::min(kChunkRows, L - r0);
    const std::optional<Tensor> mask = mask_rows(qpm, r0, n);
    Tensor logits = at::matmul(real_rows(q.narrow(2, r0, n), mask, acc), kl_s);
    Tensor rows = given(mask) ? mask->logical_not().view({B, 1, n, 1}) : at::ones({1, 1, n, 1}, q.options().dtype(at::kBool));
    auto [F, l] = masked_softmax(logits, cols, rows);
    out.narrow(2, r0, n).copy_(at::matmul(F, zbv));
    lse.narrow(2, r0, n).copy_(l);
  }
  return {out, lse};
}

// --------------------------------------------------------------- backward --

/// The query pass of the backward (§4) on this shard: F recomputed from
/// lse_query; the direct part of dq, and this shard's parts of dL/dk̃ and
/// dL/dW (W = zbv), to be summed over the ranks. dq in acc.
inline Tensors3 query_backward(const Tensor& grad_out, const Tensor& q, const Tensor& k_landmarks, const Tensor& zbv,
                               const Tensor& lse_query, const Tensor& geometry, int64_t m,
                               const std::optional<Tensor>& qpm, double scale) {
  const Geometry g("nystrom_sp_query_backward", geometry, m, q.device());
  const at::ScalarType acc = k_landmarks.scalar_type();
  const int64_t B = q.size(0), L = q.size(2), ms = k_landmarks.size(2);
  const Tensor kl_s = k_landmarks.mul(scale);
  const Tensor has_keys = g.mk.gt(0).view({B, 1, 1, 1});
  const Tensor cols = rows_below(g.mk, ms).transpose(-1, -2);
  const Tensor zero = at::zeros({}, k_landmarks.options());
  Tensor dq = at::empty(q.sizes(), k_landmarks.options());
  Tensor dkl = at::zeros(k_landmarks.sizes(), k_landmarks.options());
  Tensor dw = at::zeros(zbv.sizes(), zbv.options());
  for (int64_t r0 = 0; r0 < L; r0 += kChunkRows) {
    const int64_t n = std::min(kChunkRows, L - r0);
    const std::optional<Tensor> mask = mask_rows(qpm, r0, n);
    Tensor qz = real_rows(q.narrow(2, r0, n), mask, acc);
    Tensor rows = given(mask) ? has_keys.logical_and(mask->logical_not().view({B, 1, n, 1})) : has_keys;
    Tensor logits = at::matmul(qz, kl_s.transpose(-1, -2));
    logits.masked_fill_(cols.logical_not(), -std::numeric_limits<double>::infinity());
    Tensor F = at::where(rows, logits.sub_(lse_query.narrow(2, r0, n).unsqueeze(-1)).exp_(), zero);
    Tensor dO = at::where(rows, grad_out.narrow(2, r0, n).to(acc), zero);
    Tensor dF = at::matmul(dO, zbv.transpose(-1, -2));
    Tensor dX = F.mul(dF.sub((F * dF).sum(-1, true)));
    dq.narrow(2, r0, n).copy_(at::matmul(dX, kl_s));
    dkl.add_(at::matmul(dX.transpose(-1, -2), qz));
    dw.add_(at::matmul(F.transpose(-1, -2), dO));
  }
  return {dq, dkl.mul_(scale), dw};
}

/// The landmark pass, identical on every rank, from the summed dL/dk̃ and dL/dW:
/// back through zbv = Z_T·bv, every Newton–Schulz iteration, c (per head, or
/// the one maximum of "original": §3.1) and the softmax of A. Returns dL/dq̃
/// (its A part), each key's share of dL/dk̃ per segment (dL/dk̃ over the
/// segment size), dL/dbv, and each exact-path key's dL/dv (single tokens).
inline Tensors4 pseudoinverse_backward(const Tensor& k_landmark_grad, const Tensor& zbv_grad, const Tensor& q_landmarks,
                                       const Tensor& k_landmarks, const Tensor& bv, const Tensor& pinv_scale,
                                       const Tensor& geometry, int64_t m, int64_t iterations, bool original,
                                       double scale) {
  const Geometry g("nystrom_sp_pseudoinverse_backward", geometry, m, q_landmarks.device());
  const at::ScalarType acc = q_landmarks.scalar_type();
  const int64_t B = q_landmarks.size(0), H = q_landmarks.size(1), ms = q_landmarks.size(2);
  Tensor nys = g.nystrom.view({B, 1, 1, 1});
  const Tensor zero = at::zeros({}, q_landmarks.options());
  Tensor dw = at::where(nys, zbv_grad, zero);
  Tensor A = landmark_kernel(q_landmarks, k_landmarks, g, scale);
  auto [c_recomputed, colmax, col] = init_scales(A, g, original);
  Tensor c_t = scale_stack(pinv_scale, g);
  const std::vector<Tensor> Z = detail::newton_schulz_iterates(A, c_t, iterations);
  Tensor dbv = at::matmul(Z.back().transpose(-1, -2), dw);
  auto [dA, dc] = detail::newton_schulz_backward(A, c_t, Z, at::matmul(dw, bv.transpose(-1, -2)));
  // c = the largest column sum of A: its gradient reaches that column. With
  // "original" every head's dc goes to the first head attaining the maximum.
  Tensor dcs = at::where(g.nystrom.view({B, 1}).expand({B, H}), dc.view({B, H}), at::zeros({}, dc.options()));
  if (original && ms > 0) {
    Tensor best = at::where(g.nystrom.view({B, 1}).expand({B, H}), colmax, at::full({}, -1.0, colmax.options()));
    Tensor onehot = at::zeros({B * H}, dcs.options()).index_fill_(0, best.reshape({-1}).argmax().view({1}), 1.0);
    dcs = onehot.view({B, H}).mul_(dcs.sum());
  }
  if (ms > 0) dA.scatter_add_(-1, col.view({B, H, 1, 1}).expand({B, H, ms, 1}), dcs.view({B, H, 1, 1}).expand({B, H, ms, 1}));
  Tensor dS = A.mul(dA.sub((A * dA).sum(-1, true)));
  Tensor dql = at::matmul(dS, k_landmarks).mul_(scale);
  Tensor dkl = k_landmark_grad.add(at::matmul(dS.transpose(-1, -2), q_landmarks).mul_(scale));
  Tensor k_share = dkl.mul(inverse_sizes(g.k_tot, g.mk, ms, acc));
  Tensor v_share = at::where(g.exact.view({B, 1, 1, 1}), zbv_grad, zero);
  return {dql, k_share, dbv, v_share};
}

/// The key pass on this shard: Bm recomputed from lse_landmark; dk (direct
/// part plus each key's share of dL/dk̃), dv (plus the exact-path share), and
/// this shard's part of dL/dq̃, to be summed over the ranks. dk, dv in k's dtype.
inline Tensors3 key_backward(const Tensor& k, const Tensor& v, const Tensor& q_landmarks, const Tensor& bv,
                             const Tensor& lse_landmark, const Tensor& bv_grad, const Tensor& k_share,
                             const Tensor& v_share, const Tensor& geometry, int64_t m,
                             const std::optional<Tensor>& kpm, double scale) {
  const Geometry g("nystrom_sp_key_backward", geometry, m, k.device());
  const at::ScalarType acc = q_landmarks.scalar_type();
  const int64_t B = k.size(0), S = k.size(2), ms = q_landmarks.size(2);
  const Tensor ql_s = q_landmarks.mul(scale), rows = rows_below(g.mq, ms);
  const Tensor delta = (bv_grad * bv).sum(-1, true);
  const Tensor lse = lse_landmark.unsqueeze(-1);
  const Tensor zero = at::zeros({}, q_landmarks.options());
  // each key's share of dk̃ and of the exact path's dv, for every local key (O(n·d), like dk, dv themselves)
  const Tensor k_rows = segment_rows_of(k_share, kpm, S, g.k_off, g.k_tot, g.mk);
  const Tensor v_rows = g.maybe_exact ? segment_rows_of(v_share, kpm, S, g.k_off, g.k_tot, g.mv) : Tensor();
  Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
  Tensor dql = at::zeros(q_landmarks.sizes(), q_landmarks.options());
  for (int64_t r0 = 0; r0 < S; r0 += kChunkRows) {
    const int64_t n = std::min(kChunkRows, S - r0);
    const std::optional<Tensor> mask = mask_rows(kpm, r0, n);
    Tensor kz = real_rows(k.narrow(2, r0, n), mask, acc), vz = real_rows(v.narrow(2, r0, n), mask, acc);
    Tensor valid = given(mask) ? rows.logical_and(mask->logical_not().view({B, 1, 1, n})) : rows;
    Tensor Bm = at::where(valid, at::matmul(ql_s, kz.transpose(-1, -2)).sub_(lse).exp_(), zero);
    Tensor dX = Bm.mul(at::matmul(bv_grad, vz.transpose(-1, -2)).sub_(delta));
    Tensor dkc = at::matmul(dX.transpose(-1, -2), ql_s).add_(k_rows.narrow(2, r0, n));
    Tensor dvc = at::matmul(Bm.transpose(-1, -2), bv_grad);
    if (v_rows.defined()) dvc.add_(v_rows.narrow(2, r0, n));
    if (given(mask)) {
      Tensor pad = mask->reshape({B, 1, n, 1});
      dkc.masked_fill_(pad, 0);
      dvc.masked_fill_(pad, 0);
    }
    dk.narrow(2, r0, n).copy_(dkc);
    dv.narrow(2, r0, n).copy_(dvc);
    dql.add_(at::matmul(dX, kz));
  }
  return {dk, dv, dql.mul_(scale)};
}

/// dq = its direct part plus each query's share of dL/dq̃ (the landmark pass's
/// part plus the ranks' summed key-pass parts, over the segment size); padded
/// rows 0; in `dtype`.
inline Tensor query_spread(const Tensor& grad_query, const Tensor& q_landmark_grad_keys,
                           const Tensor& q_landmark_grad_kernel, const Tensor& geometry, int64_t m,
                           const std::optional<Tensor>& qpm, at::ScalarType dtype) {
  const Geometry g("nystrom_sp_query_spread", geometry, m, grad_query.device());
  const int64_t B = grad_query.size(0), L = grad_query.size(2), ms = q_landmark_grad_keys.size(2);
  Tensor dql = q_landmark_grad_keys.add(q_landmark_grad_kernel)
                   .mul_(inverse_sizes(g.q_tot, g.mq, ms, q_landmark_grad_keys.scalar_type()));
  Tensor dq = grad_query.add(segment_rows_of(dql, qpm, L, g.q_off, g.q_tot, g.mq));
  if (given(qpm)) dq.masked_fill_(qpm->reshape({B, 1, L, 1}), 0);
  return dq.to(dtype);
}

}  // namespace nystrom::stages
