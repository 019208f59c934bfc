// CPU kernels of the Nyström attention forward and backward ops.
//
// Work is split into tasks over (batch, head, row tile) and run with
// at::parallel_for. Every task works on a tile of at most 2048 rows, so no
// (n x n) matrix, and no (n x m) matrix for a whole head, is ever
// materialised: the long products F·W and Bm·V are computed a tile at a
// time, with the row statistics (log-sum-exp) kept for the backward pass.
// The small per-head matrices (landmarks, A, the Newton–Schulz iterates)
// live in per-head buffers. All arithmetic runs in float32 (float64 for
// float64 inputs); half-precision inputs are converted a tile at a time.
//
// The partition into tiles depends only on the problem size, never on the
// number of threads, and every reduction is done in a fixed order, so repeated
// calls with the same inputs and the same thread count are bitwise equal.
// (Across thread counts results may differ in the last bits: the BLAS splits a
// product differently when it may use several threads.)
#include "newton_schulz.h"
#include "nystrom_common.h"
#include "cpu/simd_attend.h"
#include "cpu/simd_softmax.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <tuple>
#include <cmath>
#include <vector>

namespace nystrom {
namespace cpu {
namespace {

using at::Tensor;

// Rows per tile of the long (sequence-length) dimension, for a sequence of n
// real tokens in a call with `heads` (batch x heads) sequences: the largest
// power of two from 128 to 2048 that still cuts the call into at least
// kMinTasks tiles. Large tiles keep the BLAS efficient (2048 rows of 64 floats
// fit in L2); enough tiles keep every thread busy. Depends on the problem size
// only, never on the thread count.
constexpr int64_t kMinTasks = 32;
int64_t tile_rows(int64_t n, int64_t heads) {
  int64_t t = 2048;
  while (t > 128 && heads * ((n + t - 1) / t) < kMinTasks) t /= 2;
  return t;
}

enum class Kind { kEmpty, kExact, kNystrom };

// What one batch element looks like after padding is removed.
struct Element {
  int64_t Lb = 0;  // real queries
  int64_t Sb = 0;  // real keys
  int64_t mq = 0;  // query landmarks
  int64_t mk = 0;  // key landmarks
  Kind kind = Kind::kEmpty;
  Tensor qidx;  // positions of the real queries; undefined = all of 0..L-1
  Tensor kidx;  // positions of the real keys; undefined = all of 0..S-1
};

// Index of the real (false) positions of one mask row, or undefined when
// nothing is masked.
Tensor real_positions(const Tensor& mask_row, int64_t* count) {
  Tensor idx = at::nonzero(mask_row.logical_not()).view({-1});
  *count = idx.numel();
  if (*count == mask_row.numel()) {
    return Tensor();
  }
  return idx;
}

std::vector<Element> describe_batch(const char* op, int64_t B, int64_t L, int64_t S, int64_t m,
                                    const std::optional<Tensor>& kpm, const std::optional<Tensor>& qpm) {
  std::vector<Element> el(B);
  const bool has_k = kpm.has_value() && kpm->defined();
  const bool has_q = qpm.has_value() && qpm->defined();
  Tensor kmask = has_k ? kpm->to(at::kCPU) : Tensor();
  Tensor qmask = has_q ? qpm->to(at::kCPU) : Tensor();
  for (int64_t b = 0; b < B; ++b) {
    Element& e = el[b];
    e.Lb = L;
    e.Sb = S;
    if (has_q) e.qidx = real_positions(qmask[b], &e.Lb);
    if (has_k) e.kidx = real_positions(kmask[b], &e.Sb);
    if (e.Lb == 0) {
      e.kind = Kind::kEmpty;
      continue;
    }
    TORCH_CHECK(e.Sb > 0, op, ": key_padding_mask masks every key of batch element ", b,
                "; each batch element with real queries needs at least one real key");
    if (e.Lb <= m && e.Sb <= m) {
      e.kind = Kind::kExact;
    } else {
      e.kind = Kind::kNystrom;
      e.mq = std::min(m, e.Lb);
      e.mk = std::min(m, e.Sb);
    }
  }
  return el;
}


// Scratch matrices of the tasks of one parallel chunk. A tile's temporaries
// (logits, probabilities: up to 2048 x m floats) come from here instead of
// fresh allocations: a fresh buffer of that size is mapped and faulted in
// page by page each time, which cost more than the arithmetic on it. Buffers
// live for one chunk of one call (run_tasks), never beyond the call.
class Workspace {
 public:
  // A (rows x cols) matrix in slot `slot`; contents undefined.
  Tensor get(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    Tensor& b = buf_[slot];
    if (!b.defined() || b.numel() < rows * cols || b.scalar_type() != opts.dtype().toScalarType()) {
      b = at::empty({rows * cols}, opts);
    }
    return b.narrow(0, 0, rows * cols).view({rows, cols});
  }

 private:
  std::array<Tensor, 8> buf_;
};

thread_local Workspace* tls_workspace = nullptr;

// Slot `slot` of the running task's workspace (a fresh tensor outside run_tasks).
Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return tls_workspace ? tls_workspace->get(slot, rows, cols, opts) : at::empty({rows, cols}, opts);
}

// Rows [r0, r1) of the real tokens of x_bh (n x d), in the compute dtype: a
// view when nothing must be gathered (padding) or converted (float16 /
// bfloat16 inputs); else a copy, into scratch slot `slot` when one is given
// (tiles inside run_tasks), or a fresh tensor.
Tensor rows(const Tensor& x_bh, const Tensor& idx, int64_t r0, int64_t r1, at::ScalarType acc, int slot = -1) {
  if (!idx.defined() && x_bh.scalar_type() == acc) return x_bh.narrow(0, r0, r1 - r0);
  const auto opts = x_bh.options().dtype(acc);
  Tensor out = slot >= 0 ? scratch(slot, r1 - r0, x_bh.size(1), opts) : at::empty({r1 - r0, x_bh.size(1)}, opts);
  if (!idx.defined()) {
    out.copy_(x_bh.narrow(0, r0, r1 - r0));
  } else if (x_bh.scalar_type() == acc) {
    at::index_select_out(out, x_bh, 0, idx.narrow(0, r0, r1 - r0));
  } else {
    out.copy_(x_bh.index_select(0, idx.narrow(0, r0, r1 - r0)));
  }
  return out;
}

// dst_bh[real rows r0..r1) = src
void put_rows(const Tensor& dst_bh, const Tensor& idx, int64_t r0, const Tensor& src) {
  if (idx.defined()) {
    dst_bh.index_copy_(0, idx.narrow(0, r0, src.size(0)), src.to(dst_bh.scalar_type()));
  } else {
    dst_bh.narrow(0, r0, src.size(0)).copy_(src);
  }
}

// dst_bh[real rows r0.., as many as a has) = a·b: straight into dst when its
// rows are contiguous in the compute dtype, saving a copy.
void mm_put(const Tensor& dst_bh, const Tensor& idx, int64_t r0, const Tensor& a, const Tensor& b) {
  if (!idx.defined() && dst_bh.scalar_type() == a.scalar_type() && dst_bh.stride(-1) == 1) {
    Tensor slice = dst_bh.narrow(0, r0, a.size(0));
    at::mm_out(slice, a, b);
    return;
  }
  put_rows(dst_bh, idx, r0, at::mm(a, b));
}

// Segment (landmark) index of each of the rows r0..r1 of a sequence of n real
// tokens cut into ms segments: segment j is [floor(j n/ms), floor((j+1) n/ms)),
// so row r lies in segment floor(((r+1) ms - 1) / n).
Tensor segment_ids(int64_t r0, int64_t r1, int64_t n, int64_t ms) {
  Tensor r = at::arange(r0 + 1, r1 + 1, at::kLong);
  return (r * ms - 1).div(n, "floor");
}

// 1 / (size of each of the ms segments of n tokens), shape (ms, 1).
Tensor inverse_segment_sizes(int64_t n, int64_t ms, at::ScalarType acc) {
  Tensor j = at::arange(ms + 1, at::kLong);
  Tensor bounds = (j * n).div(ms, "floor");
  Tensor sizes = bounds.narrow(0, 1, ms) - bounds.narrow(0, 0, ms);
  return sizes.to(acc).reciprocal().unsqueeze(1);
}

// Segment means (landmarks) of the real rows of x_bh: (ms x d).
Tensor landmarks(const Tensor& x_bh, const Tensor& idx, int64_t n, int64_t ms, at::ScalarType acc) {
  if (!idx.defined() && n % ms == 0 && x_bh.scalar_type() == acc) {
    // Equal segments of contiguous rows in the compute dtype (the common
    // case): one reduction, no temporary beyond the result.
    return x_bh.narrow(0, 0, n).reshape({ms, n / ms, x_bh.size(1)}).mean(1);
  }
  Tensor sums = at::zeros({ms, x_bh.size(1)}, x_bh.options().dtype(acc));
  const int64_t tile = 2048;  // chunks bound the temporary memory only
  for (int64_t r0 = 0; r0 < n; r0 += tile) {
    const int64_t r1 = std::min(n, r0 + tile);
    sums.index_add_(0, segment_ids(r0, r1, n, ms), rows(x_bh, idx, r0, r1, acc));
  }
  return sums.mul_(inverse_segment_sizes(n, ms, acc));
}

// c of every head as a (B, H, 1, 1) stack for the batched Newton–Schulz
// steps: the heads' own c on the Nyström path, 1 elsewhere (A = 0 there).
Tensor pinv_scales(const std::vector<double>& c, const std::vector<int64_t>& heads, int64_t B, int64_t H,
                   at::ScalarType acc) {
  std::vector<double> all(B * H, 1.0);
  for (int64_t bh : heads) all[bh] = c[bh];
  return at::tensor(all, at::TensorOptions().dtype(at::kDouble)).to(acc).view({B, H, 1, 1});
}

// Largest column sum of A and the first column that attains it.
std::pair<double, int64_t> max_column_sum(const Tensor& A) {
  Tensor col = A.sum(0);
  const int64_t j = col.argmax().item<int64_t>();
  return {col[j].item<double>(), j};
}

// dst_bh[real rows r0..r1) += src[segment of the row] for a sequence of n real
// tokens in ms segments (src: ms x d, contiguous, same dtype as dst). A plain
// loop: gathering the rows first (index_select) took longer than the add.
void add_segment_rows(const Tensor& dst_bh, const Tensor& idx, int64_t r0, int64_t r1, int64_t n, int64_t ms,
                      const Tensor& src) {
  const Tensor s = src.contiguous();
  const int64_t d = dst_bh.size(1), rs = dst_bh.stride(0), cs = dst_bh.stride(1);
  const int64_t* ip = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(dst_bh.scalar_type(), "add_segment_rows", [&] {
    scalar_t* out = dst_bh.data_ptr<scalar_t>();
    const scalar_t* in = s.data_ptr<scalar_t>();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t seg = ((r + 1) * ms - 1) / n;
      scalar_t* o = out + (ip ? ip[r] : r) * rs;
      const scalar_t* a = in + seg * d;
      if (cs == 1) {
        for (int64_t c = 0; c < d; ++c) o[c] += a[c];
      } else {
        for (int64_t c = 0; c < d; ++c) o[c * cs] += a[c];
      }
    }
  });
}

// The vectorised exponentials apply to float32 matrices with contiguous rows
// on CPUs with AVX2/FMA. NYSTROM_CPU_SIMD=0 in the environment forces the ATen
// path (what other CPUs run), so that tests can check it on this one.
bool use_simd(const Tensor& x) {
  static const bool enabled = [] {
    const char* env = std::getenv("NYSTROM_CPU_SIMD");
    return simd::available() && (env == nullptr || std::string(env) != "0");
  }();
  return enabled && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1;
}

// Softmax of scale·x·yᵀ for a tile of rows of x; y is pre-scaled by the
// caller. Returns the probabilities and the log-sum-exp of each row.
// In place, row by row: x <- exp(x - max), then divided by the row sum when
// normalize. Returns the row maxima and sums (before normalising), (rows x 1).
std::pair<Tensor, Tensor> exp_rows(const Tensor& x, bool normalize) {
  if (use_simd(x)) {
    Tensor mx = at::empty({x.size(0), 1}, x.options()), sum = at::empty({x.size(0), 1}, x.options());
    simd::softmax_rows(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), mx.data_ptr<float>(),
                       sum.data_ptr<float>(), normalize);
    return {mx, sum};
  }
  Tensor mx = x.amax(1, /*keepdim=*/true);
  x.sub_(mx).exp_();
  Tensor sum = x.sum(1, /*keepdim=*/true);
  if (normalize) x.div_(sum);
  return {mx, sum};
}

std::pair<Tensor, Tensor> softmax_rows(const Tensor& x, const Tensor& y_scaled) {
  Tensor logits = scratch(0, x.size(0), y_scaled.size(0), x.options());
  at::mm_out(logits, x, y_scaled.t());
  auto [mx, sum] = exp_rows(logits, /*normalize=*/true);
  return {logits, sum.log_().add_(mx).squeeze(1)};
}

// x (rows x cols) <- exp(x - offset), offset (rows x 1): the recomputed
// probabilities of the backward, from saved log-sum-exps.
void exp_shifted(const Tensor& x, const Tensor& offset) {
  if (use_simd(x)) {
    const Tensor off = offset.contiguous();
    simd::exp_shifted_rows(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), off.data_ptr<float>());
    return;
  }
  x.sub_(offset).exp_();
}

// The fused float32 tile kernels (simd_attend.h) serve a call when this CPU
// has them and the landmarks fit their buffers.
bool use_fused(at::ScalarType acc, int64_t ms) {
  return acc == at::kFloat && simd::fused_width() > 0 && ms <= simd::kMaxLandmarksFused;
}

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

// x (B, H, r, c) -> (B, H, c, cp) with x's transpose in the first r columns
// and zeros elsewhere (transpose) or (B, H, rp, cp) with x in the top-left
// corner: the packed per-head operands of the fused kernels.
Tensor pack_heads(const Tensor& x, int64_t rp, int64_t cp, bool transpose) {
  const Tensor src = transpose ? x.transpose(-1, -2) : x;
  Tensor out = at::zeros({x.size(0), x.size(1), rp, cp}, x.options());
  out.narrow(2, 0, src.size(2)).narrow(3, 0, src.size(3)).copy_(src);
  return out;
}

// x (r x c, r, c <= n) zero-padded to n x n, in scratch slot `slot`.
Tensor padded_square(const Tensor& x, int64_t n, int slot) {
  Tensor out = scratch(slot, n, n, x.options());
  out.zero_();
  out.narrow(0, 0, x.size(0)).narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

// rows(...) (gathered or converted into scratch slot `slot` if need be) with
// unit column stride and at least `ld` floats per row readable: else copied,
// zero-padded, into slot `pad_slot`.
Tensor unit_rows(const Tensor& x_bh, const Tensor& idx, int64_t r0, int64_t r1, int slot, int pad_slot, int64_t ld) {
  Tensor t = rows(x_bh, idx, r0, r1, at::kFloat, slot);
  if (t.stride(1) == 1 && t.size(1) >= ld) return t;
  Tensor padded = scratch(pad_slot, r1 - r0, ld, x_bh.options().dtype(at::kFloat));
  padded.narrow(1, t.size(1), ld - t.size(1)).zero_();
  padded.narrow(1, 0, t.size(1)).copy_(t);
  return padded;
}

// What both backward passes give backward_tile: the tile's x rows (q or k, D
// wide) and y rows (dO or v, Dv wide), m of mp landmark columns, one head's
// packed b1, b2 and c1, the rows of out1, the P and X buffers (scratch slots
// 0 and 1) and t1. Each pass adds its own offsets and outputs.
simd::BackwardTile backward_tile_of(const Tensor& x, const Tensor& y, int64_t D, int64_t Dv, int64_t m, int64_t mp,
                                    const Tensor& b1, const Tensor& b2, const Tensor& c1, const Tensor& out1,
                                    const Tensor& t1) {
  simd::BackwardTile bt;
  bt.x = x.data_ptr<float>();
  bt.ldx = x.stride(0);
  bt.y = y.data_ptr<float>();
  bt.ldy = y.stride(0);
  bt.rows = x.size(0);
  bt.D = D;
  bt.Dv = Dv;
  bt.m = m;
  bt.mp = mp;
  bt.b1 = b1.data_ptr<float>();
  bt.b2 = b2.data_ptr<float>();
  bt.c1 = c1.data_ptr<float>();
  bt.ldc1 = c1.stride(0);
  bt.out1 = out1.data_ptr<float>();
  bt.ldo1 = out1.stride(0);
  bt.pbuf = scratch(0, x.size(0), mp, x.options()).data_ptr<float>();
  bt.xbuf = scratch(1, x.size(0), mp, x.options()).data_ptr<float>();
  bt.t1 = t1.data_ptr<float>();
  bt.ldt1 = t1.stride(0);
  return bt;
}

// Every worker runs outside the autograd layer and records nothing.
struct TaskGuard {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

// Below this much work (multiply-adds) a chunk of tasks is not worth a
// thread: tiny calls stay on the calling thread instead of waking a team,
// which costs far more than the work when the cores are busy elsewhere.
constexpr int64_t kMinWorkPerThread = 1 << 18;

// Runs f(0) .. f(n-1), in parallel where the work allows; cost is the
// approximate number of multiply-adds of one task.
template <typename F>
void run_tasks(int64_t n, double cost, const F& f) {
  const double per_chunk = std::ceil(static_cast<double>(kMinWorkPerThread) / std::max(1.0, cost));
  const int64_t grain = static_cast<int64_t>(std::min<double>(per_chunk, static_cast<double>(std::max<int64_t>(n, 1))));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    TaskGuard guard;
    Workspace ws;
    Workspace* const outer = tls_workspace;
    tls_workspace = &ws;
    for (int64_t i = begin; i < end; ++i) f(i);
    tls_workspace = outer;
  });
}

struct Tile {
  int64_t b, h, r0, r1;
};

// Tiles of the real query rows (which = 0) or real key rows (which = 1) of
// every (b, h) of the given kinds.
std::vector<Tile> make_tiles(const std::vector<Element>& el, int64_t H, bool keys, bool exact_whole) {
  std::vector<Tile> tiles;
  for (int64_t b = 0; b < static_cast<int64_t>(el.size()); ++b) {
    const Element& e = el[b];
    if (e.kind == Kind::kEmpty) continue;
    const int64_t n = keys ? e.Sb : e.Lb;
    const int64_t step = (exact_whole && e.kind == Kind::kExact) ? n : tile_rows(n, static_cast<int64_t>(el.size()) * H);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t r0 = 0; r0 < n; r0 += step) tiles.push_back({b, h, r0, std::min(n, r0 + step)});
    }
  }
  return tiles;
}

// ---------------------------------------------------------------------------
// Forward

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_cpu(
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
  // Plain views without autograd history: the workers run ATen ops on them.
  const Tensor q = query_in.detach(), k = key_in.detach(), v = value_in.detach();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t S = k.size(2), Dv = v.size(3), m = o.num_landmarks;
  const int64_t ms = detail::saved_landmarks(m, L, S).expect_int();
  // Work estimates (multiply-adds per task), in double: they only size the parallel grain.
  const double md = static_cast<double>(ms), Ld = L, Sd = S, Dd = D, Dvd = Dv;
  const double tL = tile_rows(L, B * H), tS = tile_rows(S, B * H);
  const at::ScalarType acc = detail::accumulate_type(q.scalar_type());
  const auto acc_opts = q.options().dtype(acc);

  // Every real query row is written; only padded rows need zeros.
  const bool has_qmask = query_padding_mask.has_value() && query_padding_mask->defined();
  Tensor out = has_qmask ? at::zeros({B, H, L, Dv}, q.options()) : at::empty({B, H, L, Dv}, q.options());
  Tensor q_lm = at::zeros({B, H, ms, D}, acc_opts);
  Tensor k_lm = at::zeros({B, H, ms, D}, acc_opts);
  Tensor bv = at::zeros({B, H, ms, Dv}, acc_opts);
  Tensor zbv = at::zeros({B, H, ms, Dv}, acc_opts);
  Tensor lse_q = at::zeros({B, H, L}, acc_opts);
  Tensor lse_l = at::zeros({B, H, ms}, acc_opts);
  Tensor c_out = at::zeros({B, H}, acc_opts);
  if (B == 0 || L == 0) {
    return {out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c_out};
  }
  const std::vector<Element> el = describe_batch(op, B, L, S, m, key_padding_mask, query_padding_mask);
  const double scale = o.scale;

  // Phase 1, per (b, h) on the Nyström path: landmarks, A and its column-sum scale c.
  std::vector<int64_t> heads;  // b * H + h
  for (int64_t b = 0; b < B; ++b)
    if (el[b].kind == Kind::kNystrom)
      for (int64_t h = 0; h < H; ++h) heads.push_back(b * H + h);
  // A of every head in one zero-padded stack (zero for heads off the Nyström path).
  Tensor A_all = at::zeros({B, H, ms, ms}, acc_opts);
  std::vector<double> c(B * H, 0.0);
  run_tasks(static_cast<int64_t>(heads.size()), (Ld + Sd) * Dd + md * md * Dd, [&](int64_t i) {
    const int64_t bh = heads[i], b = bh / H, h = bh % H;
    const Element& e = el[b];
    Tensor ql = landmarks(q[b][h], e.qidx, e.Lb, e.mq, acc);
    Tensor kl = landmarks(k[b][h], e.kidx, e.Sb, e.mk, acc);
    q_lm[b][h].narrow(0, 0, e.mq).copy_(ql);
    k_lm[b][h].narrow(0, 0, e.mk).copy_(kl);
    Tensor Ah = softmax_rows(ql, kl * scale).first;
    c[bh] = max_column_sum(Ah).first;
    A_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk).copy_(Ah);
  });
  if (o.original_init && !heads.empty()) {
    double cmax = 0.0;
    for (int64_t bh : heads) cmax = std::max(cmax, c[bh]);
    for (int64_t bh : heads) c[bh] = cmax;
  }
  for (int64_t bh : heads) c_out[bh / H][bh % H].fill_(c[bh]);
  // The landmarks with the softmax scale folded in, once for every tile.
  const Tensor q_lm_s = q_lm * scale, k_lm_s = k_lm * scale;

  // Phase 2, tiles of keys: Bm·V = softmax(scale q̃ kᵀ) v with an online
  // softmax; each tile keeps its row maxima, row sums and unnormalised product.
  const std::vector<Tile> ktiles = make_tiles(el, H, /*keys=*/true, /*exact_whole=*/false);
  std::vector<int64_t> ktile_of;  // the Nyström key tiles
  for (int64_t i = 0; i < static_cast<int64_t>(ktiles.size()); ++i)
    if (el[ktiles[i].b].kind == Kind::kNystrom) ktile_of.push_back(i);
  std::vector<Tensor> part_max(ktiles.size()), part_sum(ktiles.size()), part_pv(ktiles.size());
  const bool fused = use_fused(acc, ms);
  const int64_t mp = round_up(ms, simd::kPadColumns), dvp = round_up(Dv, simd::kPadColumns);
  const Tensor qT_pack = fused ? pack_heads(q_lm_s, D, mp, /*transpose=*/true) : Tensor();
  run_tasks(static_cast<int64_t>(ktile_of.size()), tS * md * (Dd + Dvd), [&](int64_t i) {
    const Tile& t = ktiles[ktile_of[i]];
    const Element& e = el[t.b];
    if (fused) {
      const Tensor kt = unit_rows(k[t.b][t.h], e.kidx, t.r0, t.r1, 4, 6, D);
      const Tensor vt = unit_rows(v[t.b][t.h], e.kidx, t.r0, t.r1, 5, 7, dvp);
      const Tensor work = scratch(0, kt.size(0), mp, acc_opts);
      Tensor stats = at::empty({2, mp}, acc_opts);
      Tensor pv = at::empty({e.mq, Dv}, acc_opts);
      simd::key_tile(kt.data_ptr<float>(), kt.stride(0), vt.data_ptr<float>(), vt.stride(0), kt.size(0), D, Dv,
                     qT_pack[t.b][t.h].data_ptr<float>(), e.mq, mp, work.data_ptr<float>(),
                     stats[0].data_ptr<float>(), stats[1].data_ptr<float>(), pv.data_ptr<float>(), Dv);
      part_max[ktile_of[i]] = stats[0].narrow(0, 0, e.mq).unsqueeze(1);
      part_sum[ktile_of[i]] = stats[1].narrow(0, 0, e.mq).unsqueeze(1);
      part_pv[ktile_of[i]] = pv;
      return;
    }
    Tensor ql = q_lm_s[t.b][t.h].narrow(0, 0, e.mq);
    Tensor kt = rows(k[t.b][t.h], e.kidx, t.r0, t.r1, acc, 4);
    Tensor vt = rows(v[t.b][t.h], e.kidx, t.r0, t.r1, acc, 5);
    Tensor logits = scratch(0, ql.size(0), kt.size(0), acc_opts);
    at::mm_out(logits, ql, kt.t());
    std::tie(part_max[ktile_of[i]], part_sum[ktile_of[i]]) = exp_rows(logits, /*normalize=*/false);
    part_pv[ktile_of[i]] = at::mm(logits, vt);
  });

  // Phase 3, per head: merge the key tiles into bv; then, for all heads at
  // once, Z = pinv(A) and zbv = Z·bv.
  std::vector<int64_t> first_ktile(B * H, -1);
  for (int64_t idx : ktile_of) {
    const int64_t bh = ktiles[idx].b * H + ktiles[idx].h;
    if (first_ktile[bh] < 0) first_ktile[bh] = idx;
  }
  run_tasks(static_cast<int64_t>(heads.size()), std::ceil(Sd / tS) * md * Dvd, [&](int64_t i) {
    const int64_t bh = heads[i], b = bh / H, h = bh % H;
    const Element& e = el[b];
    const int64_t n_tiles = (e.Sb + tile_rows(e.Sb, B * H) - 1) / tile_rows(e.Sb, B * H);
    const int64_t first = first_ktile[bh];
    Tensor mx = part_max[first].clone();
    for (int64_t j = 1; j < n_tiles; ++j) mx = at::maximum(mx, part_max[first + j]);
    Tensor sum = at::zeros_like(mx);
    Tensor pv = at::zeros({e.mq, Dv}, acc_opts);
    for (int64_t j = 0; j < n_tiles; ++j) {
      Tensor w = (part_max[first + j] - mx).exp_();
      sum.add_(part_sum[first + j] * w);
      pv.add_(part_pv[first + j] * w);
    }
    Tensor bvh = pv.div_(sum);
    bv[b][h].narrow(0, 0, e.mq).copy_(bvh);
    lse_l[b][h].narrow(0, 0, e.mq).copy_(sum.log_().add_(mx).squeeze(1));
  });
  part_max.clear();
  part_sum.clear();
  part_pv.clear();
  if (fused) {
    // one head per task, its matrices in scratch (a few dozen KiB at m = 64)
    run_tasks(static_cast<int64_t>(heads.size()), 4.0 * o.pinv_iterations * mp * mp * mp, [&](int64_t i) {
      const int64_t bh = heads[i], b = bh / H, h = bh % H;
      const Tensor Ap = padded_square(A_all[b][h], mp, 0);
      Tensor Z = scratch(1, mp, mp, acc_opts);
      simd::newton_schulz(Ap.data_ptr<float>(), static_cast<float>(c[bh]), o.pinv_iterations, mp, Z.data_ptr<float>(),
                          /*keep_all=*/false, scratch(2, 6 * mp, mp, acc_opts).data_ptr<float>());
      Tensor zbv_h = zbv[b][h];
      at::mm_out(zbv_h, Z.narrow(0, 0, ms).narrow(1, 0, ms), bv[b][h]);
    });
  } else if (!heads.empty()) {
    const Tensor c_t = pinv_scales(c, heads, B, H, acc);
    at::matmul_out(zbv, detail::newton_schulz_last(A_all, c_t, o.pinv_iterations), bv);
  }

  // Phase 4, tiles of queries: out = softmax(scale q k̃ᵀ)·zbv on the Nyström
  // path, softmax(scale q kᵀ)·v on the exact path (whole element: L_b, S_b <= m).
  const std::vector<Tile> qtiles = make_tiles(el, H, /*keys=*/false, /*exact_whole=*/true);
  const Tensor kT_pack = fused ? pack_heads(k_lm_s, D, mp, /*transpose=*/true) : Tensor();
  const Tensor w_pack = fused ? pack_heads(zbv, mp, dvp, /*transpose=*/false) : Tensor();
  run_tasks(static_cast<int64_t>(qtiles.size()), tL * md * (Dd + Dvd), [&](int64_t i) {
    const Tile& t = qtiles[i];
    const Element& e = el[t.b];
    if (fused && e.kind == Kind::kNystrom) {
      const Tensor qt = unit_rows(q[t.b][t.h], e.qidx, t.r0, t.r1, 4, 6, D);
      const int64_t n = qt.size(0);
      const Tensor out_bh = out[t.b][t.h];
      // straight into out and lse_q when the tile's rows are contiguous there
      const bool direct = !e.qidx.defined() && out.scalar_type() == at::kFloat && out_bh.stride(1) == 1;
      Tensor o = direct ? out_bh.narrow(0, t.r0, n) : scratch(2, n, Dv, acc_opts);
      Tensor lse = e.qidx.defined() ? scratch(3, n, 1, acc_opts).view({n}) : lse_q[t.b][t.h].narrow(0, t.r0, n);
      simd::attend_rows(qt.data_ptr<float>(), qt.stride(0), n, D, kT_pack[t.b][t.h].data_ptr<float>(), e.mk, mp,
                        w_pack[t.b][t.h].data_ptr<float>(), dvp, Dv, o.data_ptr<float>(), o.stride(0),
                        lse.data_ptr<float>());
      if (!direct) put_rows(out_bh, e.qidx, t.r0, o);
      if (e.qidx.defined()) put_rows(lse_q[t.b][t.h], e.qidx, t.r0, lse);
      return;
    }
    Tensor keys, values;
    if (e.kind == Kind::kNystrom) {
      keys = k_lm_s[t.b][t.h].narrow(0, 0, e.mk);
      values = zbv[t.b][t.h].narrow(0, 0, e.mk);
    } else {
      keys = rows(k[t.b][t.h], e.kidx, 0, e.Sb, acc).mul(scale);
      values = rows(v[t.b][t.h], e.kidx, 0, e.Sb, acc);
    }
    auto [p, lse] = softmax_rows(rows(q[t.b][t.h], e.qidx, t.r0, t.r1, acc, 4), keys);
    mm_put(out[t.b][t.h], e.qidx, t.r0, p, values);
    put_rows(lse_q[t.b][t.h], e.qidx, t.r0, lse);
  });
  return {out, q_lm, k_lm, bv, zbv, lse_q, lse_l, c_out};
}

// ---------------------------------------------------------------------------
// Backward

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_out_in,
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
  const Tensor q = query_in.detach(), k = key_in.detach(), v = value_in.detach();
  const Tensor dO = grad_out_in.detach();
  const Tensor q_lm = q_lm_in.detach(), k_lm = k_lm_in.detach(), bv = bv_in.detach(), zbv = zbv_in.detach();
  const Tensor lse_q = lse_q_in.detach(), lse_l = lse_l_in.detach(), c_saved = c_in.detach();
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3);
  const int64_t S = k.size(2), Dv = v.size(3), m = o.num_landmarks;
  const int64_t ms = detail::saved_landmarks(m, L, S).expect_int();
  // Work estimates (multiply-adds per task), in double: they only size the parallel grain.
  const double md = static_cast<double>(ms), Ld = L, Sd = S, Dd = D, Dvd = Dv;
  const double tL = tile_rows(L, B * H), tS = tile_rows(S, B * H);
  const at::ScalarType acc = detail::accumulate_type(q.scalar_type());
  const auto acc_opts = q.options().dtype(acc);
  const double scale = o.scale;

  // Gradients accumulate in the compute dtype and are converted at the end.
  // Every real row is written, so only padded rows need zeros.
  const bool has_qmask = query_padding_mask.has_value() && query_padding_mask->defined();
  const bool has_kmask = key_padding_mask.has_value() && key_padding_mask->defined();
  auto alloc = [&](bool zero, std::initializer_list<int64_t> shape) {
    return zero ? at::zeros(shape, acc_opts) : at::empty(shape, acc_opts);
  };
  Tensor dq = alloc(has_qmask, {B, H, L, D});
  Tensor dk = alloc(has_qmask || has_kmask, {B, H, S, D});
  Tensor dv = alloc(has_qmask || has_kmask, {B, H, S, Dv});
  auto finish = [&]() {
    return std::make_tuple(dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()));
  };
  if (B == 0 || L == 0) {  // no query: nothing reaches the keys
    dk.zero_();
    dv.zero_();
    return finish();
  }
  const std::vector<Element> el = describe_batch(op, B, L, S, m, key_padding_mask, query_padding_mask);

  // Exact elements: one task per (b, h), the whole element at once.
  std::vector<int64_t> exact_heads, heads;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      if (el[b].kind == Kind::kExact) exact_heads.push_back(b * H + h);
      if (el[b].kind == Kind::kNystrom) heads.push_back(b * H + h);
    }
  run_tasks(static_cast<int64_t>(exact_heads.size()), 2 * md * md * (Dd + Dvd), [&](int64_t i) {
    const int64_t b = exact_heads[i] / H, h = exact_heads[i] % H;
    const Element& e = el[b];
    Tensor qr = rows(q[b][h], e.qidx, 0, e.Lb, acc);
    Tensor kr = rows(k[b][h], e.kidx, 0, e.Sb, acc);
    Tensor vr = rows(v[b][h], e.kidx, 0, e.Sb, acc);
    Tensor g = rows(dO[b][h], e.qidx, 0, e.Lb, acc);
    Tensor lse = rows(lse_q[b][h].unsqueeze(1), e.qidx, 0, e.Lb, acc);
    Tensor P = at::mm(qr, kr.t()).mul_(scale).sub_(lse).exp_();
    Tensor dP = at::mm(g, vr.t());
    Tensor dS = P * (dP - (P * dP).sum(1, true));
    put_rows(dq[b][h], e.qidx, 0, at::mm(dS, kr).mul_(scale));
    put_rows(dk[b][h], e.kidx, 0, at::mm(dS.t(), qr).mul_(scale));
    put_rows(dv[b][h], e.kidx, 0, at::mm(P.t(), g));
  });
  if (heads.empty()) return finish();
  // The landmarks with the softmax scale folded in, once for every tile.
  const Tensor q_lm_s = q_lm * scale, k_lm_s = k_lm * scale;

  // Pass 1, query tiles: recompute F = softmax(scale q k̃ᵀ) from its saved
  // log-sum-exp. dq (direct part), and per tile: dk̃ and dW2 = Fᵀ dO.
  std::vector<Tile> qtiles;
  for (const Tile& t : make_tiles(el, H, false, false))
    if (el[t.b].kind == Kind::kNystrom) qtiles.push_back(t);
  std::vector<Tensor> part_dkl(qtiles.size()), part_dw2(qtiles.size());
  const bool fused = use_fused(acc, ms);
  const int64_t mp = round_up(ms, simd::kPadColumns), dp = round_up(D, simd::kPadColumns),
                dvp = round_up(Dv, simd::kPadColumns);
  // The fused passes' packed per-head operands (simd_attend.h, backward_tile).
  const Tensor k_lm_sT = fused ? pack_heads(k_lm_s, D, mp, /*transpose=*/true) : Tensor();
  const Tensor zbvT = fused ? pack_heads(zbv, Dv, mp, /*transpose=*/true) : Tensor();
  const Tensor k_lm_sP = fused ? pack_heads(k_lm_s, mp, dp, /*transpose=*/false) : Tensor();
  run_tasks(static_cast<int64_t>(qtiles.size()), tL * md * (2 * Dd + 3 * Dvd), [&](int64_t i) {
    const Tile& t = qtiles[i];
    const Element& e = el[t.b];
    if (fused) {
      const Tensor qt = unit_rows(q[t.b][t.h], e.qidx, t.r0, t.r1, 4, 6, dp);
      const Tensor g = unit_rows(dO[t.b][t.h], e.qidx, t.r0, t.r1, 5, 7, dvp);
      const Tensor lse = rows(lse_q[t.b][t.h].unsqueeze(1), e.qidx, t.r0, t.r1, acc).contiguous();
      const int64_t n = qt.size(0);
      const bool direct = !e.qidx.defined();
      Tensor dqt = direct ? dq[t.b][t.h].narrow(0, t.r0, n) : scratch(2, n, D, acc_opts);
      part_dkl[i] = at::empty({e.mk, D}, acc_opts);
      part_dw2[i] = at::empty({e.mk, Dv}, acc_opts);
      simd::BackwardTile bt = backward_tile_of(qt, g, D, Dv, e.mk, mp, k_lm_sT[t.b][t.h], zbvT[t.b][t.h],
                                               k_lm_sP[t.b][t.h], dqt, part_dkl[i]);
      bt.row_offset = lse.data_ptr<float>();
      bt.t2 = part_dw2[i].data_ptr<float>();
      bt.ldt2 = Dv;
      simd::backward_tile(bt);
      part_dkl[i].mul_(scale);
      if (!direct) put_rows(dq[t.b][t.h], e.qidx, t.r0, dqt);
      return;
    }
    Tensor kl_s = k_lm_s[t.b][t.h].narrow(0, 0, e.mk);
    Tensor w2 = zbv[t.b][t.h].narrow(0, 0, e.mk);
    Tensor qt = rows(q[t.b][t.h], e.qidx, t.r0, t.r1, acc, 4);
    Tensor g = rows(dO[t.b][t.h], e.qidx, t.r0, t.r1, acc, 5);
    Tensor lse = rows(lse_q[t.b][t.h].unsqueeze(1), e.qidx, t.r0, t.r1, acc);
    Tensor F = scratch(0, qt.size(0), kl_s.size(0), acc_opts);
    exp_shifted(at::mm_out(F, qt, kl_s.t()), lse);
    Tensor dF = scratch(1, qt.size(0), kl_s.size(0), acc_opts);
    at::mm_out(dF, g, w2.t());
    Tensor prod = scratch(2, F.size(0), F.size(1), acc_opts);
    Tensor row = at::mul_out(prod, F, dF).sum(1, true);
    Tensor dX = dF.sub_(row).mul_(F);
    mm_put(dq[t.b][t.h], e.qidx, t.r0, dX, kl_s);
    part_dkl[i] = at::mm(dX.t(), qt).mul_(scale);
    part_dw2[i] = at::mm(F.t(), g);
  });

  // Pass 2, per head: reduce the tiles, then back through Z·bv, the
  // Newton–Schulz iterations, c, and the softmax of A.
  std::vector<int64_t> first_qtile(B * H, -1), n_qtiles(B * H, 0);
  for (int64_t i = 0; i < static_cast<int64_t>(qtiles.size()); ++i) {
    const int64_t bh = qtiles[i].b * H + qtiles[i].h;
    if (first_qtile[bh] < 0) first_qtile[bh] = i;
    ++n_qtiles[bh];
  }
  std::vector<Tensor> dql(B * H), dkl(B * H), dbv(B * H), A(B * H), dA(B * H);
  std::vector<double> dc(B * H, 0.0), c(B * H, 0.0);
  std::vector<int64_t> cmax_col(B * H, 0);
  std::vector<double> colsum_max(B * H, 0.0);  // this head's own c (before "original")
  // Every head's A and dL/dzbv in zero-padded stacks, for the batched
  // Newton–Schulz derivative below (zero and c = 1 off the Nyström path).
  Tensor A_all = at::zeros({B, H, ms, ms}, acc_opts);
  Tensor dw2_all = at::zeros({B, H, ms, Dv}, acc_opts);
  run_tasks(static_cast<int64_t>(heads.size()), md * md * Dd + std::ceil(Ld / tL) * md * (Dd + Dvd), [&](int64_t i) {
    const int64_t bh = heads[i], b = bh / H, h = bh % H;
    const Element& e = el[b];
    Tensor dkl_h = part_dkl[first_qtile[bh]].clone();
    Tensor dw2 = dw2_all[b][h].narrow(0, 0, e.mk);
    dw2.copy_(part_dw2[first_qtile[bh]]);
    for (int64_t j = 1; j < n_qtiles[bh]; ++j) {
      dkl_h.add_(part_dkl[first_qtile[bh] + j]);
      dw2.add_(part_dw2[first_qtile[bh] + j]);
    }
    Tensor ql = q_lm[b][h].narrow(0, 0, e.mq);
    A[bh] = A_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk);
    A[bh].copy_(softmax_rows(ql, k_lm_s[b][h].narrow(0, 0, e.mk)).first);
    c[bh] = c_saved[b][h].item<double>();
    std::tie(colsum_max[bh], cmax_col[bh]) = max_column_sum(A[bh]);
    dkl[bh] = dkl_h;
    dql[bh] = at::zeros({e.mq, D}, acc_opts);
  });
  // Every head's dbv in one zero-padded stack (zero off the Nyström path and
  // past a head's landmarks): pass 3's fused kernels pack it.
  Tensor dbv_all;
  if (fused) {
    // Back through zbv = Z_T·bv and every Newton–Schulz iteration, a head per task.
    const int64_t n = mp, T = o.pinv_iterations;
    dbv_all = at::zeros({B, H, ms, Dv}, acc_opts);
    Tensor dA_all = at::empty({B, H, ms, ms}, acc_opts);
    run_tasks(static_cast<int64_t>(heads.size()), 16.0 * T * n * n * n, [&](int64_t i) {
      const int64_t bh = heads[i], b = bh / H, h = bh % H;
      const Element& e = el[b];
      const Tensor Ap = padded_square(A_all[b][h], n, 0);
      Tensor Z = scratch(1, (T + 1) * n, n, acc_opts);
      Tensor work = scratch(2, 10 * n, n, acc_opts);
      simd::newton_schulz(Ap.data_ptr<float>(), static_cast<float>(c[bh]), T, n, Z.data_ptr<float>(),
                          /*keep_all=*/true, work.data_ptr<float>());
      const Tensor ZT = Z.narrow(0, T * n, n).narrow(0, 0, ms).narrow(1, 0, ms);
      Tensor dbv_h = dbv_all[b][h];
      at::mm_out(dbv_h, ZT.t(), dw2_all[b][h]);
      Tensor dZ = scratch(3, n, n, acc_opts);
      dZ.zero_();
      Tensor dZ_top = dZ.narrow(0, 0, ms).narrow(1, 0, ms);
      at::mm_out(dZ_top, dw2_all[b][h], bv[b][h].t());
      Tensor dAp = scratch(4, n, n, acc_opts);
      dc[bh] = simd::newton_schulz_backward(Ap.data_ptr<float>(), static_cast<float>(c[bh]), Z.data_ptr<float>(), T,
                                            n, dZ.data_ptr<float>(), dAp.data_ptr<float>(), work.data_ptr<float>());
      dA_all[b][h].copy_(dAp.narrow(0, 0, ms).narrow(1, 0, ms));
      dbv[bh] = dbv_all[b][h].narrow(0, 0, e.mq);
      dA[bh] = dA_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk);
    });
  } else {
    // Back through zbv = Z_T·bv and every Newton–Schulz iteration, all heads at once.
    const Tensor c_t = pinv_scales(c, heads, B, H, acc);
    const std::vector<Tensor> Z = detail::newton_schulz_iterates(A_all, c_t, o.pinv_iterations);
    dbv_all = at::matmul(Z.back().transpose(-1, -2), dw2_all);
    auto [dA_all, dc_all] = detail::newton_schulz_backward(A_all, c_t, Z, at::matmul(dw2_all, bv.transpose(-1, -2)));
    const Tensor dc_d = dc_all.to(at::kDouble).contiguous();
    const double* dcp = dc_d.data_ptr<double>();
    for (int64_t bh : heads) {
      const int64_t b = bh / H, h = bh % H;
      const Element& e = el[b];
      dbv[bh] = dbv_all[b][h].narrow(0, 0, e.mq);
      dA[bh] = dA_all[b][h].narrow(0, 0, e.mq).narrow(1, 0, e.mk);
      dc[bh] = dcp[bh];
    }
  }
  part_dkl.clear();
  part_dw2.clear();

  // c = largest column sum of A: its gradient reaches that column. With
  // pinv_init="original" one c serves every head: all heads' dc go to the
  // head (the first, on ties) whose A attains the maximum.
  if (o.original_init) {
    double total = 0.0, best = -1.0;
    int64_t arg = heads.front();
    for (int64_t bh : heads) {
      total += dc[bh];
      const double cb = colsum_max[bh];
      if (cb > best) {
        best = cb;
        arg = bh;
      }
    }
    for (int64_t bh : heads) dc[bh] = bh == arg ? total : 0.0;
  }
  run_tasks(static_cast<int64_t>(heads.size()), 2 * md * md * Dd, [&](int64_t i) {
    const int64_t bh = heads[i], b = bh / H, h = bh % H;
    const Element& e = el[b];
    if (dc[bh] != 0.0) dA[bh].select(1, cmax_col[bh]).add_(dc[bh]);
    Tensor ql = q_lm[b][h].narrow(0, 0, e.mq);
    Tensor kl = k_lm[b][h].narrow(0, 0, e.mk);
    Tensor dS = A[bh] * (dA[bh] - (A[bh] * dA[bh]).sum(1, true));
    dql[bh].add_(at::mm(dS, kl).mul_(scale));
    dkl[bh].add_(at::mm(dS.t(), ql).mul_(scale));
    // Each key's share of its landmark's gradient: the landmark is a mean.
    dkl[bh].mul_(inverse_segment_sizes(e.Sb, e.mk, acc));
  });

  // Pass 3, key tiles: recompute Bm = softmax(scale q̃ kᵀ); dk (direct part
  // plus the share of dk̃ of the tile's segments), dv, and per tile dq̃.
  std::vector<Tile> ktiles;
  for (const Tile& t : make_tiles(el, H, true, false))
    if (el[t.b].kind == Kind::kNystrom) ktiles.push_back(t);
  std::vector<Tensor> part_dql(ktiles.size());
  Tensor q_lm_sT, dbvT, q_lm_sP, dbvP, lse_lP, col_dotP;
  if (fused) {
    q_lm_sT = pack_heads(q_lm_s, D, mp, /*transpose=*/true);
    q_lm_sP = pack_heads(q_lm_s, mp, dp, /*transpose=*/false);
    dbvT = pack_heads(dbv_all, Dv, mp, /*transpose=*/true);
    dbvP = pack_heads(dbv_all, mp, dvp, /*transpose=*/false);
    lse_lP = pack_heads(lse_l.unsqueeze(3), mp, 1, /*transpose=*/false).view({B, H, mp});
    col_dotP = pack_heads((dbv_all * bv).sum(-1, /*keepdim=*/true), mp, 1, /*transpose=*/false).view({B, H, mp});
  }
  run_tasks(static_cast<int64_t>(ktiles.size()), tS * md * (2 * Dd + 3 * Dvd), [&](int64_t i) {
    const Tile& t = ktiles[i];
    const int64_t bh = t.b * H + t.h;
    const Element& e = el[t.b];
    if (fused) {
      const Tensor kt = unit_rows(k[t.b][t.h], e.kidx, t.r0, t.r1, 4, 6, dp);
      const Tensor vt = unit_rows(v[t.b][t.h], e.kidx, t.r0, t.r1, 5, 7, dvp);
      const int64_t n = kt.size(0);
      const bool direct = !e.kidx.defined();
      Tensor dkt = direct ? dk[t.b][t.h].narrow(0, t.r0, n) : scratch(2, n, D, acc_opts);
      Tensor dvt = direct ? dv[t.b][t.h].narrow(0, t.r0, n) : scratch(3, n, Dv, acc_opts);
      part_dql[i] = at::empty({e.mq, D}, acc_opts);
      simd::BackwardTile bt = backward_tile_of(kt, vt, D, Dv, e.mq, mp, q_lm_sT[t.b][t.h], dbvT[t.b][t.h],
                                               q_lm_sP[t.b][t.h], dkt, part_dql[i]);
      bt.col_offset = lse_lP[t.b][t.h].data_ptr<float>();
      bt.col_dot = col_dotP[t.b][t.h].data_ptr<float>();
      bt.c2 = dbvP[t.b][t.h].data_ptr<float>();
      bt.ldc2 = dvp;
      bt.out2 = dvt.data_ptr<float>();
      bt.ldo2 = dvt.stride(0);
      simd::backward_tile(bt);
      part_dql[i].mul_(scale);
      if (!direct) {
        put_rows(dk[t.b][t.h], e.kidx, t.r0, dkt);
        put_rows(dv[t.b][t.h], e.kidx, t.r0, dvt);
      }
      add_segment_rows(dk[t.b][t.h], e.kidx, t.r0, t.r1, e.Sb, e.mk, dkl[bh]);
      return;
    }
    Tensor ql_s = q_lm_s[t.b][t.h].narrow(0, 0, e.mq);
    Tensor bvh = bv[t.b][t.h].narrow(0, 0, e.mq);
    Tensor lse = lse_l[t.b][t.h].narrow(0, 0, e.mq).unsqueeze(1);
    Tensor kt = rows(k[t.b][t.h], e.kidx, t.r0, t.r1, acc, 4);
    Tensor vt = rows(v[t.b][t.h], e.kidx, t.r0, t.r1, acc, 5);
    Tensor Bm = scratch(0, e.mq, kt.size(0), acc_opts);
    exp_shifted(at::mm_out(Bm, ql_s, kt.t()), lse);
    Tensor dBm = scratch(1, e.mq, kt.size(0), acc_opts);
    at::mm_out(dBm, dbv[bh], vt.t());
    Tensor dX = dBm.sub_((dbv[bh] * bvh).sum(1, true)).mul_(Bm);
    mm_put(dk[t.b][t.h], e.kidx, t.r0, dX.t(), ql_s);
    add_segment_rows(dk[t.b][t.h], e.kidx, t.r0, t.r1, e.Sb, e.mk, dkl[bh]);
    mm_put(dv[t.b][t.h], e.kidx, t.r0, Bm.t(), dbv[bh]);
    part_dql[i] = at::mm(dX, kt).mul_(scale);
  });

  // Pass 4, query tiles: add each query's share of dq̃ (the landmark means).
  std::vector<int64_t> first_ktile(B * H, -1), n_ktiles(B * H, 0);
  for (int64_t i = 0; i < static_cast<int64_t>(ktiles.size()); ++i) {
    const int64_t bh = ktiles[i].b * H + ktiles[i].h;
    if (first_ktile[bh] < 0) first_ktile[bh] = i;
    ++n_ktiles[bh];
  }
  run_tasks(static_cast<int64_t>(heads.size()), std::ceil(Sd / tS) * md * Dd, [&](int64_t i) {
    const int64_t bh = heads[i];
    const Element& e = el[bh / H];
    for (int64_t j = 0; j < n_ktiles[bh]; ++j) dql[bh].add_(part_dql[first_ktile[bh] + j]);
    dql[bh].mul_(inverse_segment_sizes(e.Lb, e.mq, acc));
  });
  run_tasks(static_cast<int64_t>(qtiles.size()), tL * Dd, [&](int64_t i) {
    const Tile& t = qtiles[i];
    const Element& e = el[t.b];
    add_segment_rows(dq[t.b][t.h], e.qidx, t.r0, t.r1, e.Lb, e.mq, dql[t.b * H + t.h]);
  });
  return finish();
}

}  // namespace
}  // namespace cpu
}  // namespace nystrom

TORCH_LIBRARY_IMPL(nystrom, CPU, m) {
  m.impl("nystrom_attention_forward", &nystrom::cpu::forward_cpu);
  m.impl("nystrom_attention_backward", &nystrom::cpu::backward_cpu);
}
