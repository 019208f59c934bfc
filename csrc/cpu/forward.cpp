// CPU kernel of nystrom_attention_forward (docs/DESIGN.md §6), in the order
// of the CUDA glue's steps (§7):
//   1. landmarks q̃, k̃ (segment means), A = softmax(scale q̃ k̃ᵀ) and c, per head;
//   2. Bm·V over tiles of keys, with an online softmax, merged per head;
//   3. Z = pinv(A) by Newton–Schulz, and zbv = Z·Bm·V;
//   4. out = softmax(scale q k̃ᵀ)·zbv over tiles of queries (exact elements:
//      softmax(scale q kᵀ)·v), with the row log-sum-exps.
// All arithmetic in float32 (float64 for float64 inputs); half-precision
// inputs are converted a tile at a time, and the output rounded as it is
// written.
#include "cpu/tile_ops.h"
#include "cpu/tiles.h"
#include "newton_schulz.h"
#include "saved_tensors.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace nystrom::cpu {
namespace {

// One forward call in progress: its inputs, outputs and what the phases
// hand each other.
struct ForwardCall {
  ForwardCall(const detail::Call& call, const std::vector<Element>& elements, detail::ForwardOutputs& outputs)
      : c(call), el(elements), r(outputs) {}
  const detail::Call& c;
  const std::vector<Element>& el;
  detail::ForwardOutputs& r;
  std::vector<int64_t> heads;  // b * H + h of the Nyström elements
  Tensor A_all;                // (B, H, ms, ms): every head's A, zero-padded
  std::vector<double> pinv_c;  // c per head (B * H)
  Tensor q_lm_s, k_lm_s;       // landmarks with the softmax scale folded in
  bool fused = false;          // the fused float32 kernels serve this call
  bool bf16 = false;           // ... with the long products on vdpbf16ps (bfloat16 inputs)
  int64_t mp = 0, dvp = 0;     // ms and Dv rounded up to fused::kPadColumns
};

// Phase 1 (§2 steps 2-4): landmarks, A and its column-sum scale c per head.
void landmarks_and_kernel(ForwardCall& f) {
  const detail::Call& c = f.c;
  const double md = static_cast<double>(c.ms);
  // Only the Nyström path has landmarks and an A. With no Nyström element ms
  // may be as long as the sequence (num_landmarks >= L, S), and (ms x ms) per
  // head would be quadratic in it: nothing is allocated.
  if (f.heads.empty()) {
    f.q_lm_s = f.r.q_landmarks;  // zeros, unused
    f.k_lm_s = f.r.k_landmarks;
    return;
  }
  f.A_all = at::zeros({c.B, c.H, c.ms, c.ms}, c.acc_opts);
  f.pinv_c.assign(c.B * c.H, 0.0);
  run_tasks(static_cast<int64_t>(f.heads.size()), double(c.L + c.S) * c.D + md * md * c.D, [&](int64_t i) {
    const int64_t bh = f.heads[i], b = bh / c.H, h = bh % c.H;
    const Element& e = f.el[b];
    Tensor ql = landmarks(c.q[b][h], e.qidx, e.Lb, e.mq, c.acc);
    Tensor kl = landmarks(c.k[b][h], e.kidx, e.Sb, e.mk, c.acc);
    f.r.q_landmarks[b][h].narrow(0, 0, e.mq).copy_(ql);
    f.r.k_landmarks[b][h].narrow(0, 0, e.mk).copy_(kl);
    Tensor Ah = softmax_rows(ql, kl * c.o.scale).first;
    f.pinv_c[bh] = max_column_sum(Ah).first;
    f.A_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk).copy_(Ah);
  });
  // pinv_init="original": one maximum over the Nyström path (§3).
  if (c.o.original_init && !f.heads.empty()) {
    double cmax = 0.0;
    for (int64_t bh : f.heads) cmax = std::max(cmax, f.pinv_c[bh]);
    for (int64_t bh : f.heads) f.pinv_c[bh] = cmax;
  }
  for (int64_t bh : f.heads) f.r.pinv_scale[bh / c.H][bh % c.H].fill_(f.pinv_c[bh]);
  f.q_lm_s = f.r.q_landmarks * c.o.scale;
  f.k_lm_s = f.r.k_landmarks * c.o.scale;
}

// Phase 2 (§2 step 3, Bm·V): per tile of keys, the row maxima, row sums and
// unnormalised product of softmax(scale q̃ kᵀ)·v; then per head their merge
// into bv and lse_landmark.
void landmark_values(ForwardCall& f) {
  const detail::Call& c = f.c;
  const std::vector<Tile> tiles = make_tiles(f.el, c.H, /*keys=*/true, /*exact_whole=*/false, ElementKind::kNystrom);
  std::vector<Tensor> part_max(tiles.size()), part_sum(tiles.size()), part_pv(tiles.size());
  const Tensor qT_pack = f.fused ? pack_heads(f.q_lm_s, c.D, f.mp, /*transpose=*/true) : Tensor();
  const Tensor qT_pairs = f.bf16 ? pair_heads(qT_pack) : Tensor();
  const double md = static_cast<double>(c.ms), tS = tile_rows(c.S, c.B * c.H);
  run_tasks(static_cast<int64_t>(tiles.size()), tS * md * (c.D + c.Dv), [&](int64_t i) {
    const Tile& t = tiles[i];
    const Element& e = f.el[t.b];
    if (f.bf16) {
      const Tensor kt = half_rows(c.k[t.b][t.h], e.kidx, t.r0, t.r1, 4, c.D);
      const Tensor vt = unit_rows(c.v[t.b][t.h], e.kidx, t.r0, t.r1, 5, f.dvp);
      const int64_t n = kt.size(0);
      const Tensor work = scratch(0, n, f.mp, c.acc_opts);
      Tensor stats = at::empty({2, f.mp}, c.acc_opts);
      Tensor pv = at::empty({e.mq, c.Dv}, c.acc_opts);
      fused::bf16::key_tile(half_ptr(kt), kt.stride(0), vt.data_ptr<float>(), vt.stride(0), n, c.D, c.Dv,
                            pair_ptr(qT_pairs[t.b][t.h]), e.mq, f.mp, work.data_ptr<float>(),
                            stats[0].data_ptr<float>(), stats[1].data_ptr<float>(), pv.data_ptr<float>(), c.Dv);
      part_max[i] = stats[0].narrow(0, 0, e.mq).unsqueeze(1);
      part_sum[i] = stats[1].narrow(0, 0, e.mq).unsqueeze(1);
      part_pv[i] = pv;
      return;
    }
    if (f.fused) {
      const Tensor kt = unit_rows(c.k[t.b][t.h], e.kidx, t.r0, t.r1, 4, c.D);
      const Tensor vt = unit_rows(c.v[t.b][t.h], e.kidx, t.r0, t.r1, 5, f.dvp);
      const Tensor work = scratch(0, kt.size(0), f.mp, c.acc_opts);
      Tensor stats = at::empty({2, f.mp}, c.acc_opts);
      Tensor pv = at::empty({e.mq, c.Dv}, c.acc_opts);
      fused::key_tile(kt.data_ptr<float>(), kt.stride(0), vt.data_ptr<float>(), vt.stride(0), kt.size(0), c.D, c.Dv,
                      qT_pack[t.b][t.h].data_ptr<float>(), e.mq, f.mp, work.data_ptr<float>(),
                      stats[0].data_ptr<float>(), stats[1].data_ptr<float>(), pv.data_ptr<float>(), c.Dv);
      part_max[i] = stats[0].narrow(0, 0, e.mq).unsqueeze(1);
      part_sum[i] = stats[1].narrow(0, 0, e.mq).unsqueeze(1);
      part_pv[i] = pv;
      return;
    }
    Tensor ql = f.q_lm_s[t.b][t.h].narrow(0, 0, e.mq);
    Tensor kt = rows(c.k[t.b][t.h], e.kidx, t.r0, t.r1, c.acc, 4);
    Tensor vt = rows(c.v[t.b][t.h], e.kidx, t.r0, t.r1, c.acc, 5);
    Tensor logits = scratch(0, ql.size(0), kt.size(0), c.acc_opts);
    at::mm_out(logits, ql, kt.t());
    std::tie(part_max[i], part_sum[i]) = exp_rows(logits, /*normalize=*/false);
    part_pv[i] = at::mm(logits, vt);
  });
  const TileIndex index(tiles, c.B, c.H);
  run_tasks(static_cast<int64_t>(f.heads.size()), std::ceil(c.S / tS) * md * c.Dv, [&](int64_t i) {
    const int64_t bh = f.heads[i], b = bh / c.H, h = bh % c.H;
    const Element& e = f.el[b];
    const int64_t first = index.first[bh], n = index.count[bh];
    Tensor mx = part_max[first].clone();
    for (int64_t j = 1; j < n; ++j) mx = at::maximum(mx, part_max[first + j]);
    Tensor sum = at::zeros_like(mx);
    Tensor pv = at::zeros({e.mq, c.Dv}, c.acc_opts);
    for (int64_t j = 0; j < n; ++j) {
      Tensor w = (part_max[first + j] - mx).exp_();
      sum.add_(part_sum[first + j] * w);
      pv.add_(part_pv[first + j] * w);
    }
    f.r.bv[b][h].narrow(0, 0, e.mq).copy_(pv.div_(sum));
    f.r.lse_landmark[b][h].narrow(0, 0, e.mq).copy_(sum.log_().add_(mx).squeeze(1));
  });
}

// Phase 3 (§2 step 4): Z = pinv(A) by Newton–Schulz and zbv = Z·bv.
void pseudoinverse(ForwardCall& f) {
  const detail::Call& c = f.c;
  if (f.heads.empty()) return;
  if (f.fused) {
    // one head per task, its matrices in scratch (a few dozen KiB at m = 64)
    const int64_t mp = f.mp;
    run_tasks(static_cast<int64_t>(f.heads.size()), 4.0 * c.o.pinv_iterations * mp * mp * mp, [&](int64_t i) {
      const int64_t bh = f.heads[i], b = bh / c.H, h = bh % c.H;
      const Tensor Ap = padded_square(f.A_all[b][h], mp, 0);
      Tensor Z = scratch(1, mp, mp, c.acc_opts);
      fused::newton_schulz(Ap.data_ptr<float>(), static_cast<float>(f.pinv_c[bh]), c.o.pinv_iterations, mp,
                           Z.data_ptr<float>(), /*keep_all=*/false, scratch(2, 6 * mp, mp, c.acc_opts).data_ptr<float>());
      Tensor zbv_h = f.r.zbv[b][h];
      at::mm_out(zbv_h, Z.narrow(0, 0, c.ms).narrow(1, 0, c.ms), f.r.bv[b][h]);
    });
    return;
  }
  const Tensor c_t = pinv_scales(f.pinv_c, f.heads, c.B, c.H, c.acc);
  at::matmul_out(f.r.zbv, detail::newton_schulz_last(f.A_all, c_t, c.o.pinv_iterations), f.r.bv);
}

// Phase 4 (§2 steps 1 and 5): per tile of queries, out = softmax(scale q k̃ᵀ)·zbv
// on the Nyström path, softmax(scale q kᵀ)·v on the exact path (one tile per
// element: L_b, S_b <= m), and the rows' log-sum-exps.
void query_rows(ForwardCall& f) {
  const detail::Call& c = f.c;
  const std::vector<Tile> tiles = make_tiles(f.el, c.H, /*keys=*/false, /*exact_whole=*/true);
  const Tensor kT_pack = f.fused ? pack_heads(f.k_lm_s, c.D, f.mp, /*transpose=*/true) : Tensor();
  const Tensor w_pack = f.fused ? pack_heads(f.r.zbv, f.mp, f.dvp, /*transpose=*/false) : Tensor();
  const Tensor kT_pairs = f.bf16 ? pair_heads(kT_pack) : Tensor();
  const Tensor w_pairs = f.bf16 ? pair_heads(w_pack) : Tensor();
  const Tensor& out = f.r.out;
  const double md = static_cast<double>(c.ms), tL = tile_rows(c.L, c.B * c.H);
  run_tasks(static_cast<int64_t>(tiles.size()), tL * md * (c.D + c.Dv), [&](int64_t i) {
    const Tile& t = tiles[i];
    const Element& e = f.el[t.b];
    const Tensor out_bh = out[t.b][t.h];
    const Tensor lse_bh = f.r.lse_query[t.b][t.h];
    if (f.fused && e.kind == ElementKind::kNystrom) {
      const Tensor qt = f.bf16 ? half_rows(c.q[t.b][t.h], e.qidx, t.r0, t.r1, 4, c.D)
                               : unit_rows(c.q[t.b][t.h], e.qidx, t.r0, t.r1, 4, c.D);
      const int64_t n = qt.size(0);
      Tensor lse = e.qidx.defined() ? scratch(3, n, 1, c.acc_opts).view({n}) : lse_bh.narrow(0, t.r0, n);
      // straight into out and lse_query when the tile's rows are contiguous
      // there (out in its dtype: float32, or bfloat16 rounded as written)
      const bool direct = !e.qidx.defined() && out_bh.stride(1) == 1;
      if (f.bf16) {
        Tensor o = direct ? out_bh.narrow(0, t.r0, n) : scratch(2, n, c.Dv, out.options());
        fused::bf16::attend_rows(half_ptr(qt), qt.stride(0), n, c.D, pair_ptr(kT_pairs[t.b][t.h]), e.mk, f.mp,
                                 pair_ptr(w_pairs[t.b][t.h]), f.dvp, c.Dv, static_cast<uint16_t*>(o.data_ptr()),
                                 o.stride(0), lse.data_ptr<float>());
        if (!direct) put_rows(out_bh, e.qidx, t.r0, o);
      } else {
        const bool into_out = direct && out.scalar_type() == at::kFloat;
        Tensor o = into_out ? out_bh.narrow(0, t.r0, n) : scratch(2, n, c.Dv, c.acc_opts);
        fused::attend_rows(qt.data_ptr<float>(), qt.stride(0), n, c.D, kT_pack[t.b][t.h].data_ptr<float>(), e.mk,
                           f.mp, w_pack[t.b][t.h].data_ptr<float>(), f.dvp, c.Dv, o.data_ptr<float>(), o.stride(0),
                           lse.data_ptr<float>());
        if (!into_out) store_tile(out_bh, e.qidx, t.r0, o);
      }
      if (e.qidx.defined()) put_rows(lse_bh, e.qidx, t.r0, lse);
      return;
    }
    Tensor keys, values;
    if (e.kind == ElementKind::kNystrom) {
      keys = f.k_lm_s[t.b][t.h].narrow(0, 0, e.mk);
      values = f.r.zbv[t.b][t.h].narrow(0, 0, e.mk);
    } else {
      keys = rows(c.k[t.b][t.h], e.kidx, 0, e.Sb, c.acc).mul(c.o.scale);
      values = rows(c.v[t.b][t.h], e.kidx, 0, e.Sb, c.acc);
    }
    auto [p, lse] = softmax_rows(rows(c.q[t.b][t.h], e.qidx, t.r0, t.r1, c.acc, 4), keys);
    mm_put(out_bh, e.qidx, t.r0, p, values);
    put_rows(lse_bh, e.qidx, t.r0, lse);
  });
}

ForwardResult forward_cpu(const Tensor& query, const Tensor& key, const Tensor& value, int64_t num_landmarks,
                          int64_t pinv_iterations, c10::string_view pinv_init,
                          const std::optional<Tensor>& key_padding_mask,
                          const std::optional<Tensor>& query_padding_mask, std::optional<double> scale) {
  constexpr const char* op = "nystrom_attention_forward";
  const detail::Call c = detail::forward_prologue(op, query, key, value, num_landmarks, pinv_iterations, pinv_init,
                                                  key_padding_mask, query_padding_mask, scale);
  // Every real query row is written; only padded rows need zeros.
  detail::ForwardOutputs r =
      detail::allocate_forward_outputs(c.q, c.k, c.v, num_landmarks, detail::Fill::kZeros, c.has_query_mask);
  if (c.B == 0 || c.L == 0) return r.tuple();
  const std::vector<Element> el =
      describe_batch(op, c.B, c.L, c.S, c.o.num_landmarks, key_padding_mask, query_padding_mask);
  ForwardCall f(c, el, r);
  f.heads = heads_of(el, c.H, ElementKind::kNystrom);
  f.fused = use_fused(c.acc, c.ms);
  f.bf16 = f.fused && query.scalar_type() == at::kBFloat16 && r.out.scalar_type() == at::kBFloat16 && bf16_products();
  f.mp = round_up(c.ms, fused::kPadColumns);
  f.dvp = round_up(c.Dv, fused::kPadColumns);
  landmarks_and_kernel(f);
  landmark_values(f);
  pseudoinverse(f);
  query_rows(f);
  return r.tuple();
}

}  // namespace
}  // namespace nystrom::cpu

TORCH_LIBRARY_IMPL(nystrom, CPU, m) { m.impl("nystrom_attention_forward", &nystrom::cpu::forward_cpu); }
