// Shared helpers of the emulator's own tests (tests/emu/): a fixture that
// leaves the emulator as it found it, and checks on the error a launch left.
#pragma once

#include "seams.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define NYSTROM_EMU_TEST_ASAN 1
#else
#define NYSTROM_EMU_TEST_ASAN 0
#endif

namespace emu = nystrom::emu;

// Every test starts and ends with a clean device, the sm90 profile, the
// in-order schedule and one OS thread.
class Emu : public ::testing::Test {
 protected:
  void SetUp() override { restore(); }
  void TearDown() override { restore(); }
  static void restore() {
    emu::reset();
    emu::set_arch("sm90");
    emu::set_schedule(emu::Schedule{});
    emu::set_threads(1);
  }
};

// The last error must be `code`, with a detail containing every one of `parts`.
inline ::testing::AssertionResult failed_with(cudaError_t code, const std::vector<std::string>& parts) {
  const cudaError_t got = cudaPeekAtLastError();
  const std::string detail = emu::last_error_detail();
  if (got != code) {
    return ::testing::AssertionFailure() << "last error " << cudaGetErrorName(got) << ", expected "
                                         << cudaGetErrorName(code) << " (" << detail << ")";
  }
  for (const std::string& p : parts) {
    if (detail.find(p) == std::string::npos) {
      return ::testing::AssertionFailure() << "detail lacks \"" << p << "\": " << detail;
    }
  }
  return ::testing::AssertionSuccess() << detail;
}

inline bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), [](float x, float y) {
           return std::memcmp(&x, &y, sizeof x) == 0;
         });
}

inline bool any_nan(const std::vector<float>& a) {
  for (float x : a) {
    if (std::isnan(x)) return true;
  }
  return false;
}
