// Internal: vectorised exponentials for the CPU kernels' softmax tiles.
//
// The tiles' exponentials were the largest cost after the products (ATen's
// exp ran at about 0.85 ns per float here). These loops use AVX2/FMA with a
// degree-7 polynomial (below 1 ulp on the reduced range), in one pass that
// also takes the row maxima and sums. They live in their own translation
// unit, compiled with -mavx2 -mfma and free of torch headers (so no inline
// torch code is ever built for AVX2 by accident), and are called only when
// the CPU has AVX2 and FMA; the kernels fall back to ATen calls otherwise
// and for float64.
#pragma once

#include <cstdint>

namespace nystrom::cpu::simd {

/// True when the vectorised loops were built and this CPU can run them.
bool available();

/// Row-wise on a (rows x cols) float matrix with row stride ld:
/// x[r][c] <- exp(x[r][c] - max_r); max[r] = max_c x[r][c]; sum[r] = sum_c x[r][c] (after the exp);
/// with normalize, also x[r][c] <- x[r][c] / sum[r].
void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld, float* max, float* sum, bool normalize);

/// Row-wise: x[r][c] <- exp(x[r][c] - offset[r]).
void exp_shifted_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* offset);

}  // namespace nystrom::cpu::simd
