// Internal: how the CPU kernels cut a call into tasks (docs/DESIGN.md §6).
//
// A call is split into tasks over (batch element, head, tile of rows) and run
// with at::parallel_for. No task ever holds an (n x n) matrix, nor an (n x m)
// matrix of a whole head: the long products are done a tile of at most 2048
// rows at a time. The partition depends only on the problem size, never on
// the number of threads, and every reduction runs in a fixed order, so repeated
// calls with the same inputs, thread count and instruction set (isa.h) are
// bitwise equal.
//
// Header only: the forward (forward.cpp) and the backward (backward.cpp)
// share these helpers.
#pragma once

#include "element.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <vector>

namespace nystrom::cpu {

using at::Tensor;

// ------------------------------------------------------------ elements ----

/// One batch element after its padding is removed (element.h).
struct Element {
  int64_t Lb = 0;  // real queries
  int64_t Sb = 0;  // real keys
  int64_t mq = 0;  // query landmarks (Nyström path)
  int64_t mk = 0;  // key landmarks (Nyström path)
  ElementKind kind = ElementKind::kEmpty;
  Tensor qidx;  // positions of the real queries; undefined = all of 0..L-1
  Tensor kidx;  // positions of the real keys; undefined = all of 0..S-1
};

/// Positions of the real (false) entries of one mask row, or undefined when
/// nothing is masked; *count gets their number.
inline Tensor real_positions(const Tensor& mask_row, int64_t* count) {
  Tensor idx = at::nonzero(mask_row.logical_not()).view({-1});
  *count = idx.numel();
  return *count == mask_row.numel() ? Tensor() : idx;
}

/// Every batch element of a call with m landmarks; an element with real
/// queries but no real key is an error (the message names the element).
inline std::vector<Element> describe_batch(const char* op, int64_t B, int64_t L, int64_t S, int64_t m,
                                           const std::optional<Tensor>& kpm, const std::optional<Tensor>& qpm) {
  std::vector<Element> el(B);
  const bool has_k = kpm.has_value() && kpm->defined();
  const bool has_q = qpm.has_value() && qpm->defined();
  const Tensor kmask = has_k ? kpm->to(at::kCPU) : Tensor();
  const Tensor qmask = has_q ? qpm->to(at::kCPU) : Tensor();
  for (int64_t b = 0; b < B; ++b) {
    Element& e = el[b];
    e.Lb = L;
    e.Sb = S;
    if (has_q) e.qidx = real_positions(qmask[b], &e.Lb);
    if (has_k) e.kidx = real_positions(kmask[b], &e.Sb);
    TORCH_CHECK(e.Lb == 0 || e.Sb > 0, op, ": key_padding_mask masks every key of batch element ", b,
                "; each batch element with real queries needs at least one real key");
    e.kind = element_kind(e.Lb, e.Sb, m);
    if (e.kind == ElementKind::kNystrom) {
      e.mq = std::min(m, e.Lb);
      e.mk = std::min(m, e.Sb);
    }
  }
  return el;
}

/// The heads (b * H + h) of the elements of one kind.
inline std::vector<int64_t> heads_of(const std::vector<Element>& el, int64_t H, ElementKind kind) {
  std::vector<int64_t> heads;
  for (int64_t b = 0; b < static_cast<int64_t>(el.size()); ++b)
    if (el[b].kind == kind)
      for (int64_t h = 0; h < H; ++h) heads.push_back(b * H + h);
  return heads;
}

// --------------------------------------------------------------- tiles ----

/// Rows per tile of a sequence of n real tokens in a call of `heads` (batch x
/// heads) sequences: the largest power of two from 128 to 2048 that still
/// cuts the call into at least kMinTasks tiles. Large tiles keep the products
/// efficient (2048 rows of 64 floats fit in L2); enough tiles keep every
/// thread busy. Depends on the problem size only, never on the thread count.
constexpr int64_t kMinTasks = 32;
inline int64_t tile_rows(int64_t n, int64_t heads) {
  int64_t t = 2048;
  while (t > 128 && heads * ((n + t - 1) / t) < kMinTasks) t /= 2;
  return t;
}

/// Real rows [r0, r1) of one (b, h).
struct Tile {
  int64_t b, h, r0, r1;
};

/// Tiles of the real query rows (keys = false) or real key rows (keys = true)
/// of every (b, h) of the elements of kind `only` (kEmpty: every non-empty
/// element); with exact_whole, an element on the exact path is one tile.
/// Tiles of one (b, h) are consecutive, in row order.
inline std::vector<Tile> make_tiles(const std::vector<Element>& el, int64_t H, bool keys, bool exact_whole,
                                    ElementKind only = ElementKind::kEmpty) {
  std::vector<Tile> tiles;
  const int64_t heads = static_cast<int64_t>(el.size()) * H;
  for (int64_t b = 0; b < static_cast<int64_t>(el.size()); ++b) {
    const Element& e = el[b];
    if (e.kind == ElementKind::kEmpty || (only != ElementKind::kEmpty && e.kind != only)) continue;
    const int64_t n = keys ? e.Sb : e.Lb;
    const int64_t step = (exact_whole && e.kind == ElementKind::kExact) ? n : tile_rows(n, heads);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r0 = 0; r0 < n; r0 += step) tiles.push_back({b, h, r0, std::min(n, r0 + step)});
  }
  return tiles;
}

/// For tiles grouped by (b, h) (make_tiles' order): the index of the first
/// tile of each head and the number of its tiles, over B * H heads.
struct TileIndex {
  std::vector<int64_t> first, count;
  TileIndex(const std::vector<Tile>& tiles, int64_t B, int64_t H) : first(B * H, -1), count(B * H, 0) {
    for (int64_t i = 0; i < static_cast<int64_t>(tiles.size()); ++i) {
      const int64_t bh = tiles[i].b * H + tiles[i].h;
      if (first[bh] < 0) first[bh] = i;
      ++count[bh];
    }
  }
};

// ----------------------------------------------------------- workspace ----

/// Scratch matrices of the tasks of one parallel chunk. A tile's temporaries
/// (logits, probabilities: up to 2048 x m floats) come from here instead of
/// fresh allocations: a fresh buffer of that size is mapped and faulted in
/// page by page each time, which costs more than the arithmetic on it.
/// Each thread keeps one workspace across calls (run_tasks), so that only the
/// first call of a thread maps these buffers; it keeps at most kKeepBytes per
/// slot (2048 x 128 floats: every tile at D, Dv, m <= 128) and releases larger
/// buffers when its chunk ends. A task that itself runs tasks on the same
/// thread gets a fresh workspace for them (its own buffers stay its own).
class Workspace {
 public:
  /// A (rows x cols) matrix in slot `slot` (< kSlots); contents undefined.
  Tensor get(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
    Tensor& b = buf_[slot];
    if (!b.defined() || b.numel() < rows * cols || b.scalar_type() != opts.dtype().toScalarType()) {
      b = at::empty({rows * cols}, opts);
    }
    return b.narrow(0, 0, rows * cols).view({rows, cols});
  }
  /// Releases the buffers above kKeepBytes.
  void trim() {
    for (Tensor& b : buf_)
      if (b.defined() && b.nbytes() > kKeepBytes) b = Tensor();
  }
  static constexpr int kSlots = 8;
  static constexpr size_t kKeepBytes = size_t{1} << 20;

 private:
  std::array<Tensor, kSlots> buf_;
};

inline thread_local Workspace* tls_workspace = nullptr;

/// The workspace this thread keeps across calls.
inline Workspace& thread_workspace() {
  static thread_local Workspace ws;
  return ws;
}

/// Slot `slot` of the running task's workspace (a fresh tensor outside run_tasks).
inline Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  return tls_workspace ? tls_workspace->get(slot, rows, cols, opts) : at::empty({rows, cols}, opts);
}

// --------------------------------------------------------------- tasks ----

/// Every worker runs outside the autograd layer and records nothing.
struct TaskGuard {
  at::NoGradGuard no_grad;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

/// Below this much work (multiply-adds) a chunk of tasks is not worth a
/// thread: tiny calls stay on the calling thread instead of waking a team,
/// which costs far more than the work when the cores are busy elsewhere.
constexpr int64_t kMinWorkPerThread = 1 << 18;

/// Runs f(0) .. f(n-1), in parallel where the work allows; `cost` is the
/// approximate number of multiply-adds of one task (it only sizes the grain).
template <typename F>
void run_tasks(int64_t n, double cost, const F& f) {
  const double per_chunk = std::ceil(static_cast<double>(kMinWorkPerThread) / std::max(1.0, cost));
  const int64_t grain =
      static_cast<int64_t>(std::min<double>(per_chunk, static_cast<double>(std::max<int64_t>(n, 1))));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    TaskGuard guard;
    struct Use {  // installs a workspace for the chunk, restores the caller's after it (also on a throw)
      Workspace* const outer = tls_workspace;
      std::optional<Workspace> nested;
      Workspace* const ws = outer == nullptr ? &thread_workspace() : &nested.emplace();
      Use() { tls_workspace = ws; }
      ~Use() {
        tls_workspace = outer;
        ws->trim();
      }
    } use;
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

}  // namespace nystrom::cpu
