// Grid sizing for the passes whose blocks stride over equal row tiles of each
// head (docs/DESIGN.md §7, "Launch templates and limits"). Plain C++, no CUDA:
// the glue, the launchers and the emulator's tests include it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace nystrom::cuda {

/// Blocks per head (`groups`) for a pass over `heads` heads of `tiles` tiles
/// each, whose block b of a head takes tiles b, b + groups, ..., with
/// `per_sm` blocks resident per multiprocessor on `sm_count` of them. Every
/// tile costing the same, the pass takes waves(g) * ceil(tiles / g) tile
/// times, waves(g) = ceil(heads * g / (per_sm * sm_count)): the g in
/// [1, min(tiles, max_groups)] that minimises it, the smallest of equals
/// (fewer per-group partials). Sizing by "two blocks per SM, rounded up" instead
/// gave B*H = 64, 132 SMs, one block per SM: 5 groups, 320 blocks, 3 waves of
/// ceil(256 / 5) = 52 tiles at n = 16K (156 tile times) where 2 groups, one
/// wave of 128 blocks, take 128.
inline int groups_for_waves(int64_t heads, int64_t tiles, int per_sm, int sm_count, int max_groups = 1024) {
  if (heads <= 0 || tiles <= 0) return 1;
  const int64_t slots = std::max<int64_t>(1, static_cast<int64_t>(std::max(per_sm, 1)) * std::max(sm_count, 1));
  const int64_t top = std::max<int64_t>(1, std::min<int64_t>(tiles, max_groups));
  int64_t best_g = 1, best_cost = -1;
  for (int64_t g = 1; g <= top; ++g) {
    const int64_t waves = (heads * g + slots - 1) / slots;
    const int64_t cost = waves * ((tiles + g - 1) / g);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_g = g;
    }
  }
  return static_cast<int>(best_g);
}

/// Tiles per block of the forward's query pass (tc_query_kernel: block x of a
/// head takes the contiguous tiles x * per .. x * per + per - 1, converting
/// k̃ and W into shared memory once for all of them): `groups_for_waves`'
/// blocks per head, at most 8 as in the backward (more would buy a tile or
/// two of tail for a conversion per block: at 16K, 37 blocks of 7 tiles in 9
/// waves model 63 tile times against 64), then per = ceil(tiles / groups), so
/// ceil(tiles / per) <= groups blocks per head. At B*H = 64 on 132 SMs with 2
/// blocks each: 4 blocks of 64 tiles at n = 16K (one wave of 256 blocks), 4
/// of 8 at 2K. The
/// former rule (enough blocks for 8 per SM, at most 8 tiles each) launched
/// 2048 blocks of 8 tiles at 16K (7.8 waves, 8 conversions per block slot)
/// and 2048 of one tile at 2K (a conversion per tile).
inline int64_t query_tiles_per_block(int64_t heads, int64_t tiles, int per_sm, int sm_count) {
  if (tiles <= 0) return 1;
  const int64_t g = groups_for_waves(heads, tiles, per_sm, sm_count, /*max_groups=*/8);
  return (tiles + g - 1) / g;
}

/// Blocks of `smem` dynamic bytes that fit one multiprocessor's shared memory,
/// taken as the per-block opt-in limit plus the 1 KiB each block reserves
/// (H100/H200: 227 + 1 = 228 KiB, A100: 163 + 1 = 164), at most `cap`.
inline int blocks_by_smem(size_t smem, size_t smem_optin, int cap = 8) {
  const size_t per_block = smem + 1024;
  const size_t fit = (smem_optin + 1024) / per_block;
  return static_cast<int>(std::clamp<size_t>(fit, 1, static_cast<size_t>(cap)));
}

}  // namespace nystrom::cuda
