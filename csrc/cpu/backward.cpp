// CPU kernel of nystrom_attention_backward (docs/DESIGN.md §6): the exact
// derivative of the forward, through every Newton–Schulz iteration and c. Its
// phases follow the CUDA glue's backward steps (§7):
//   0. exact elements, whole (softmax attention's own gradient);
//   1. query pass: recompute F from lse_query per query tile; dq (direct
//      part), and per tile the partial dk̃ and dW (W = zbv);
//   2. landmark pass, per head: reduce the tiles; back through zbv = Z_T·bv,
//      the Newton–Schulz iterations, c and the softmax of A, giving dbv, dq̃, dk̃;
//   3. key pass: recompute Bm from lse_landmark per key tile; dk (direct part
//      plus each key's share of dk̃), dv, and per tile the partial dq̃;
//   4. each query's share of dq̃ (the landmarks are segment means).
// Gradients accumulate in the compute dtype; half-precision ones are rounded
// once, per tile (dk, dv) or at the end (dq).
#include "cpu/tile_ops.h"
#include "cpu/tiles.h"
#include "newton_schulz.h"
#include "saved_tensors.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace nystrom::cpu {
namespace {

// One backward call in progress: inputs, gradients, and what the phases hand
// each other. Per-head vectors are indexed by b * H + h.
struct BackwardState {
  BackwardState(const detail::BackwardCall& call, const std::vector<Element>& elements, Tensor dq_, Tensor dk_,
                Tensor dv_)
      : c(call), el(elements), dq(std::move(dq_)), dk(std::move(dk_)), dv(std::move(dv_)) {}
  const detail::BackwardCall& c;
  const std::vector<Element>& el;
  Tensor dq, dk, dv;           // (B, H, n, d) in the compute dtype
  Tensor dq_out;               // dq in the input dtype, written by phase 4 (fused, half inputs)
  std::vector<int64_t> heads;  // the Nyström heads
  Tensor q_lm_s, k_lm_s;       // landmarks with the softmax scale folded in
  bool fused = false;
  bool bf16 = false;  // bfloat16 rows on vdpbf16ps (fused_bf16.h), as the forward's: rounded landmarks
  int64_t mp = 0, dp = 0, dvp = 0;  // ms, D, Dv rounded up to fused::kPadColumns
  std::vector<Tile> qtiles, ktiles;  // Nyström tiles of queries and of keys
  std::vector<Tensor> part_dkl, part_dw2, part_dql;  // per tile
  Tensor dbv_all;                    // (B, H, ms, Dv): dL/dbv, zero-padded
  std::vector<Tensor> dql, dkl, dbv;  // per head: dL/dq̃, dL/dk̃, dL/dbv
};

// What both passes give a backward tile kernel (fused::backward_tile, or
// fused::bf16::backward_tile for bfloat16 rows): the tile's x rows (q or k,
// D wide) and y rows (dO or v, Dv wide), m of mp landmark columns, one head's
// packed b1, b2 and c1 (float32, or bfloat16 pairs: pair_heads), the rows of
// out1, the P and X buffers (scratch slots 0 and 1; the pair scratch in 6
// and 7) and t1. Each pass adds its own offsets and outputs.
template <typename Tile>
Tile backward_tile_of(const Tensor& x, const Tensor& y, int64_t D, int64_t Dv, int64_t m, int64_t mp,
                      const Tensor& b1, const Tensor& b2, const Tensor& c1, const Tensor& out1, const Tensor& t1) {
  using Row = std::remove_const_t<std::remove_pointer_t<decltype(Tile::x)>>;
  using Operand = std::remove_const_t<std::remove_pointer_t<decltype(Tile::b1)>>;
  Tile bt;
  bt.x = static_cast<const Row*>(x.data_ptr());
  bt.ldx = x.stride(0);
  bt.y = static_cast<const Row*>(y.data_ptr());
  bt.ldy = y.stride(0);
  bt.rows = x.size(0);
  bt.D = D;
  bt.Dv = Dv;
  bt.m = m;
  bt.mp = mp;
  bt.b1 = static_cast<const Operand*>(b1.data_ptr());
  bt.b2 = static_cast<const Operand*>(b2.data_ptr());
  bt.c1 = static_cast<const Operand*>(c1.data_ptr());
  bt.ldc1 = c1.stride(0);
  bt.out1 = out1.data_ptr<float>();
  bt.ldo1 = out1.stride(0);
  const at::TensorOptions f32 = out1.options().dtype(at::kFloat);
  const int64_t n = x.size(0);
  bt.pbuf = scratch(0, n, mp, f32).data_ptr<float>();
  bt.xbuf = scratch(1, n, mp, f32).data_ptr<float>();
  if constexpr (std::is_same_v<Row, uint16_t>) {
    const at::TensorOptions i32 = f32.dtype(at::kInt);
    bt.pairs = pair_ptr(scratch(6, (n + 1) / 2, mp, i32));
    bt.rbuf = pair_ptr(scratch(7, n, round_up(std::max(D, Dv), 16), i32));
  }
  bt.t1 = t1.data_ptr<float>();
  bt.ldt1 = t1.stride(0);
  return bt;
}

// A tile on the kernel of its type.
void run_tile(const fused::BackwardTile& t) { fused::backward_tile(t); }
void run_tile(const fused::bf16::PairTile& t) { fused::bf16::backward_tile(t); }

// Phase 0: exact elements, one task per (b, h), the whole element at once.
void exact_elements(BackwardState& s) {
  const detail::BackwardCall& c = s.c;
  const std::vector<int64_t> heads = heads_of(s.el, c.H, ElementKind::kExact);
  const double md = static_cast<double>(c.ms);
  run_tasks(static_cast<int64_t>(heads.size()), 2 * md * md * (c.D + c.Dv), [&](int64_t i) {
    const int64_t b = heads[i] / c.H, h = heads[i] % c.H;
    const Element& e = s.el[b];
    Tensor qr = rows(c.q[b][h], e.qidx, 0, e.Lb, c.acc);
    Tensor kr = rows(c.k[b][h], e.kidx, 0, e.Sb, c.acc);
    Tensor vr = rows(c.v[b][h], e.kidx, 0, e.Sb, c.acc);
    Tensor g = rows(c.grad_out[b][h], e.qidx, 0, e.Lb, c.acc);
    Tensor lse = rows(c.lse_query[b][h].unsqueeze(1), e.qidx, 0, e.Lb, c.acc);
    Tensor P = at::mm(qr, kr.t()).mul_(c.o.scale).sub_(lse).exp_();
    Tensor dP = at::mm(g, vr.t());
    Tensor dS = P * (dP - (P * dP).sum(1, true));
    put_rows(s.dq[b][h], e.qidx, 0, at::mm(dS, kr).mul_(c.o.scale));
    put_rows(s.dk[b][h], e.kidx, 0, at::mm(dS.t(), qr).mul_(c.o.scale));
    put_rows(s.dv[b][h], e.kidx, 0, at::mm(P.t(), g));
  });
}

// The scaled landmarks as the forward's logits used them: rounded to
// bfloat16 where its products ran on vdpbf16ps (forward.cpp), else as they are.
Tensor logit_landmarks(const BackwardState& s, const Tensor& lm_scaled) {
  return s.bf16 ? lm_scaled.to(at::kBFloat16).to(lm_scaled.scalar_type()) : lm_scaled;
}

// Phase 1: query tiles. F = softmax(scale q k̃ᵀ) from its saved log-sum-exp;
// dq (direct part), and per tile dk̃ = scale dXᵀ q and dW = Fᵀ dO.
void query_pass(BackwardState& s) {
  const detail::BackwardCall& c = s.c;
  s.qtiles = make_tiles(s.el, c.H, /*keys=*/false, /*exact_whole=*/false, ElementKind::kNystrom);
  s.part_dkl.assign(s.qtiles.size(), Tensor());
  s.part_dw2.assign(s.qtiles.size(), Tensor());
  // The packed per-head operands of the fused pass (fused.h, backward_tile).
  // The logits are recomputed from the landmarks the forward multiplied, so
  // that F matches its saved log-sum-exps.
  const Tensor k_lm_sT = s.fused ? pack_heads(logit_landmarks(s, s.k_lm_s), c.D, s.mp, /*transpose=*/true) : Tensor();
  const Tensor zbvT = s.fused ? pack_heads(c.zbv, c.Dv, s.mp, /*transpose=*/true) : Tensor();
  const Tensor k_lm_sP = s.fused ? pack_heads(s.k_lm_s, s.mp, s.dp, /*transpose=*/false) : Tensor();
  // bfloat16 rows: every product on vdpbf16ps, the operands as pairs (W and
  // the landmarks rounded as the forward rounded them)
  const Tensor b1P = s.bf16 ? pair_heads(k_lm_sT) : Tensor();
  const Tensor b2P = s.bf16 ? pair_heads(zbvT) : Tensor();
  const Tensor c1P = s.bf16 ? pair_heads(k_lm_sP) : Tensor();
  const double md = static_cast<double>(c.ms), tL = tile_rows(c.L, c.B * c.H);
  run_tasks(static_cast<int64_t>(s.qtiles.size()), tL * md * (2 * c.D + 3 * c.Dv), [&](int64_t i) {
    const Tile& t = s.qtiles[i];
    const Element& e = s.el[t.b];
    const Tensor lse_bh = c.lse_query[t.b][t.h].unsqueeze(1);
    if (s.fused) {
      const Tensor qt = s.bf16 ? half_rows(c.q[t.b][t.h], e.qidx, t.r0, t.r1, 4, c.D)
                               : unit_rows(c.q[t.b][t.h], e.qidx, t.r0, t.r1, 4, s.dp);
      const Tensor g = s.bf16 ? half_rows(c.grad_out[t.b][t.h], e.qidx, t.r0, t.r1, 5, c.Dv)
                              : unit_rows(c.grad_out[t.b][t.h], e.qidx, t.r0, t.r1, 5, s.dvp);
      const Tensor lse = rows(lse_bh, e.qidx, t.r0, t.r1, c.acc).contiguous();
      const int64_t n = qt.size(0);
      const bool direct = !e.qidx.defined();
      Tensor dqt = direct ? s.dq[t.b][t.h].narrow(0, t.r0, n) : scratch(2, n, c.D, c.acc_opts);
      s.part_dkl[i] = at::empty({e.mk, c.D}, c.acc_opts);
      s.part_dw2[i] = at::empty({e.mk, c.Dv}, c.acc_opts);
      auto run = [&](auto bt) {
        bt.row_offset = lse.data_ptr<float>();
        bt.t2 = s.part_dw2[i].data_ptr<float>();
        bt.ldt2 = c.Dv;
        run_tile(bt);
      };
      if (s.bf16) {
        run(backward_tile_of<fused::bf16::PairTile>(qt, g, c.D, c.Dv, e.mk, s.mp, b1P[t.b][t.h], b2P[t.b][t.h],
                                                    c1P[t.b][t.h], dqt, s.part_dkl[i]));
      } else {
        run(backward_tile_of<fused::BackwardTile>(qt, g, c.D, c.Dv, e.mk, s.mp, k_lm_sT[t.b][t.h], zbvT[t.b][t.h],
                                                  k_lm_sP[t.b][t.h], dqt, s.part_dkl[i]));
      }
      s.part_dkl[i].mul_(c.o.scale);
      if (!direct) put_rows(s.dq[t.b][t.h], e.qidx, t.r0, dqt);
      return;
    }
    Tensor kl_s = s.k_lm_s[t.b][t.h].narrow(0, 0, e.mk);
    Tensor w2 = c.zbv[t.b][t.h].narrow(0, 0, e.mk);
    Tensor qt = rows(c.q[t.b][t.h], e.qidx, t.r0, t.r1, c.acc, 4);
    Tensor g = rows(c.grad_out[t.b][t.h], e.qidx, t.r0, t.r1, c.acc, 5);
    Tensor lse = rows(lse_bh, e.qidx, t.r0, t.r1, c.acc);
    Tensor F = scratch(0, qt.size(0), kl_s.size(0), c.acc_opts);
    exp_shifted(at::mm_out(F, qt, kl_s.t()), lse);
    Tensor dF = scratch(1, qt.size(0), kl_s.size(0), c.acc_opts);
    at::mm_out(dF, g, w2.t());
    Tensor prod = scratch(2, F.size(0), F.size(1), c.acc_opts);
    Tensor row = at::mul_out(prod, F, dF).sum(1, true);
    Tensor dX = dF.sub_(row).mul_(F);
    mm_put(s.dq[t.b][t.h], e.qidx, t.r0, dX, kl_s);
    s.part_dkl[i] = at::mm(dX.t(), qt).mul_(c.o.scale);
    s.part_dw2[i] = at::mm(F.t(), g);
  });
}

// Phase 2: per head, the m x m part. Reduce the query tiles' partials; back
// through zbv = Z_T·bv and every Newton–Schulz iteration (dbv, dA, dc); c =
// the largest column sum of A sends dc to that column; the softmax of A gives
// dq̃ and dk̃. Ends with each key's share of dk̃ (the landmark is a mean).
void landmark_pass(BackwardState& s) {
  const detail::BackwardCall& c = s.c;
  const int64_t B = c.B, H = c.H, ms = c.ms, T = c.o.pinv_iterations;
  const TileIndex qindex(s.qtiles, B, H);
  std::vector<Tensor> A(B * H), dA(B * H);
  std::vector<double> dc(B * H, 0.0), pinv_c(B * H, 0.0), colsum_max(B * H, 0.0);
  std::vector<int64_t> cmax_col(B * H, 0);
  s.dql.assign(B * H, Tensor());
  s.dkl.assign(B * H, Tensor());
  s.dbv.assign(B * H, Tensor());
  // Every head's A and dL/dzbv in zero-padded stacks (zero and c = 1 off the
  // Nyström path), for the batched Newton–Schulz derivative.
  Tensor A_all = at::zeros({B, H, ms, ms}, c.acc_opts);
  Tensor dw2_all = at::zeros({B, H, ms, c.Dv}, c.acc_opts);
  const double md = static_cast<double>(ms);
  const double tiles_per_head = std::ceil(double(c.L) / tile_rows(c.L, B * H));
  run_tasks(static_cast<int64_t>(s.heads.size()), md * md * c.D + tiles_per_head * md * (c.D + c.Dv), [&](int64_t i) {
    const int64_t bh = s.heads[i], b = bh / H, h = bh % H;
    const Element& e = s.el[b];
    const int64_t first = qindex.first[bh];
    Tensor dkl_h = s.part_dkl[first].clone();
    Tensor dw2 = dw2_all[b][h].narrow(0, 0, e.mk);
    dw2.copy_(s.part_dw2[first]);
    for (int64_t j = 1; j < qindex.count[bh]; ++j) {
      dkl_h.add_(s.part_dkl[first + j]);
      dw2.add_(s.part_dw2[first + j]);
    }
    Tensor ql = c.q_landmarks[b][h].narrow(0, 0, e.mq);
    A[bh] = A_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk);
    A[bh].copy_(softmax_rows(ql, s.k_lm_s[b][h].narrow(0, 0, e.mk)).first);
    pinv_c[bh] = c.pinv_scale[b][h].item<double>();
    std::tie(colsum_max[bh], cmax_col[bh]) = max_column_sum(A[bh]);
    s.dkl[bh] = dkl_h;
    s.dql[bh] = at::zeros({e.mq, c.D}, c.acc_opts);
  });
  s.part_dkl.clear();
  s.part_dw2.clear();
  if (s.fused) {
    // Back through zbv = Z_T·bv and every iteration, a head per task.
    const int64_t n = s.mp;
    s.dbv_all = at::zeros({B, H, ms, c.Dv}, c.acc_opts);
    Tensor dA_all = at::empty({B, H, ms, ms}, c.acc_opts);
    run_tasks(static_cast<int64_t>(s.heads.size()), 16.0 * T * n * n * n, [&](int64_t i) {
      const int64_t bh = s.heads[i], b = bh / H, h = bh % H;
      const Element& e = s.el[b];
      const Tensor Ap = padded_square(A_all[b][h], n, 0);
      Tensor Z = scratch(1, (T + 1) * n, n, c.acc_opts);
      Tensor work = scratch(2, 10 * n, n, c.acc_opts);
      fused::newton_schulz(Ap.data_ptr<float>(), static_cast<float>(pinv_c[bh]), T, n, Z.data_ptr<float>(),
                           /*keep_all=*/true, work.data_ptr<float>());
      const Tensor ZT = Z.narrow(0, T * n, n).narrow(0, 0, ms).narrow(1, 0, ms);
      Tensor dbv_h = s.dbv_all[b][h];
      at::mm_out(dbv_h, ZT.t(), dw2_all[b][h]);
      Tensor dZ = scratch(3, n, n, c.acc_opts);
      dZ.zero_();
      Tensor dZ_top = dZ.narrow(0, 0, ms).narrow(1, 0, ms);
      at::mm_out(dZ_top, dw2_all[b][h], c.bv[b][h].t());
      Tensor dAp = scratch(4, n, n, c.acc_opts);
      dc[bh] = fused::newton_schulz_backward(Ap.data_ptr<float>(), static_cast<float>(pinv_c[bh]), Z.data_ptr<float>(),
                                             T, n, dZ.data_ptr<float>(), dAp.data_ptr<float>(), work.data_ptr<float>());
      dA_all[b][h].copy_(dAp.narrow(0, 0, ms).narrow(1, 0, ms));
      s.dbv[bh] = s.dbv_all[b][h].narrow(0, 0, e.mq);
      dA[bh] = dA_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk);
    });
  } else {
    // Back through zbv = Z_T·bv and every iteration, all heads at once.
    const Tensor c_t = pinv_scales(pinv_c, s.heads, B, H, c.acc);
    const std::vector<Tensor> Z = detail::newton_schulz_iterates(A_all, c_t, T);
    s.dbv_all = at::matmul(Z.back().transpose(-1, -2), dw2_all);
    auto [dA_all, dc_all] = detail::newton_schulz_backward(A_all, c_t, Z, at::matmul(dw2_all, c.bv.transpose(-1, -2)));
    const Tensor dc_d = dc_all.to(at::kDouble).contiguous();
    const double* dcp = dc_d.data_ptr<double>();
    for (int64_t bh : s.heads) {
      const int64_t b = bh / H, h = bh % H;
      const Element& e = s.el[b];
      s.dbv[bh] = s.dbv_all[b][h].narrow(0, 0, e.mq);
      dA[bh] = dA_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk);
      dc[bh] = dcp[bh];
    }
  }
  // c = the largest column sum of A: its gradient reaches that column. With
  // pinv_init="original" one c serves every head: all heads' dc go to the
  // head (the first, on ties) whose A attains the maximum.
  if (c.o.original_init) {
    double total = 0.0, best = -1.0;
    int64_t arg = s.heads.front();
    for (int64_t bh : s.heads) {
      total += dc[bh];
      if (colsum_max[bh] > best) {
        best = colsum_max[bh];
        arg = bh;
      }
    }
    for (int64_t bh : s.heads) dc[bh] = bh == arg ? total : 0.0;
  }
  run_tasks(static_cast<int64_t>(s.heads.size()), 2 * md * md * c.D, [&](int64_t i) {
    const int64_t bh = s.heads[i], b = bh / H, h = bh % H;
    const Element& e = s.el[b];
    if (dc[bh] != 0.0) dA[bh].select(1, cmax_col[bh]).add_(dc[bh]);
    Tensor ql = c.q_landmarks[b][h].narrow(0, 0, e.mq);
    Tensor kl = c.k_landmarks[b][h].narrow(0, 0, e.mk);
    Tensor dS = A[bh] * (dA[bh] - (A[bh] * dA[bh]).sum(1, true));
    s.dql[bh].add_(at::mm(dS, kl).mul_(c.o.scale));
    s.dkl[bh].add_(at::mm(dS.t(), ql).mul_(c.o.scale));
    s.dkl[bh].mul_(inverse_segment_sizes(e.Sb, e.mk, c.acc));
  });
}

// Phase 3: key tiles. Bm = softmax(scale q̃ kᵀ) from its saved log-sum-exp;
// dk (direct part plus the share of dk̃ of the tile's segments), dv, and per
// tile dq̃ = scale dX k.
void key_pass(BackwardState& s) {
  const detail::BackwardCall& c = s.c;
  const int64_t B = c.B, H = c.H;
  s.ktiles = make_tiles(s.el, H, /*keys=*/true, /*exact_whole=*/false, ElementKind::kNystrom);
  s.part_dql.assign(s.ktiles.size(), Tensor());
  Tensor q_lm_sT, dbvT, q_lm_sP, dbvP, lse_lP, col_dotP;
  if (s.fused) {
    q_lm_sT = pack_heads(logit_landmarks(s, s.q_lm_s), c.D, s.mp, /*transpose=*/true);
    q_lm_sP = pack_heads(s.q_lm_s, s.mp, s.dp, /*transpose=*/false);
    dbvT = pack_heads(s.dbv_all, c.Dv, s.mp, /*transpose=*/true);
    dbvP = pack_heads(s.dbv_all, s.mp, s.dvp, /*transpose=*/false);
    lse_lP = pack_heads(c.lse_landmark.unsqueeze(3), s.mp, 1, /*transpose=*/false).view({B, H, s.mp});
    // On vdpbf16ps dbv enters v · dbvᵀ and P · dbv rounded to bfloat16; the
    // subtracted rowsum(dbv ∘ bv) takes the same rounded dbv, so that the
    // pass is the exact derivative for that dbv (a mismatch there would
    // cancel badly in v · dbvᵀ - rowsum).
    const Tensor dbv_used = s.bf16 ? s.dbv_all.to(at::kBFloat16).to(at::kFloat) : s.dbv_all;
    col_dotP = pack_heads((dbv_used * c.bv).sum(-1, /*keepdim=*/true), s.mp, 1, /*transpose=*/false)
                   .view({B, H, s.mp});
  }
  const Tensor b1P = s.bf16 ? pair_heads(q_lm_sT) : Tensor();
  const Tensor b2P = s.bf16 ? pair_heads(dbvT) : Tensor();
  const Tensor c1P = s.bf16 ? pair_heads(q_lm_sP) : Tensor();
  const double md = static_cast<double>(c.ms), tS = tile_rows(c.S, B * H);
  run_tasks(static_cast<int64_t>(s.ktiles.size()), tS * md * (2 * c.D + 3 * c.Dv), [&](int64_t i) {
    const Tile& t = s.ktiles[i];
    const int64_t bh = t.b * H + t.h;
    const Element& e = s.el[t.b];
    const Tensor dk_bh = s.dk[t.b][t.h], dv_bh = s.dv[t.b][t.h];
    if (s.fused) {
      const Tensor kt = s.bf16 ? half_rows(c.k[t.b][t.h], e.kidx, t.r0, t.r1, 4, c.D)
                               : unit_rows(c.k[t.b][t.h], e.kidx, t.r0, t.r1, 4, s.dp);
      const Tensor vt = s.bf16 ? half_rows(c.v[t.b][t.h], e.kidx, t.r0, t.r1, 5, c.Dv)
                               : unit_rows(c.v[t.b][t.h], e.kidx, t.r0, t.r1, 5, s.dvp);
      const int64_t n = kt.size(0);
      // half-precision dk and dv: the tile in float32 scratch, rounded once
      const bool direct = !e.kidx.defined() && dk_bh.scalar_type() == at::kFloat;
      Tensor dkt = direct ? dk_bh.narrow(0, t.r0, n) : scratch(2, n, c.D, c.acc_opts);
      Tensor dvt = direct ? dv_bh.narrow(0, t.r0, n) : scratch(3, n, c.Dv, c.acc_opts);
      s.part_dql[i] = at::empty({e.mq, c.D}, c.acc_opts);
      auto run = [&](auto bt) {
        bt.col_offset = lse_lP[t.b][t.h].data_ptr<float>();
        bt.col_dot = col_dotP[t.b][t.h].data_ptr<float>();
        bt.c2 = dbvP[t.b][t.h].data_ptr<float>();
        bt.ldc2 = s.dvp;
        bt.out2 = dvt.data_ptr<float>();
        bt.ldo2 = dvt.stride(0);
        run_tile(bt);
      };
      if (s.bf16) {
        run(backward_tile_of<fused::bf16::PairTile>(kt, vt, c.D, c.Dv, e.mq, s.mp, b1P[t.b][t.h], b2P[t.b][t.h],
                                                    c1P[t.b][t.h], dkt, s.part_dql[i]));
      } else {
        run(backward_tile_of<fused::BackwardTile>(kt, vt, c.D, c.Dv, e.mq, s.mp, q_lm_sT[t.b][t.h], dbvT[t.b][t.h],
                                                  q_lm_sP[t.b][t.h], dkt, s.part_dql[i]));
      }
      s.part_dql[i].mul_(c.o.scale);
      if (direct) {
        add_segment_rows(dk_bh, e.kidx, t.r0, t.r1, e.Sb, e.mk, s.dkl[bh]);
      } else {
        add_segment_rows(dkt, Tensor(), t.r0, t.r1, e.Sb, e.mk, s.dkl[bh], /*base=*/t.r0);
        store_tile(dk_bh, e.kidx, t.r0, dkt);
        store_tile(dv_bh, e.kidx, t.r0, dvt);
      }
      return;
    }
    Tensor ql_s = s.q_lm_s[t.b][t.h].narrow(0, 0, e.mq);
    Tensor bvh = c.bv[t.b][t.h].narrow(0, 0, e.mq);
    Tensor lse = c.lse_landmark[t.b][t.h].narrow(0, 0, e.mq).unsqueeze(1);
    Tensor kt = rows(c.k[t.b][t.h], e.kidx, t.r0, t.r1, c.acc, 4);
    Tensor vt = rows(c.v[t.b][t.h], e.kidx, t.r0, t.r1, c.acc, 5);
    Tensor Bm = scratch(0, e.mq, kt.size(0), c.acc_opts);
    exp_shifted(at::mm_out(Bm, ql_s, kt.t()), lse);
    Tensor dBm = scratch(1, e.mq, kt.size(0), c.acc_opts);
    at::mm_out(dBm, s.dbv[bh], vt.t());
    Tensor dX = dBm.sub_((s.dbv[bh] * bvh).sum(1, true)).mul_(Bm);
    mm_put(dk_bh, e.kidx, t.r0, dX.t(), ql_s);
    add_segment_rows(dk_bh, e.kidx, t.r0, t.r1, e.Sb, e.mk, s.dkl[bh]);
    mm_put(dv_bh, e.kidx, t.r0, Bm.t(), s.dbv[bh]);
    s.part_dql[i] = at::mm(dX, kt).mul_(c.o.scale);
  });
}

// Phase 4: reduce the key tiles' dq̃ per head, then add each query's share
// of it (the landmarks are segment means).
void spread_query_landmarks(BackwardState& s) {
  const detail::BackwardCall& c = s.c;
  const TileIndex kindex(s.ktiles, c.B, c.H);
  const double md = static_cast<double>(c.ms);
  const double tiles_per_head = std::ceil(double(c.S) / tile_rows(c.S, c.B * c.H));
  run_tasks(static_cast<int64_t>(s.heads.size()), tiles_per_head * md * c.D, [&](int64_t i) {
    const int64_t bh = s.heads[i];
    const Element& e = s.el[bh / c.H];
    for (int64_t j = 0; j < kindex.count[bh]; ++j) s.dql[bh].add_(s.part_dql[kindex.first[bh] + j]);
    s.dql[bh].mul_(inverse_segment_sizes(e.Lb, e.mq, c.acc));
  });
  run_tasks(static_cast<int64_t>(s.qtiles.size()), tile_rows(c.L, c.B * c.H) * double(c.D), [&](int64_t i) {
    const Tile& t = s.qtiles[i];
    const Element& e = s.el[t.b];
    const Tensor& share = s.dql[t.b * c.H + t.h];
    if (s.dq_out.defined()) {
      // dq + its share, rounded to the input dtype as it is written
      fused::add_shares_store(rows_of(s.dq[t.b][t.h], e.qidx), rows_of(s.dq_out[t.b][t.h], e.qidx), t.r0, t.r1, e.Lb,
                              e.mq, share.contiguous().data_ptr<float>(), c.D);
    } else {
      add_segment_rows(s.dq[t.b][t.h], e.qidx, t.r0, t.r1, e.Lb, e.mq, share);
    }
  });
  if (!s.dq_out.defined()) return;
  // the heads off the Nyström path (exact elements, elements without
  // queries or keys) keep their float32 rows: converted as they are
  std::vector<char> nystrom_head(c.B * c.H, 0);
  for (int64_t bh : s.heads) nystrom_head[bh] = 1;
  for (int64_t bh = 0; bh < c.B * c.H; ++bh)
    if (!nystrom_head[bh]) s.dq_out[bh / c.H][bh % c.H].copy_(s.dq[bh / c.H][bh % c.H]);
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_out, const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& q_landmarks,
    const Tensor& k_landmarks, const Tensor& bv, const Tensor& zbv, const Tensor& lse_query,
    const Tensor& lse_landmark, const Tensor& pinv_scale, int64_t num_landmarks, int64_t pinv_iterations,
    c10::string_view pinv_init, const std::optional<Tensor>& key_padding_mask,
    const std::optional<Tensor>& query_padding_mask, std::optional<double> scale) {
  constexpr const char* op = "nystrom_attention_backward";
  const detail::BackwardCall c = detail::backward_prologue(
      op, grad_out, query, key, value, q_landmarks, k_landmarks, bv, zbv, lse_query, lse_landmark, pinv_scale,
      num_landmarks, pinv_iterations, pinv_init, key_padding_mask, query_padding_mask, scale);
  // Every real row is written, so only the rows of padded tokens need zeros.
  // With the fused kernels, dk and dv are written in the input dtype, each
  // tile rounded once from float32; dq (two parts from two passes) stays in
  // float32 and is rounded at the end.
  const bool fused = use_fused(c.acc, c.ms);
  auto alloc = [&](bool zero, std::initializer_list<int64_t> shape, bool input_dtype) {
    const at::TensorOptions opts = input_dtype ? c.q.options() : c.acc_opts;
    return zero ? at::zeros(shape, opts) : at::empty(shape, opts);
  };
  const bool any_mask = c.has_query_mask || c.has_key_mask;
  Tensor dq = alloc(c.has_query_mask, {c.B, c.H, c.L, c.D}, false);
  Tensor dk = alloc(any_mask, {c.B, c.H, c.S, c.D}, fused);
  Tensor dv = alloc(any_mask, {c.B, c.H, c.S, c.Dv}, fused);
  auto finish = [&]() {
    const at::ScalarType t = c.q.scalar_type();
    return std::make_tuple(converted(dq, t), converted(dk, t), converted(dv, t));
  };
  // With the fused kernels and half-precision inputs, phase 4 writes dq in
  // the input dtype as it adds the landmark shares (one pass over dq's
  // float32 rows instead of two, and no float32 -> half conversion after).
  const bool dq_rounded_by_phase4 = fused && c.q.scalar_type() != c.acc;
  if (c.B == 0 || c.L == 0) {  // no query: nothing reaches the keys
    dk.zero_();
    dv.zero_();
    return finish();
  }
  const std::vector<Element> el =
      describe_batch(op, c.B, c.L, c.S, c.o.num_landmarks, key_padding_mask, query_padding_mask);
  BackwardState s(c, el, dq, dk, dv);
  exact_elements(s);
  s.heads = heads_of(el, c.H, ElementKind::kNystrom);
  if (s.heads.empty()) return finish();
  s.q_lm_s = c.q_landmarks * c.o.scale;
  s.k_lm_s = c.k_landmarks * c.o.scale;
  s.fused = fused;
  s.bf16 = fused && c.q.scalar_type() == at::kBFloat16 && bf16_products();
  s.mp = round_up(c.ms, fused::kPadColumns);
  s.dp = round_up(c.D, fused::kPadColumns);
  s.dvp = round_up(c.Dv, fused::kPadColumns);
  if (dq_rounded_by_phase4) s.dq_out = alloc(c.has_query_mask, {c.B, c.H, c.L, c.D}, true);
  query_pass(s);
  landmark_pass(s);
  key_pass(s);
  spread_query_landmarks(s);
  if (s.dq_out.defined()) {
    const at::ScalarType t = c.q.scalar_type();
    return std::make_tuple(s.dq_out, converted(dk, t), converted(dv, t));
  }
  return finish();
}

}  // namespace
}  // namespace nystrom::cpu

TORCH_LIBRARY_IMPL(nystrom, CPU, m) { m.impl("nystrom_attention_backward", &nystrom::cpu::backward_cpu); }
