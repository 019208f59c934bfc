// Internal: the Newton–Schulz pseudoinverse of docs/DESIGN.md §2 step 4 and its exact
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

// Every product and difference writes into buffers made once per call: at
// these sizes (a few hundred KiB per stack) a fresh tensor each step costs
// more in page faults than the arithmetic.
struct NewtonSchulzBuffers {
  at::Tensor X, Y, T;  // (..., mq, mq), for A (..., mq, mk)
  explicit NewtonSchulzBuffers(const at::Tensor& A) {
    std::vector<int64_t> s(A.sizes().begin(), A.sizes().end());
    s.back() = A.size(-2);
    X = at::empty(s, A.options());
    Y = at::empty(s, A.options());
    T = at::empty(s, A.options());
  }
};

// Z_next = 1/4 Z (13I - X(15I - X(7I - X))) with X = A Z, into `out`.
inline void newton_schulz_step(const at::Tensor& A, const at::Tensor& Z, const at::Tensor& I, NewtonSchulzBuffers& b,
                               at::Tensor& out) {
  at::matmul_out(b.X, A, Z);
  at::sub_out(b.T, I * 7, b.X);
  at::matmul_out(b.Y, b.X, b.T);
  at::sub_out(b.T, I * 15, b.Y);
  at::matmul_out(b.Y, b.X, b.T);
  at::sub_out(b.T, I * 13, b.Y);
  at::matmul_out(out, Z, b.T);
  out.mul_(0.25);
}

/// Z_0 = Aᵀ / c, then `iterations` times Z <- 1/4 Z (13I - AZ(15I - AZ(7I - AZ))).
/// c broadcasts against (..., 1, 1). Returns every iterate Z_0 .. Z_T.
inline std::vector<at::Tensor> newton_schulz_iterates(const at::Tensor& A, const at::Tensor& c, int64_t iterations) {
  std::vector<at::Tensor> Z;
  Z.reserve(iterations + 1);
  Z.push_back(A.transpose(-1, -2).div(c));
  const at::Tensor I = at::eye(A.size(-2), A.options());
  NewtonSchulzBuffers buf(A);
  for (int64_t t = 0; t < iterations; ++t) {
    at::Tensor next = at::empty_like(Z.back());
    newton_schulz_step(A, Z.back(), I, buf, next);
    Z.push_back(next);
  }
  return Z;
}

/// The last iterate only (what the forward needs), without keeping the others.
inline at::Tensor newton_schulz_last(const at::Tensor& A, const at::Tensor& c, int64_t iterations) {
  at::Tensor Z = A.transpose(-1, -2).div(c);
  const at::Tensor I = at::eye(A.size(-2), A.options());
  NewtonSchulzBuffers buf(A);
  at::Tensor next = at::empty_like(Z);
  for (int64_t t = 0; t < iterations; ++t) {
    newton_schulz_step(A, Z, I, buf, next);
    std::swap(Z, next);
  }
  return Z;
}

/// Given dL/dZ_T, the exact dL/dA through every iteration and Z_0, and dL/dc
/// (..., 1, 1) (c enters through Z_0 only).
inline std::pair<at::Tensor, at::Tensor> newton_schulz_backward(const at::Tensor& A, const at::Tensor& c,
                                                                const std::vector<at::Tensor>& Z, at::Tensor dZ) {
  const at::Tensor I = at::eye(A.size(-2), A.options());
  const at::Tensor I7 = I * 7, I13 = I * 13, I15 = I * 15;
  const at::Tensor At = A.transpose(-1, -2);
  at::Tensor dA = at::zeros_like(A);
  // Z is (..., mk, mq) and A (..., mq, mk): X = A Z and the Y's are (..., mq, mq).
  const auto zs = Z[0].sizes();
  auto buf = [&](bool square_q) {
    std::vector<int64_t> s(zs.begin(), zs.end());
    if (square_q) s[s.size() - 2] = s[s.size() - 1];
    return at::empty(s, A.options());
  };
  at::Tensor X = buf(true), Y1 = buf(true), Y2 = buf(true), Y3 = buf(true), dY1 = buf(true), dY2 = buf(true),
             dX = buf(true), tmp = buf(true);
  at::Tensor dZt = buf(false), tmpz = buf(false);
  at::Tensor dAt = at::empty_like(A);
  for (int64_t t = static_cast<int64_t>(Z.size()) - 2; t >= 0; --t) {
    const at::Tensor& Zt = Z[t];
    at::matmul_out(X, A, Zt);
    const at::Tensor Xt = X.transpose(-1, -2);
    at::sub_out(Y3, I7, X);
    at::matmul_out(tmp, X, Y3);
    at::sub_out(Y2, I15, tmp);
    at::matmul_out(tmp, X, Y2);
    at::sub_out(Y1, I13, tmp);
    // Z_{t+1} = 1/4 Zt Y1
    at::matmul_out(dY1, Zt.transpose(-1, -2), dZ).mul_(0.25);
    at::matmul_out(dZt, dZ, Y1.transpose(-1, -2)).mul_(0.25);
    // Y1 = 13 I - X Y2;  Y2 = 15 I - X Y3;  Y3 = 7 I - X;  X = A Zt
    at::matmul_out(dX, dY1, Y2.transpose(-1, -2)).neg_();
    at::matmul_out(dY2, Xt, dY1).neg_();
    dX.sub_(at::matmul_out(tmp, dY2, Y3.transpose(-1, -2)));
    dX.add_(at::matmul_out(tmp, Xt, dY2));  // dY3 = -Xᵀ dY2, and Y3 = 7I - X gives dX -= dY3
    dA.add_(at::matmul_out(dAt, dX, Zt.transpose(-1, -2)));
    dZt.add_(at::matmul_out(tmpz, At, dX));
    dZ = dZt.clone();
  }
  // Z_0 = Aᵀ / c
  dA.add_(dZ.transpose(-1, -2).div(c));
  at::Tensor dc = (dZ * Z[0]).sum({-2, -1}, /*keepdim=*/true).neg_().div_(c);
  return {dA, dc};
}

}  // namespace nystrom::detail
