// Internal: the operations the CPU kernels apply to one tile of rows
// (docs/DESIGN.md §6): gathering real rows in the compute dtype, segment
// means and their gradients, row softmaxes, and the packing of per-head
// operands for the fused kernels (fused.h). Header only, shared by
// forward.cpp and backward.cpp.
#pragma once

#include "cpu/fused.h"
#include "cpu/fused_bf16.h"
#include "cpu/isa.h"
#include "cpu/tiles.h"
#include "element.h"

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace nystrom::cpu {

// ---------------------------------------------------------- real rows ----

/// The element type of the fused kernels (fused.h) for a tensor's dtype:
/// float32, bfloat16 or float16 (the inputs whose compute dtype is float32).
inline fused::Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fused::Elem::kF32;
    case at::kBFloat16: return fused::Elem::kBf16;
    case at::kHalf: return fused::Elem::kF16;
    default: TORCH_INTERNAL_ASSERT(false, "the fused CPU kernels take float32, bfloat16 or float16 rows, not ", t);
  }
}

/// The real rows of x_bh (n x d; idx as in Element) as the fused kernels read
/// and write them.
inline fused::Rows rows_of(const Tensor& x_bh, const Tensor& idx) {
  fused::Rows r;
  r.p = x_bh.data_ptr();
  r.e = elem_of(x_bh.scalar_type());
  r.rs = x_bh.stride(0);
  r.cs = x_bh.stride(1);
  r.idx = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  return r;
}

/// Rows [r0, r1) of the real tokens of x_bh (n x d), in the compute dtype acc:
/// a view when nothing must be gathered (padding) or converted (float16 /
/// bfloat16 inputs); else a copy, into scratch slot `slot` when one is given
/// (tiles inside run_tasks), or a fresh tensor.
inline Tensor rows(const Tensor& x_bh, const Tensor& idx, int64_t r0, int64_t r1, at::ScalarType acc,
                   int slot = -1) {
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

/// dst_bh[real rows r0 .., as many as src has] = src.
inline void put_rows(const Tensor& dst_bh, const Tensor& idx, int64_t r0, const Tensor& src) {
  if (idx.defined()) {
    dst_bh.index_copy_(0, idx.narrow(0, r0, src.size(0)), src.to(dst_bh.scalar_type()));
  } else {
    dst_bh.narrow(0, r0, src.size(0)).copy_(src);
  }
}

/// dst_bh[real rows r0 .., as many as a has] = a·b: straight into dst when its
/// rows are contiguous in the compute dtype, saving a copy.
inline void mm_put(const Tensor& dst_bh, const Tensor& idx, int64_t r0, const Tensor& a, const Tensor& b) {
  if (!idx.defined() && dst_bh.scalar_type() == a.scalar_type() && dst_bh.stride(-1) == 1) {
    Tensor slice = dst_bh.narrow(0, r0, a.size(0));
    at::mm_out(slice, a, b);
    return;
  }
  put_rows(dst_bh, idx, r0, at::mm(a, b));
}

// ----------------------------------------------------------- segments ----
// Segment arithmetic of docs/DESIGN.md §2 step 2 (element.h), on tensors.

/// Segment (landmark) index of each of the rows r0..r1 of a sequence of n real
/// tokens cut into ms segments: element.h's segment_of, for a range of rows.
inline Tensor segment_ids(int64_t r0, int64_t r1, int64_t n, int64_t ms) {
  Tensor r = at::arange(r0 + 1, r1 + 1, at::kLong);
  return (r * ms - 1).div(n, "floor");
}

/// 1 / (size of each of the ms segments of n tokens), shape (ms, 1).
inline Tensor inverse_segment_sizes(int64_t n, int64_t ms, at::ScalarType acc) {
  Tensor j = at::arange(ms + 1, at::kLong);
  Tensor bounds = (j * n).div(ms, "floor");
  Tensor sizes = bounds.narrow(0, 1, ms) - bounds.narrow(0, 0, ms);
  return sizes.to(acc).reciprocal().unsqueeze(1);
}

/// Segment means (landmarks) of the n real rows of x_bh: (ms x d).
inline Tensor landmarks(const Tensor& x_bh, const Tensor& idx, int64_t n, int64_t ms, at::ScalarType acc) {
  if (isa() != Isa::kNone && acc == at::kFloat) {
    // float32, bfloat16 or float16 rows: converted and summed row by row in
    // one pass (fused.h). perf at n = 4096: ATen's mean over the segments
    // took 7% of the float32 forward, and its gather, convert and index_add
    // for half inputs more than that.
    Tensor sums = at::empty({ms, x_bh.size(1)}, x_bh.options().dtype(acc));
    fused::segment_sums(rows_of(x_bh, idx), n, ms, x_bh.size(1), sums.data_ptr<float>());
    return sums.mul_(inverse_segment_sizes(n, ms, acc));
  }
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

/// dst_bh[real rows r0..r1) += src[segment of the row] for a sequence of n real
/// tokens in ms segments (src: ms x d, same dtype as dst): the gradient of a
/// segment sum reaching its tokens. Real row r is row idx[r] of dst_bh, or row
/// r - base without idx (base = r0: dst_bh holds just the tile). A plain loop:
/// gathering the rows first (index_select) took longer than the add.
inline void add_segment_rows(const Tensor& dst_bh, const Tensor& idx, int64_t r0, int64_t r1, int64_t n,
                             int64_t ms, const Tensor& src, int64_t base = 0) {
  const Tensor s = src.contiguous();
  const int64_t d = dst_bh.size(1), rs = dst_bh.stride(0), cs = dst_bh.stride(1);
  const int64_t* ip = idx.defined() ? idx.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(dst_bh.scalar_type(), "add_segment_rows", [&] {
    scalar_t* out = dst_bh.data_ptr<scalar_t>();
    const scalar_t* in = s.data_ptr<scalar_t>();
    for (int64_t r = r0; r < r1; ++r) {
      scalar_t* o = out + (ip ? ip[r] : r - base) * rs;
      const scalar_t* a = in + segment_of(r, n, ms) * d;
      if (cs == 1) {
        for (int64_t c = 0; c < d; ++c) o[c] += a[c];
      } else {
        for (int64_t c = 0; c < d; ++c) o[c * cs] += a[c];
      }
    }
  });
}

// ------------------------------------------------ the pseudoinverse's c ----

/// Largest column sum of A and the first column that attains it
/// (docs/DESIGN.md §2 step 4).
inline std::pair<double, int64_t> max_column_sum(const Tensor& A) {
  Tensor col = A.sum(0);
  const int64_t j = col.argmax().item<int64_t>();
  return {col[j].item<double>(), j};
}

/// c of every head as a (B, H, 1, 1) stack for the batched Newton–Schulz
/// steps: the heads' own c on the Nyström path, 1 elsewhere (A = 0 there).
inline Tensor pinv_scales(const std::vector<double>& c, const std::vector<int64_t>& heads, int64_t B, int64_t H,
                          at::ScalarType acc) {
  std::vector<double> all(B * H, 1.0);
  for (int64_t bh : heads) all[bh] = c[bh];
  return at::tensor(all, at::TensorOptions().dtype(at::kDouble)).to(acc).view({B, H, 1, 1});
}

// ------------------------------------------------------------ softmax ----

/// Whether the vectorised loops of fused.h serve the float32 matrix x
/// (contiguous rows), on this CPU and instruction-set choice (isa.h).
inline bool vectorised(const Tensor& x) {
  return isa() != Isa::kNone && x.scalar_type() == at::kFloat && x.dim() == 2 && x.stride(1) == 1;
}

/// In place, row by row: x <- exp(x - max), then divided by the row sum when
/// normalize. Returns the row maxima and sums (before normalising), (rows x 1).
inline std::pair<Tensor, Tensor> exp_rows(const Tensor& x, bool normalize) {
  if (vectorised(x)) {
    Tensor mx = at::empty({x.size(0), 1}, x.options()), sum = at::empty({x.size(0), 1}, x.options());
    fused::softmax_rows(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), mx.data_ptr<float>(),
                        sum.data_ptr<float>(), normalize);
    return {mx, sum};
  }
  Tensor mx = x.amax(1, /*keepdim=*/true);
  x.sub_(mx).exp_();
  Tensor sum = x.sum(1, /*keepdim=*/true);
  if (normalize) x.div_(sum);
  return {mx, sum};
}

/// Softmax of x·y_scaledᵀ for a tile of rows of x (y is pre-scaled by the
/// caller), in scratch slot 0. Returns the probabilities and the log-sum-exp
/// of each row.
inline std::pair<Tensor, Tensor> softmax_rows(const Tensor& x, const Tensor& y_scaled) {
  Tensor logits = scratch(0, x.size(0), y_scaled.size(0), x.options());
  at::mm_out(logits, x, y_scaled.t());
  auto [mx, sum] = exp_rows(logits, /*normalize=*/true);
  return {logits, sum.log_().add_(mx).squeeze(1)};
}

/// x (rows x cols) <- exp(x - offset), offset (rows x 1): the recomputed
/// probabilities of the backward, from saved log-sum-exps.
inline void exp_shifted(const Tensor& x, const Tensor& offset) {
  if (vectorised(x)) {
    const Tensor off = offset.contiguous();
    fused::exp_shifted_rows(x.data_ptr<float>(), x.size(0), x.size(1), x.stride(0), off.data_ptr<float>());
    return;
  }
  x.sub_(offset).exp_();
}

// -------------------------------------------------- the fused kernels ----

/// The fused float32 tile kernels (fused.h) serve a call when this process
/// runs them (isa.h) and the landmarks fit their buffers.
inline bool use_fused(at::ScalarType acc, int64_t ms) {
  return acc == at::kFloat && isa() != Isa::kNone && ms <= fused::kMaxLandmarksFused;
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/// x (B, H, r, c) -> (B, H, c, cp) with x's transpose in the first r columns
/// and zeros elsewhere (transpose), or (B, H, rp, cp) with x in the top-left
/// corner: the packed per-head operands of the fused kernels.
inline Tensor pack_heads(const Tensor& x, int64_t rp, int64_t cp, bool transpose) {
  const Tensor src = transpose ? x.transpose(-1, -2) : x;
  Tensor out = at::zeros({x.size(0), x.size(1), rp, cp}, x.options());
  out.narrow(2, 0, src.size(2)).narrow(3, 0, src.size(3)).copy_(src);
  return out;
}

/// x (r x c, r, c <= n) zero-padded to n x n, in scratch slot `slot`.
inline Tensor padded_square(const Tensor& x, int64_t n, int slot) {
  Tensor out = scratch(slot, n, n, x.options());
  out.zero_();
  out.narrow(0, 0, x.size(0)).narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

/// Real rows [r0, r1) of x_bh (float32, bfloat16 or float16) as float32 rows
/// with unit column stride and at least `ld` floats per row readable: a view
/// of float32 rows that are so already; else gathered, converted and
/// zero-padded to ld columns into scratch slot `slot` (fused::load_rows).
inline Tensor unit_rows(const Tensor& x_bh, const Tensor& idx, int64_t r0, int64_t r1, int slot, int64_t ld) {
  if (!idx.defined() && x_bh.scalar_type() == at::kFloat && x_bh.stride(1) == 1 && x_bh.size(1) >= ld)
    return x_bh.narrow(0, r0, r1 - r0);
  Tensor out = scratch(slot, r1 - r0, ld, x_bh.options().dtype(at::kFloat));
  fused::load_rows(rows_of(x_bh, idx), r0, r1 - r0, x_bh.size(1), out.data_ptr<float>(), ld, ld);
  return out;
}

/// The data of a bfloat16 tensor, and of a pairs tensor (pair_heads), as the
/// fused_bf16.h kernels take them.
inline const uint16_t* half_ptr(const Tensor& x) { return static_cast<const uint16_t*>(x.data_ptr()); }
inline uint32_t* pair_ptr(const Tensor& x) { return reinterpret_cast<uint32_t*>(x.data_ptr<int32_t>()); }

/// Real rows [r0, r1) of the bfloat16 x_bh as bfloat16 rows with unit column
/// stride and d + d % 2 elements readable, the one past d zero when d is odd
/// (the pairs of fused_bf16.h): a view where the rows are so already, else
/// gathered into scratch slot `slot`.
inline Tensor half_rows(const Tensor& x_bh, const Tensor& idx, int64_t r0, int64_t r1, int slot, int64_t d) {
  if (!idx.defined() && x_bh.stride(1) == 1 && d % 2 == 0) return x_bh.narrow(0, r0, r1 - r0);
  Tensor out = scratch(slot, r1 - r0, d + d % 2, x_bh.options());
  if (d % 2 != 0) out.narrow(1, d, 1).zero_();
  Tensor dst = out.narrow(1, 0, d);
  if (idx.defined()) {
    at::index_select_out(dst, x_bh, 0, idx.narrow(0, r0, r1 - r0));
  } else {
    dst.copy_(x_bh.narrow(0, r0, r1 - r0));
  }
  return out;
}

/// The packed float32 operands of pack_heads (B, H, r, c), c a multiple of
/// fused::kPadColumns, as bfloat16 pairs (B, H, ceil(r / 2), c) for the
/// vdpbf16ps kernels (fused::bf16::pack_pairs).
inline Tensor pair_heads(const Tensor& packed) {
  const int64_t B = packed.size(0), H = packed.size(1), r = packed.size(2), c = packed.size(3);
  Tensor out = at::empty({B, H, (r + 1) / 2, c}, packed.options().dtype(at::kInt));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      fused::bf16::pack_pairs(packed[b][h].data_ptr<float>(), c, r, c,
                              reinterpret_cast<uint32_t*>(out[b][h].data_ptr<int32_t>()), c);
  return out;
}

/// x (float32 or float64, contiguous) in dtype t: x itself when it has it;
/// float32 to half precision through fused::store_rows, a block of rows per task.
inline Tensor converted(const Tensor& x, at::ScalarType t) {
  if (x.scalar_type() == t) return x;
  if (isa() == Isa::kNone || x.scalar_type() != at::kFloat || !x.is_contiguous() || x.dim() == 0) return x.to(t);
  Tensor out = at::empty(x.sizes(), x.options().dtype(t));
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d, block = 1024;
  fused::Rows dst;
  dst.p = out.data_ptr();
  dst.e = elem_of(t);
  dst.rs = d;
  const float* src = x.data_ptr<float>();
  run_tasks((rows + block - 1) / block, double(block) * d, [&](int64_t i) {
    const int64_t r0 = i * block;
    fused::store_rows(src + r0 * d, d, r0, std::min(block, rows - r0), d, dst);
  });
  return out;
}

/// Real rows [r0, r0 + src rows) of dst_bh = src (float32 rows, unit column
/// stride), converted to dst_bh's dtype (fused::store_rows).
inline void store_tile(const Tensor& dst_bh, const Tensor& idx, int64_t r0, const Tensor& src) {
  fused::store_rows(src.data_ptr<float>(), src.stride(0), r0, src.size(0), src.size(1), rows_of(dst_bh, idx));
}

}  // namespace nystrom::cpu
