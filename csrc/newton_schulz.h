// Internal: the Newton–Schulz pseudoinverse of DESIGN.md step 4 and its exact
// derivative, in batched ATen products over a stack of (B, H) matrices. The
// CPU kernels and the CUDA glue (its cuBLAS path and its backward) share it.
//
// A (..., mq, mk) may be a zero-padded stack: heads of different sizes, and
// heads off the Nyström path (A = 0, c = 1), in one tensor. Zero padding
// stays zero through every iteration, so each head's block is exactly what it
// would be on its own, and so is its gradient.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

namespace nystrom::detail {

/// Z_0 = Aᵀ / c, then `iterations` times Z <- 1/4 Z (13I - AZ(15I - AZ(7I - AZ))).
/// c broadcasts against (..., 1, 1). Returns every iterate Z_0 .. Z_T.
inline std::vector<at::Tensor> newton_schulz_iterates(const at::Tensor& A, const at::Tensor& c, int64_t iterations) {
  std::vector<at::Tensor> Z;
  Z.reserve(iterations + 1);
  Z.push_back(A.transpose(-1, -2).div(c));
  const at::Tensor I = at::eye(A.size(-2), A.options());
  const at::Tensor I7 = I * 7, I15 = I * 15, I13 = I * 13;
  for (int64_t t = 0; t < iterations; ++t) {
    const at::Tensor& Zt = Z.back();
    at::Tensor X = at::matmul(A, Zt);
    at::Tensor Y = at::matmul(X, I7 - X);
    Y = at::matmul(X, I15 - Y);
    Z.push_back(at::matmul(Zt, I13 - Y).mul_(0.25));
  }
  return Z;
}

/// The last iterate only (what the forward needs), without keeping the others.
inline at::Tensor newton_schulz_last(const at::Tensor& A, const at::Tensor& c, int64_t iterations) {
  at::Tensor Z = A.transpose(-1, -2).div(c);
  const at::Tensor I = at::eye(A.size(-2), A.options());
  const at::Tensor I7 = I * 7, I15 = I * 15, I13 = I * 13;
  for (int64_t t = 0; t < iterations; ++t) {
    at::Tensor X = at::matmul(A, Z);
    at::Tensor Y = at::matmul(X, I7 - X);
    Y = at::matmul(X, I15 - Y);
    Z = at::matmul(Z, I13 - Y).mul_(0.25);
  }
  return Z;
}

/// Given dL/dZ_T, the exact dL/dA through every iteration and Z_0, and dL/dc
/// (..., 1, 1) (c enters through Z_0 only).
inline std::pair<at::Tensor, at::Tensor> newton_schulz_backward(const at::Tensor& A, const at::Tensor& c,
                                                                const std::vector<at::Tensor>& Z, at::Tensor dZ) {
  const at::Tensor I = at::eye(A.size(-2), A.options());
  const at::Tensor At = A.transpose(-1, -2);
  at::Tensor dA = at::zeros_like(A);
  for (int64_t t = static_cast<int64_t>(Z.size()) - 2; t >= 0; --t) {
    const at::Tensor& Zt = Z[t];
    at::Tensor X = at::matmul(A, Zt);
    at::Tensor Xt = X.transpose(-1, -2);
    at::Tensor Y3 = I * 7 - X;
    at::Tensor Y2 = I * 15 - at::matmul(X, Y3);
    at::Tensor Y1 = I * 13 - at::matmul(X, Y2);
    // Z_{t+1} = 1/4 Zt Y1
    at::Tensor dY1 = at::matmul(Zt.transpose(-1, -2), dZ).mul_(0.25);
    at::Tensor dZt = at::matmul(dZ, Y1.transpose(-1, -2)).mul_(0.25);
    // Y1 = 13 I - X Y2;  Y2 = 15 I - X Y3;  Y3 = 7 I - X;  X = A Zt
    at::Tensor dX = -at::matmul(dY1, Y2.transpose(-1, -2));
    at::Tensor dY2 = -at::matmul(Xt, dY1);
    dX.sub_(at::matmul(dY2, Y3.transpose(-1, -2)));
    dX.add_(at::matmul(Xt, dY2));  // dY3 = -Xᵀ dY2, and Y3 = 7I - X gives dX -= dY3
    dA.add_(at::matmul(dX, Zt.transpose(-1, -2)));
    dZt.add_(at::matmul(At, dX));
    dZ = dZt;
  }
  // Z_0 = Aᵀ / c
  dA.add_(dZ.transpose(-1, -2).div(c));
  at::Tensor dc = (dZ * Z[0]).sum({-2, -1}, /*keepdim=*/true).neg_().div_(c);
  return {dA, dc};
}

}  // namespace nystrom::detail
