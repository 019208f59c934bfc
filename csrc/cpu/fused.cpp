// Forwards the calls of fused.h to the copy of the instruction set chosen in
// isa.h. Compiled without any ISA flag.
#include "cpu/fused.h"

#include "cpu/isa.h"

#include <cstdlib>

namespace nystrom::cpu::fused {

// Callers check isa() != Isa::kNone first; reaching the end is a bug.
#if defined(NYSTROM_X86_SIMD)
#define NYSTROM_FUSED_FORWARD(call)                  \
  switch (isa()) {                                   \
    case Isa::kAvx512: return avx512::call;          \
    case Isa::kAvx2: return avx2::call;              \
    case Isa::kNone: break;                          \
  }                                                  \
  std::abort()
#else
#define NYSTROM_FUSED_FORWARD(call) std::abort()
#endif

void attend_rows(const float* q, int64_t ldq, int64_t rows, int64_t D, const float* kT, int64_t m, int64_t mp,
                 const float* w, int64_t ldw, int64_t Dv, float* out, int64_t ldo, float* lse) {
  NYSTROM_FUSED_FORWARD(attend_rows(q, ldq, rows, D, kT, m, mp, w, ldw, Dv, out, ldo, lse));
}

void key_tile(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,
              const float* qT, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,
              int64_t ldpv) {
  NYSTROM_FUSED_FORWARD(key_tile(k, ldk, v, ldv, rows, D, Dv, qT, m, mp, work, col_max, col_sum, pv, ldpv));
}

void backward_tile(const BackwardTile& t) { NYSTROM_FUSED_FORWARD(backward_tile(t)); }

void newton_schulz(const float* A, float c, int64_t iterations, int64_t n, float* Z, bool keep_all, float* work) {
  NYSTROM_FUSED_FORWARD(newton_schulz(A, c, iterations, n, Z, keep_all, work));
}

double newton_schulz_backward(const float* A, float c, const float* Z, int64_t iterations, int64_t n, float* dZ,
                              float* dA, float* work) {
  NYSTROM_FUSED_FORWARD(newton_schulz_backward(A, c, Z, iterations, n, dZ, dA, work));
}

void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld, float* max, float* sum, bool normalize) {
  NYSTROM_FUSED_FORWARD(softmax_rows(x, rows, cols, ld, max, sum, normalize));
}

void exp_shifted_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* offset) {
  NYSTROM_FUSED_FORWARD(exp_shifted_rows(x, rows, cols, ld, offset));
}

void load_rows(const Rows& in, int64_t r0, int64_t rows, int64_t cols, float* dst, int64_t ldd, int64_t pad_to) {
  NYSTROM_FUSED_FORWARD(load_rows(in, r0, rows, cols, dst, ldd, pad_to));
}

void store_rows(const float* src, int64_t lds, int64_t r0, int64_t rows, int64_t cols, const Rows& out) {
  NYSTROM_FUSED_FORWARD(store_rows(src, lds, r0, rows, cols, out));
}

void segment_sums(const Rows& in, int64_t n, int64_t ms, int64_t d, float* sums) {
  NYSTROM_FUSED_FORWARD(segment_sums(in, n, ms, d, sums));
}

void add_shares_store(const Rows& in, const Rows& out, int64_t r0, int64_t r1, int64_t n, int64_t ms,
                      const float* shares, int64_t cols) {
  NYSTROM_FUSED_FORWARD(add_shares_store(in, out, r0, r1, n, ms, shares, cols));
}
#undef NYSTROM_FUSED_FORWARD

}  // namespace nystrom::cpu::fused
