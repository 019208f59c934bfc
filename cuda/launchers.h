// Launchers of the CUDA kernels of Nyström attention. This header and the
// kernels behind it are free of torch: raw pointers, sizes, element strides
// and a cudaStream_t. The torch-facing glue in csrc/cuda/ turns tensors into
// these calls; launchers.cu implements them (a switch over the dtype into the
// launch templates of launch_templates.cuh). docs/DESIGN.md §7. Every launcher returns the launch's cudaError_t (cudaSuccess when
// nothing went wrong), never throws.
//
// Conventions. "acc" is the compute type: double for kFloat64 inputs, float
// otherwise. Tensors written by the glue itself (landmarks, Bm·V, statistics,
// gradients in acc) are contiguous; inputs and outputs in the caller's dtype
// are addressed through a RowsView (last dimension contiguous). Padding is
// removed by index lists: row r of batch element b is position index[b*npad+r]
// (r < its real count), or position r when index is null.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace nystrom::cuda {

enum class DType { kFloat32, kFloat64, kFloat16, kBFloat16 };

/// The largest head dimension (D and Dv) the CUDA kernels take.
constexpr int kMaxHeadDim = 256;

/// Rows of a (B, H, n, d) tensor whose last dimension is contiguous.
struct RowsView {
  const void* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;  // element strides of batch, head, row
  const int* index = nullptr;      // (B, npad) positions of the real rows, or null
  int npad = 0;                    // padded length (the row stride of index)
};

/// Writable rows, same conventions.
struct MutRowsView {
  void* data = nullptr;
  int64_t sb = 0, sh = 0, sr = 0;
  const int* index = nullptr;
  int npad = 0;
};

/// One call's sizes and per-batch-element real lengths.
struct Problem {
  int B = 0, H = 0;        // batch, heads
  int L = 0, S = 0;        // padded query and key lengths
  int D = 0, Dv = 0;       // head dims of query/key and of value
  int m = 0;               // num_landmarks
  int ms = 0;              // landmark rows of the saved tensors: min(m, max(L, S))
  double scale = 1.0;      // softmax scale
  const int* q_count = nullptr;  // (B) real queries, or null: all L
  const int* k_count = nullptr;  // (B) real keys, or null: all S
  bool tensor_cores = true;      // float16/bfloat16: tensor-core forward where the shape allows
  bool tc_backward = true;       // and the tensor-core backward (with tensor_cores; NYSTROM_CUDA_TC_BACKWARD)
  int tc_stages = 2;             // its owner-row buffers: 2 = the next tile in flight where it fits (NYSTROM_CUDA_TC_STAGES)
  // The device, as the glue read it from its properties (the launchers make
  // no device query of their own, so no error state is left behind):
  int sm_count = 132;            // multiprocessors: grids are sized to fill them
  size_t smem_optin = 48 * 1024; // most dynamic shared memory a block may opt in to
};

/// Which side of the attention a per-token operation works on.
enum class Side { kQuery = 0, kKey = 1 };
/// Which batch elements an operation touches (element.h, docs/DESIGN.md §2 step 1).
enum class Only { kAll = 0, kExact = 1, kNystrom = 2 };

/// Segment means: out (B, H, ms, d) acc gets, for every selected element,
/// its min(m, n_b) landmarks of the real rows of x (the rest is left alone).
cudaError_t pool_landmarks(DType dt, const Problem& p, Side side, Only only, RowsView x, int d, void* out,
                           cudaStream_t stream);

/// Rows per thread block of the long-product kernels (for sizing grids).
int rows_per_block(DType dt);

/// Thread blocks per head and key split of the Bm·V pass: 1 where the
/// tensor-core kernel serves the call (its block holds all ms <= 64 landmark
/// rows), else ceil(ms / rows_per_block).
int landmark_blocks_per_head(DType dt, const Problem& p);

/// Dynamic shared memory of the forward and backward long-product kernels.
size_t softmax_matmul_smem(DType dt, int D, int Dv);
size_t backward_smem(DType dt, int D, int Dv);

/// Whether landmark_partials can pool the key landmarks of the Nyström
/// elements while it streams their keys (the tensor-core Bm·V kernel serves
/// the call): then the forward passes part_klm and k_lm and reads k once.
bool landmark_pass_pools_keys(DType dt, const Problem& p);

/// Bm·V, split over the keys: for every Nyström element, partial row maxima,
/// row sums and unnormalised products of softmax(scale q̃ kᵀ) v over `splits`
/// key ranges: part_max/part_sum (B*H, splits, ms), part_acc (B*H, splits, ms, Dv).
/// part_klm (only where landmark_pass_pools_keys, else null): the float sums
/// of each key segment's rows within each split, (B*H, splits, ms, D), written
/// at the (split, segment) pairs that meet.
cudaError_t landmark_partials(DType dt, const Problem& p, const void* q_lm, RowsView k, RowsView v, int splits,
                              void* part_max, void* part_sum, void* part_acc, void* part_klm, cudaStream_t stream);

/// Merges the partials: bv (B, H, ms, Dv) = Bm·V and lse_l (B, H, ms); with
/// part_klm (landmark_partials' key sums) also the key landmarks of the
/// Nyström elements, k_lm (B, H, ms, D) float (the rest is left alone).
cudaError_t merge_partials(DType dt, const Problem& p, int splits, const void* part_max, const void* part_sum,
                           const void* part_acc, void* bv, void* lse_l, const void* part_klm, void* k_lm,
                           cudaStream_t stream);

/// out rows = softmax(scale q k̃ᵀ)·W for every non-empty element, with the
/// row log-sum-exp in lse_q (B, H, L) at the real positions. k̃ = k_lm
/// (B, H, ms, D), W (B, H, ms, Dv), both acc; min(m, S_b) rows used.
cudaError_t query_rows(DType dt, const Problem& p, RowsView q, const void* k_lm, const void* w, MutRowsView out,
                       void* lse_q, cudaStream_t stream);

/// Bytes of shared memory of the fused Newton–Schulz kernel for ms landmark
/// rows; 0 when no fused variant exists for that size and dtype.
size_t newton_schulz_smem(DType dt, int ms);

/// Fused Newton–Schulz, one thread block per (b, h): Z_0 = Aᵀ / c, the
/// iterations, then zbv = Z·bv. A (B*H, ms, ms) zero outside each element's
/// (mq x mk) block, c (B*H), bv (B*H, ms, Dv); all acc.
cudaError_t newton_schulz_fused(DType dt, int heads, int ms, int Dv, int iterations, const void* A, const void* c,
                                const void* bv, void* zbv, cudaStream_t stream);

/// Bytes of shared memory of the fused m x m backward for ms landmark rows; 0
/// when no fused variant exists for that size and dtype (the glue then takes
/// the batched ATen path). mm_backward_workspace: acc elements of its
/// workspace per head (A and the iterates Z_0 .. Z_T, padded).
size_t mm_backward_smem(DType dt, int ms);
size_t mm_backward_workspace(DType dt, int ms, int iterations);

/// The fused m x m backward, one thread block per (b, h) (plus one block for
/// pinv_init="original"): from the query side's partials part_dkl
/// (B*H, groups, ms, D) and part_dw (B*H, groups, ms, Dv), q̃, k̃, bv and c
/// (B*H) it writes, all acc: dw (B*H, ms, Dv) and dkl (B*H, ms, D), the
/// partials summed, every head; for Nyström heads dkl += scale·dS_Aᵀq̃,
/// dql = scale·dS_A·k̃, dbv = Z_Tᵀ·dW, delta = rowsum(dbv∘bv) (0 for the other
/// heads); aux (B*H, 3) = dc, the largest column sum, its column. work:
/// mm_backward_workspace elements per head.
cudaError_t mm_backward(DType dt, const Problem& p, int iterations, bool original, int groups, const void* q_lm,
                        const void* k_lm, const void* bv, const void* c, const void* part_dkl, const void* part_dw,
                        void* dw, void* dkl, void* dql, void* dbv, void* delta, void* aux, void* work,
                        cudaStream_t stream);

/// Backward, query side (CUDA cores; the tensor-core variant is
/// backward_query_tc), every non-empty element: recomputes
/// F = softmax(scale q k̃ᵀ) from lse_q; dq (B, H, L, D) acc = scale·dS·k̃ at the
/// real rows; per group of query tiles g < groups: part_dkl (B*H, groups, ms, D)
/// += scale·dSᵀ q, part_dw (B*H, groups, ms, Dv) += Fᵀ dO.
cudaError_t backward_query(DType dt, const Problem& p, RowsView q, RowsView dout, const void* k_lm, const void* w,
                           const void* lse_q, int groups, void* dq, void* part_dkl, void* part_dw,
                           cudaStream_t stream);

/// Backward, key side (CUDA cores; the tensor-core variant is backward_key_tc),
/// every Nyström element: recomputes
/// Bm = softmax(scale q̃ kᵀ) from lse_l; dk (B, H, S, D) += scale·dSᵀ q̃,
/// dv (B, H, S, Dv) += Bmᵀ dbv at the real rows; per group of key tiles:
/// part_dql (B*H, groups, ms, D) += scale·dS k. delta (B*H, ms) = rowsum(dbv∘bv).
cudaError_t backward_key(DType dt, const Problem& p, RowsView k, RowsView v, const void* q_lm, const void* lse_l,
                         const void* dbv, const void* delta, int groups, void* dk, void* dv, void* part_dql,
                         cudaStream_t stream);

/// The tensor-core backward (float16/bfloat16, D and Dv in {64, 128}, ms <= 64,
/// its shared memory on this device, NYSTROM_CUDA_TENSOR_CORES and
/// NYSTROM_CUDA_TC_BACKWARD on): whether it serves the query side (then
/// backward_query_tc and backward_dq_tc replace backward_query and the spread
/// of dq̃) or the key side (backward_key_tc replaces backward_key and the
/// spreads of dk̃ and, for exact elements, dW). Its gradients are written once,
/// in the input dtype, into contiguous (B, H, n, d) tensors: no zero fill, no
/// spread, no conversion. The sides are decided separately (sm_80 at
/// D = Dv = 128 has the key side only).
bool tc_backward_serves(DType dt, const Problem& p, Side side);

/// The passes of the tensor-core backward, for tc_backward_blocks_per_sm.
enum class TcPass { kQuerySide = 0, kKeySide = 1, kDq = 2 };
/// Rows of one tile of the tensor-core backward passes (4 warps x 16 rows).
constexpr int kTcTileRows = 64;
/// Blocks of that pass resident per multiprocessor, as its shared memory for
/// p's head dims allows (grid.h: blocks_by_smem); 1 for other dtypes.
int tc_backward_blocks_per_sm(DType dt, const Problem& p, TcPass pass);

/// Rounded dS rows of the tensor-core query side: (B*H, L, kTcDsWidth) in the
/// input dtype, real rows in order (row r of element b at r).
constexpr int kTcDsWidth = 64;

/// backward_query on the tensor cores: the same partials, and instead of dq
/// the rows of dS = F∘(dF − δ) rounded to the input dtype into ds.
cudaError_t backward_query_tc(DType dt, const Problem& p, RowsView q, RowsView dout, const void* k_lm, const void* w,
                              const void* lse_q, int groups, void* ds, void* part_dkl, void* part_dw,
                              cudaStream_t stream);

/// backward_key on the tensor cores, after the m x m part: dk (B, H, S, D) and
/// dv (B, H, S, Dv) in the input dtype for every element, written once: for
/// Nyström elements scale·dSᵀq̃ + dkl[segment] / segment size and Bmᵀdbv, for
/// exact elements dkl and dw (acc, (B*H, ms, ·)) at their single-token
/// segments, zero at padded rows and empty elements; part_dql as backward_key.
cudaError_t backward_key_tc(DType dt, const Problem& p, RowsView k, RowsView v, const void* q_lm, const void* lse_l,
                            const void* dbv, const void* delta, const void* dkl, const void* dw, int groups,
                            void* dk, void* dv, void* part_dql, cudaStream_t stream);

/// The last pass of the tensor-core backward, once dql (acc, (B*H, ms, D)) is
/// complete: dq (B, H, L, D) in the input dtype = scale·dS·k̃ (+ dql[segment] /
/// segment size for Nyström elements), zero at padded rows and empty elements.
/// q: the query rows' view (its index list).
cudaError_t backward_dq_tc(DType dt, const Problem& p, RowsView q, const void* k_lm, const void* ds, const void* dql,
                           int groups, void* dq, cudaStream_t stream);

/// dst (B, H, n, d) acc at the real rows += src[segment of the row] / segment
/// size, src (B, H, ms, d): the gradient of a segment mean reaching its tokens.
/// index: the index list of that side (null when it has no padding).
cudaError_t spread_landmarks(DType dt, const Problem& p, Side side, Only only, const void* src, int d,
                             const int* index, void* dst, cudaStream_t stream);

}  // namespace nystrom::cuda
