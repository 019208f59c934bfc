// Internal: fused float32 tile kernels of the CPU forward and backward passes.
//
// The long products run as register-blocked loops with the softmax (or its
// derivative) in between, on a tile of rows while it is in cache: forward,
// q·k̃ᵀ then F·W on query tiles and q̃·kᵀ then Bm·V on key tiles; backward,
// the recomputed probabilities, dP, dS and the four products of each pass.
// No (tile x m) matrix of the query side goes through memory, and no BLAS
// call's packing and set-up is paid: for these thin products (inner
// dimension D or m, 64 in the common case) perf measured MKL's packing and
// scaling at 17% of the forward against 26% in its compute kernel.
//
// Built twice from fused_impl.h, for AVX-512 and for AVX2/FMA, with no torch
// headers; which copy runs is decided once, in isa.h (NYSTROM_CPU_SIMD=0
// turns them off: the kernels then use ATen; =avx2 keeps AVX2 on a CPU that
// has AVX-512, so that tests check both). Callers check isa() != Isa::kNone
// before calling anything here. docs/DESIGN.md §6.
#pragma once

#include <cstdint>

namespace nystrom::cpu::fused {

/// The element type of rows the kernels read or write: float32, or a half
/// type converted lane by lane (exact on the way in; rounded to nearest even
/// on the way out, NaN kept, as c10::BFloat16 and c10::Half do).
enum class Elem : int32_t { kF32 = 0, kBf16 = 1, kF16 = 2 };

/// Rows of one (b, h) slice of a tensor: row r (of the real tokens) starts at
/// p + (idx ? idx[r] : r) * rs elements, its columns cs elements apart.
struct Rows {
  const void* p = nullptr;
  Elem e = Elem::kF32;
  int64_t rs = 0, cs = 1;
  const int64_t* idx = nullptr;
};

/// dst row i (float, dst + i * ldd) = row r0 + i of `in`, columns [0, cols),
/// then zeros up to pad_to (>= cols), for i < rows.
void load_rows(const Rows& in, int64_t r0, int64_t rows, int64_t cols, float* dst, int64_t ldd, int64_t pad_to);

/// Row r0 + i of `out` (out.p written through) = src row i (src + i * lds), columns
/// [0, cols), converted to out.e, for i < rows.
void store_rows(const float* src, int64_t lds, int64_t r0, int64_t rows, int64_t cols, const Rows& out);

/// Real row r of `out` = real row r of the float32 rows `in` plus shares[s]
/// (shares: ms x cols floats, row stride cols; s = the segment of r among n
/// rows cut into ms, element.h), converted to out.e, for r in [r0, r1): the
/// backward's dq, its landmark share added and rounded in one pass. in and out
/// take in.idx; both have unit column stride.
void add_shares_store(const Rows& in, const Rows& out, int64_t r0, int64_t r1, int64_t n, int64_t ms,
                      const float* shares, int64_t cols);

/// sums (ms x d floats, row stride d) = per segment, the sum of the rows of `in`
/// in it, for n real rows cut into ms segments (element.h), in row order.
void segment_sums(const Rows& in, int64_t n, int64_t ms, int64_t d, float* sums);

/// Most (padded) landmarks the fused kernels take.
constexpr int64_t kMaxLandmarksFused = 256;
/// Columns of the packed operands are padded to a multiple of this.
constexpr int64_t kPadColumns = 16;

/// Row-wise on a (rows x cols) float matrix with row stride ld, in place:
/// x[r][c] <- exp(x[r][c] - max_r), max[r] = max_c x[r][c] (before), sum[r] =
/// sum_c of the exponentials; with normalize, then x[r][c] <- x[r][c] / sum[r].
void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld, float* max, float* sum, bool normalize);

/// Row-wise, in place: x[r][c] <- exp(x[r][c] - offset[r]).
void exp_shifted_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* offset);

/// Query side, for `rows` rows q_i (q + i * ldq, D floats each):
///   s = q_i · kT over the first m of mp columns (kT: D x mp row-major, the
///   softmax scale folded in, mp a multiple of kPadColumns, mp <= kMaxLandmarksFused);
///   lse[i] = log(sum exp s); out_i (out + i * ldo, Dv floats) = softmax(s) · w,
///   w: mp x ldw row-major, rows >= m zero, ldw >= Dv rounded up to kPadColumns
///   (columns past Dv are read, never used).
void attend_rows(const float* q, int64_t ldq, int64_t rows, int64_t D, const float* kT, int64_t m, int64_t mp,
                 const float* w, int64_t ldw, int64_t Dv, float* out, int64_t ldo, float* lse);

/// Key side, for a tile of `rows` (>= 1) keys k_i (k + i * ldk, D floats) and
/// values v_i (v + i * ldv, readable up to Dv rounded up to kPadColumns):
///   S = k · qT (qT: D x mp as kT above) into work (rows x mp);
///   col_max[j] = max_i S[i][j]; P = exp(S - col_max) in work; col_sum[j] = sum_i P[i][j];
///   pv (m x Dv, row stride ldpv) = Pᵀ · v.
/// col_max and col_sum hold mp floats (entries past m are meaningless).
void key_tile(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,
              const float* qT, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,
              int64_t ldpv);

/// Backward of one tile of rows (the query pass and the key pass share it).
/// For each row i (x_i: D floats at x + i * ldx, readable up to D rounded up
/// to kPadColumns; y_i: Dv floats at y + i * ldy, likewise):
///   P_i = exp(x_i · b1 - off) over mp columns, with off = row_offset[i] (query
///   pass: the saved log-sum-exp) or col_offset[j] (key pass);
///   G_i = y_i · b2; X_i = (G_i - d) * P_i with d = sum_j P_ij G_ij (row_offset
///   given) or col_dot[j];
///   out1_i (D floats) = X_i · c1; out2_i (Dv floats) = P_i · c2 when c2 is given;
/// and over the tile t1 (m x D) = Xᵀ · x, t2 (m x Dv) = Pᵀ · y when t2 is given.
/// b1: D x mp, b2: Dv x mp (zero past m), c1: mp x ldc1, c2: mp x ldc2 (rows >= m
/// zero, ldc >= width rounded up to kPadColumns); pbuf and xbuf: rows x mp scratch.
/// Row: the element type of x and y (float here; bfloat16 bits for
/// fused_bf16.h's tile), Operand: that of b1, b2, c1 (float here; bfloat16
/// pairs there); pairs and rbuf are the bfloat16 tile's scratch.
template <typename Row, typename Operand>
struct BackwardTileOf {
  const Row* x = nullptr;
  int64_t ldx = 0;
  const Row* y = nullptr;
  int64_t ldy = 0;
  int64_t rows = 0, D = 0, Dv = 0, m = 0, mp = 0;
  const Operand* b1 = nullptr;
  const Operand* b2 = nullptr;
  const float* row_offset = nullptr;
  const float* col_offset = nullptr;
  const float* col_dot = nullptr;
  const Operand* c1 = nullptr;
  int64_t ldc1 = 0;
  float* out1 = nullptr;
  int64_t ldo1 = 0;
  const float* c2 = nullptr;
  int64_t ldc2 = 0;
  float* out2 = nullptr;
  int64_t ldo2 = 0;
  float* pbuf = nullptr;
  float* xbuf = nullptr;
  uint32_t* pairs = nullptr;
  uint32_t* rbuf = nullptr;
  float* t1 = nullptr;
  int64_t ldt1 = 0;
  float* t2 = nullptr;
  int64_t ldt2 = 0;
};
using BackwardTile = BackwardTileOf<float, float>;
void backward_tile(const BackwardTile& t);

/// The Newton–Schulz pseudoinverse of one head (docs/DESIGN.md §2 step 4) on an n x n
/// row-major A, n a multiple of kPadColumns, zero-padded: Z_0 = Aᵀ / c, then
/// `iterations` times Z <- 1/4 Z (13I - AZ(15I - AZ(7I - AZ))). Writes Z_0 ..
/// Z_T (iterations + 1 matrices) to Z when keep_all, else Z_T only. work: 6 n*n floats.
void newton_schulz(const float* A, float c, int64_t iterations, int64_t n, float* Z, bool keep_all, float* work);
/// Its exact derivative: given the iterates Z_0 .. Z_T and dZ = dL/dZ_T
/// (overwritten), writes dL/dA to dA and returns dL/dc. work: 10 n*n floats.
double newton_schulz_backward(const float* A, float c, const float* Z, int64_t iterations, int64_t n, float* dZ,
                              float* dA, float* work);

// One copy per instruction set (fused_avx2.cpp, fused_avx512.cpp).
#define NYSTROM_DECLARE_FUSED(ns)                                                                             \
  namespace ns {                                                                                                    \
  void attend_rows(const float* q, int64_t ldq, int64_t rows, int64_t D, const float* kT, int64_t m, int64_t mp, \
                   const float* w, int64_t ldw, int64_t Dv, float* out, int64_t ldo, float* lse);                \
  void key_tile(const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t rows, int64_t D, int64_t Dv,   \
                const float* qT, int64_t m, int64_t mp, float* work, float* col_max, float* col_sum, float* pv,   \
                int64_t ldpv);                                                                                    \
  void backward_tile(const BackwardTile& t);                                                                        \
  void newton_schulz(const float* A, float c, int64_t iterations, int64_t n, float* Z, bool keep_all, float* work); \
  double newton_schulz_backward(const float* A, float c, const float* Z, int64_t iterations, int64_t n, float* dZ, \
                                float* dA, float* work);                                                            \
  void softmax_rows(float* x, int64_t rows, int64_t cols, int64_t ld, float* max, float* sum, bool normalize);      \
  void exp_shifted_rows(float* x, int64_t rows, int64_t cols, int64_t ld, const float* offset);                   \
  void load_rows(const Rows& in, int64_t r0, int64_t rows, int64_t cols, float* dst, int64_t ldd, int64_t pad_to);  \
  void store_rows(const float* src, int64_t lds, int64_t r0, int64_t rows, int64_t cols, const Rows& out);        \
  void segment_sums(const Rows& in, int64_t n, int64_t ms, int64_t d, float* sums);                               \
  void add_shares_store(const Rows& in, const Rows& out, int64_t r0, int64_t r1, int64_t n, int64_t ms,            \
                        const float* shares, int64_t cols);                                                         \
  }
NYSTROM_DECLARE_FUSED(avx2)
NYSTROM_DECLARE_FUSED(avx512)
#undef NYSTROM_DECLARE_FUSED

}  // namespace nystrom::cpu::fused
