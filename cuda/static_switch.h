// Run-time sizes turned into template parameters, in one place
// (docs/DESIGN.md §7). Each helper calls f with std::integral_constant
// arguments for the instance that serves the size, and returns its result;
// a size no instance serves gives cudaErrorInvalidValue.
#pragma once

#include <cuda_runtime_api.h>

#include <type_traits>

namespace nystrom::cuda::kern {

template <int N>
using Int = std::integral_constant<int, N>;

/// Columns of the head dimension each lane holds in registers in the generic
/// long-product kernels: 2, 4 or 8 for head dims (the larger of D and Dv) up
/// to 64, 128 or 256.
template <typename F>
cudaError_t with_lane_columns(int D, int Dv, F&& f) {
  const int d = D > Dv ? D : Dv;
  if (d <= 64) return f(Int<2>{});
  if (d <= 128) return f(Int<4>{});
  if (d <= 256) return f(Int<8>{});
  return cudaErrorInvalidValue;
}

/// The (D, Dv) pairs the tensor-core kernels are built for: 64 or 128 each.
template <typename F>
cudaError_t with_tc_head_dims(int D, int Dv, F&& f) {
  auto with_dv = [&](auto d) -> cudaError_t {
    if (Dv == 64) return f(d, Int<64>{});
    if (Dv == 128) return f(d, Int<128>{});
    return cudaErrorInvalidValue;
  };
  if (D == 64) return with_dv(Int<64>{});
  if (D == 128) return with_dv(Int<128>{});
  return cudaErrorInvalidValue;
}

/// The padded matrix size of the fused Newton–Schulz kernel for ms landmark
/// rows: 32, 64 or 128 (128 only when allow128, i.e. for float32).
template <typename F>
cudaError_t with_newton_schulz_size(int ms, bool allow128, F&& f) {
  if (ms <= 32) return f(Int<32>{});
  if (ms <= 64) return f(Int<64>{});
  if (ms <= 128 && allow128) return f(Int<128>{});
  return cudaErrorInvalidValue;
}

}  // namespace nystrom::cuda::kern
