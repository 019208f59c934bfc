// The shape of one batch element after its padding is removed, and the
// segment arithmetic of the landmarks: docs/DESIGN.md §2 steps 1 and 2.
//
// Torch-free and CUDA-free, so that the CPU kernels, the CUDA glue and the
// device kernels (cuda/) all classify elements and cut segments with the very
// same code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NYSTROM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NYSTROM_HOST_DEVICE inline
#endif

namespace nystrom {

/// Which path a batch element takes (docs/DESIGN.md §2 step 1).
enum class ElementKind : int {
  kEmpty = 0,    // no real query: nothing to compute (its output rows are padding)
  kExact = 1,    // L_b <= m and S_b <= m: exact softmax attention
  kNystrom = 2,  // otherwise: min(m, L_b) query and min(m, S_b) key landmarks
};

/// The kind of an element with Lb real queries and Sb real keys and m
/// landmarks. An element with queries but no key is an error the host code
/// reports before any kernel runs; here it counts as empty.
NYSTROM_HOST_DEVICE ElementKind element_kind(int64_t Lb, int64_t Sb, int64_t m) {
  if (Lb == 0 || Sb == 0) return ElementKind::kEmpty;
  return Lb <= m && Sb <= m ? ElementKind::kExact : ElementKind::kNystrom;
}

/// First token of segment j when n tokens are cut into ms segments
/// (docs/DESIGN.md §2 step 2): segment j covers [floor(j n/ms), floor((j+1) n/ms)).
NYSTROM_HOST_DEVICE int64_t segment_start(int64_t j, int64_t n, int64_t ms) { return j * n / ms; }

/// The segment of token r of n in ms segments: floor(((r+1) ms - 1) / n).
NYSTROM_HOST_DEVICE int64_t segment_of(int64_t r, int64_t n, int64_t ms) { return ((r + 1) * ms - 1) / n; }

}  // namespace nystrom
