// What the C++ tests share: the op called with a RefConfig, tolerance checks,
// error-message checks, random inputs and the padding masks of the tests.
#pragma once

#include "reference.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace nystrom_test {

inline Tensor call_op(const Tensor& q, const Tensor& k, const Tensor& v, const RefConfig& cfg,
                      const OptTensor& key_padding_mask = std::nullopt,
                      const OptTensor& query_padding_mask = std::nullopt) {
  return nystrom::nystrom_attention(q, k, v, cfg.num_landmarks, cfg.pinv_iterations, cfg.pinv_init,
                                    key_padding_mask, query_padding_mask, cfg.scale);
}

inline void expect_close(const Tensor& actual, const Tensor& expected, double rtol, double atol,
                         const std::string& what) {
  ASSERT_TRUE(actual.defined()) << what << ": result is undefined";
  ASSERT_TRUE(expected.defined()) << what << ": expected is undefined";
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what << ": shapes differ";
  const Tensor a = actual.detach().to(kF64);
  const Tensor e = expected.detach().to(kF64);
  ASSERT_TRUE(torch::isfinite(a).all().item<bool>()) << what << ": non-finite values";
  if (a.numel() == 0) {
    return;
  }
  const Tensor diff = (a - e).abs();
  const bool ok = (diff <= atol + rtol * e.abs()).all().item<bool>();
  EXPECT_TRUE(ok) << what << ": max |diff| = " << diff.max().item<double>()
                  << ", max |expected| = " << e.abs().max().item<double>() << " (rtol " << rtol
                  << ", atol " << atol << ")";
}

// Tolerance relative to the largest magnitude of the expected tensor.
inline void expect_close_scaled(const Tensor& actual, const Tensor& expected, double tol,
                                const std::string& what) {
  const double mag = expected.numel() ? expected.detach().abs().max().item<double>() : 0.0;
  expect_close(actual, expected, tol, tol * std::max(1.0, mag), what);
}

inline std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return s;
}

// The call must throw c10::Error whose message names one of `words`.
template <class Fn>
void expect_error_naming(Fn&& fn, const std::vector<std::string>& words, const std::string& what) {
  EXPECT_THROW(fn(), c10::Error) << what;
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    bool named = false;
    for (const auto& w : words) {
      named = named || msg.find(w) != std::string::npos;
    }
    std::ostringstream expected;
    for (const auto& w : words) {
      expected << " '" << w << "'";
    }
    EXPECT_TRUE(named) << what << ": the message should name" << expected.str()
                       << "; it was: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": expected c10::Error, got std::exception: " << e.what();
  }
}

struct QKV {
  Tensor q, k, v;
};

inline QKV random_qkv(int64_t B, int64_t H, int64_t L, int64_t S, int64_t D, int64_t Dv,
                      torch::Dtype dtype = kF64) {
  auto opts = torch::TensorOptions().dtype(dtype);
  return {torch::randn({B, H, L, D}, opts), torch::randn({B, H, S, D}, opts),
          torch::randn({B, H, S, Dv}, opts)};
}

inline Tensor leaf(const Tensor& t) { return t.detach().clone().requires_grad_(true); }

// b0: no padding; b1: trailing padding; b2: scattered padding; b3: 5 real
// tokens (<= m: exact branch for that element only).
inline Tensor make_mask(int64_t n) {
  Tensor mask = torch::zeros({4, n}, torch::kBool);
  mask[1].slice(0, n - 9, n).fill_(true);
  mask[2].slice(0, 0, n, 3).fill_(true);
  mask[2][n - 1] = true;
  mask[3].slice(0, 5, n).fill_(true);
  return mask;
}

}  // namespace nystrom_test
