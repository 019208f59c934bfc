// Launch templates, one instantiation per input dtype (inst_*.cu); the
// dtype switch lives in launchers.cu, the switches from sizes to template
// parameters in static_switch.h. Heads are launched in slices of at most
// 65535 (the grid's y/z limit), and every launch is checked. docs/DESIGN.md §7.
#pragma once

#include "backward_kernels.cuh"
#include "backward_tc_kernels.cuh"
#include "forward_kernels.cuh"
#include "forward_tc_kernels.cuh"
#include "mm_backward_kernel.cuh"
#include "newton_schulz_kernel.cuh"
#include "grid.h"
#include "static_switch.h"

#include <algorithm>

namespace nystrom::cuda {
namespace kern {

// Rows per warp of the long-product kernels: 4 (32-row tiles) in float,
// 1 in double, whose staged rows take twice the shared memory.
template <typename T> constexpr int rpw() { return std::is_same<T, double>::value ? 1 : 4; }

template <typename F>
cudaError_t for_head_slices(int heads, F&& launch) {
  for (int bh0 = 0; bh0 < heads; bh0 += kMaxBlockHeads) {
    launch(bh0, std::min(kMaxBlockHeads, heads - bh0));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Opts the kernel in to `bytes` of dynamic shared memory. A refusal is
// returned, and taken off the runtime's last-error slot so that it is not
// reported later as the error of unrelated code.
template <typename Kernel>
cudaError_t set_smem(Kernel kernel, size_t bytes) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err;
}

template <typename T>
size_t forward_smem_t(int D, int Dv) {
  using A = typename Acc<T>::type;
  const size_t BR = kWarps * rpw<T>();
  return sizeof(A) * (BR * D + kChunk * (D + 1) + kChunk * Dv + BR * kChunk);
}

template <typename T>
size_t backward_smem_t(int D, int Dv) {
  using A = typename Acc<T>::type;
  const size_t BR = kWarps * rpw<T>();
  return sizeof(A) * (BR * D + BR * Dv + kChunk * (D + 1) + kChunk * (Dv + 1) + 2 * BR * kChunk + 2 * kChunk);
}

template <typename T>
cudaError_t pool_t(const Problem& p, Side side, Only only, RowsView x, int d, void* out, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  return for_head_slices(p.B * p.H, [&](int bh0, int n) {
    NYSTROM_LAUNCH(pool_kernel<T>, dim3(p.ms, n), kThreads, 0, stream)(p, bh0, side, only, x, d, static_cast<A*>(out));
  });
}

template <typename TX, typename TY, typename TO, typename A, int RPW, int NJ, bool kLandmarkPass>
cudaError_t forward_launch(const ForwardArgs& args, int tiles, int splits, size_t smem, cudaStream_t stream) {
  auto kernel = softmax_matmul_kernel<TX, TY, TO, A, RPW, NJ, kLandmarkPass>;
  const cudaError_t err = set_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  return for_head_slices(args.p.B * args.p.H, [&](int bh0, int n) {
    ForwardArgs a = args;
    a.bh0 = bh0;
    NYSTROM_LAUNCH(kernel, dim3(tiles, splits, n), kThreads, smem, stream)(a);
  });
}

template <typename T, bool kLandmarkPass>
cudaError_t forward_t(const ForwardArgs& args, int tiles, int splits, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  // Landmark pass: owner rows are q̃ (acc), the other side the inputs (T).
  // Query pass: owner rows are the queries (T), the other side k̃, W (acc).
  using TX = typename std::conditional<kLandmarkPass, A, T>::type;
  using TY = typename std::conditional<kLandmarkPass, T, A>::type;
  constexpr int R = rpw<T>();
  const size_t smem = forward_smem_t<T>(args.p.D, args.p.Dv);
  return with_lane_columns(args.p.D, args.p.Dv, [&](auto nj) {
    return forward_launch<TX, TY, T, A, R, decltype(nj)::value, kLandmarkPass>(args, tiles, splits, smem, stream);
  });
}

template <typename T>
constexpr bool is_half() {
  return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
}

// Resident blocks per SM of `kernel` at `threads` threads and `smem` bytes of
// dynamic shared memory (after set_smem), by the occupancy calculator:
// registers, shared memory and threads on a GPU, the last two in the
// emulation (cuda/emu/runtime.h). 1 if it cannot say.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t smem) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  return std::max(n, 1);
}

// The tensor-core forward kernels, for the (D, Dv) pairs they are built for.
// The query pass's blocks per head come in whole waves of the blocks that are
// resident (grid.h: query_tiles_per_block), each walking its tiles with k̃
// and W converted once.
template <typename T, bool kLandmarkPass>
cudaError_t tc_forward(const ForwardArgs& args, cudaStream_t stream) {
  auto launch = [&](auto kernel, size_t smem) {
    const cudaError_t err = set_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    if constexpr (kLandmarkPass) {
      return for_head_slices(args.p.B * args.p.H, [&](int bh0, int n) {
        ForwardArgs a = args;
        a.bh0 = bh0;
        NYSTROM_LAUNCH(kernel, dim3(1, args.splits, n), kTcWarps * 32, smem, stream)(a);
      });
    } else {
      const Problem& p = args.p;
      const int64_t tiles = (p.L + kTcWarps * kTcRows - 1) / (kTcWarps * kTcRows);
      const int64_t per = query_tiles_per_block(static_cast<int64_t>(p.B) * p.H, tiles,
                                                resident_blocks(kernel, kTcWarps * 32, smem), p.sm_count);
      const int grid_x = static_cast<int>((tiles + per - 1) / per), tiles_per_block = static_cast<int>(per);
      return for_head_slices(args.p.B * args.p.H, [&](int bh0, int n) {
        ForwardArgs a = args;
        a.bh0 = bh0;
        NYSTROM_LAUNCH(kernel, dim3(grid_x, 1, n), kTcWarps * 32, smem, stream)(a, tiles_per_block);
      });
    }
  };
  return with_tc_head_dims(args.p.D, args.p.Dv, [&](auto d, auto dv) {
    constexpr int DD = decltype(d)::value, VV = decltype(dv)::value;
    if constexpr (kLandmarkPass) {
      return launch(tc_landmark_kernel<T, DD, VV>, tc_landmark_smem<T>(DD, VV));
    } else {
      return launch(tc_query_kernel<T, DD, VV>, tc_query_smem<T>(DD, VV));
    }
  });
}

// Whether the tensor-core kernel of one pass serves the problem: its shape
// (forward_tc_kernels.cuh) and its shared memory on this device (D = Dv = 128
// needs about 104 KiB, more than the 99 KiB of sm_86/sm_89/sm_120; the
// generic kernels serve those GPUs instead).
template <typename T, bool kLandmarkPass>
bool tc_usable(const Problem& p) {
  if (!p.tensor_cores || !tc_shape_supported(p.D, p.Dv, p.ms)) return false;
  const size_t need = kLandmarkPass ? tc_landmark_smem<T>(p.D, p.Dv) : tc_query_smem<T>(p.D, p.Dv);
  return need <= p.smem_optin;
}

// Whether the Bm·V pass runs tc_landmark_kernel, which also pools the key
// landmarks of the Nyström elements (landmark_partials' part_klm).
template <typename T>
bool landmark_pools_keys_t(const Problem& p) {
  if constexpr (is_half<T>()) {
    return tc_usable<T, true>(p);
  } else {
    return false;
  }
}

template <typename T>
cudaError_t landmark_partials_t(const Problem& p, const void* q_lm, RowsView k, RowsView v, int splits,
                                void* part_max, void* part_sum, void* part_acc, void* part_klm,
                                cudaStream_t stream) {
  ForwardArgs a{};
  a.p = p;
  a.x = RowsView{q_lm, static_cast<int64_t>(p.H) * p.ms * p.D, static_cast<int64_t>(p.ms) * p.D, p.D, nullptr, 0};
  a.y = k;
  a.v = v;
  a.part_max = part_max;
  a.part_sum = part_sum;
  a.part_acc = part_acc;
  a.splits = splits;
  if constexpr (is_half<T>()) {
    a.part_klm = part_klm;
    if (tc_usable<T, true>(p)) return tc_forward<T, true>(a, stream);
  }
  const int BR = kWarps * rpw<T>();
  return forward_t<T, true>(a, (p.ms + BR - 1) / BR, splits, stream);
}

template <typename T>
cudaError_t merge_t(const Problem& p, int splits, const void* part_max, const void* part_sum, const void* part_acc,
                    void* bv, void* lse_l, const void* part_klm, void* k_lm, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const cudaError_t err = for_head_slices(p.B * p.H, [&](int bh0, int n) {
    NYSTROM_LAUNCH(merge_kernel<A>, dim3(p.ms, n), kThreads, 0, stream)(
        p, bh0, splits, static_cast<const A*>(part_max), static_cast<const A*>(part_sum),
        static_cast<const A*>(part_acc), static_cast<A*>(bv), static_cast<A*>(lse_l));
  });
  if (err != cudaSuccess || part_klm == nullptr) return err;
  if constexpr (is_half<T>()) {
    return for_head_slices(p.B * p.H, [&](int bh0, int n) {
      NYSTROM_LAUNCH(tc_key_landmark_kernel<T>, dim3(p.ms, n), kTcWarps * 32, 0, stream)(
          p, bh0, splits, static_cast<const float*>(part_klm), static_cast<float*>(k_lm));
    });
  } else {
    return cudaErrorInvalidValue;  // only the tensor-core pass writes key partials
  }
}

template <typename T>
cudaError_t query_rows_t(const Problem& p, RowsView q, const void* k_lm, const void* w, MutRowsView out, void* lse_q,
                         cudaStream_t stream) {
  ForwardArgs a{};
  a.p = p;
  a.x = q;
  a.y = RowsView{k_lm, static_cast<int64_t>(p.H) * p.ms * p.D, static_cast<int64_t>(p.ms) * p.D, p.D, nullptr, 0};
  a.v = RowsView{w, static_cast<int64_t>(p.H) * p.ms * p.Dv, static_cast<int64_t>(p.ms) * p.Dv, p.Dv, nullptr, 0};
  a.out = out;
  a.lse = lse_q;
  a.splits = 1;
  if constexpr (is_half<T>()) {
    if (tc_usable<T, false>(p)) return tc_forward<T, false>(a, stream);
  }
  const int BR = kWarps * rpw<T>();
  return forward_t<T, false>(a, (p.L + BR - 1) / BR, 1, stream);
}

template <typename A>
size_t newton_schulz_smem_t(int ms) {
  const size_t mp = ms <= 32 ? 32 : (ms <= 64 ? 64 : (ms <= 128 ? 128 : 0));
  if (mp == 0 || (sizeof(A) == 8 && mp > 64)) return 0;
  return 3 * mp * mp * sizeof(A);
}

template <typename A, int MP>
cudaError_t newton_schulz_launch(int heads, int ms, int Dv, int iterations, const void* Am, const void* c,
                                 const void* bv, void* zbv, cudaStream_t stream) {
  auto kernel = newton_schulz_kernel<A, MP>;
  const size_t smem = 3 * MP * MP * sizeof(A);
  const cudaError_t err = set_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  for (int bh0 = 0; bh0 < heads; bh0 += kMaxBlockHeads) {
    const int n = std::min(kMaxBlockHeads, heads - bh0);
    NYSTROM_LAUNCH(kernel, n, (MP / 4) * (MP / 4), smem, stream)(bh0, ms, Dv, iterations, static_cast<const A*>(Am),
                                                     static_cast<const A*>(c), static_cast<const A*>(bv),
                                                     static_cast<A*>(zbv));
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t newton_schulz_t(int heads, int ms, int Dv, int iterations, const void* Am, const void* c, const void* bv,
                            void* zbv, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  if (newton_schulz_smem_t<A>(ms) == 0) return cudaErrorInvalidValue;
  return with_newton_schulz_size(ms, sizeof(A) == 4, [&](auto mp) {
    constexpr int MP = decltype(mp)::value;
    if constexpr (MP == 128 && sizeof(A) != 4) {
      return cudaErrorInvalidValue;  // never built: 3 x 128^2 doubles exceed any GPU's shared memory
    } else {
      return newton_schulz_launch<A, MP>(heads, ms, Dv, iterations, Am, c, bv, zbv, stream);
    }
  });
}

// The fused m x m backward (mm_backward_kernel.cuh): MP = 32 or 64 (any acc
// type whose eight padded matrices fit: float up to 64, double up to 32).
template <typename A>
constexpr int mm_backward_mp(int ms) {
  return ms <= 32 ? 32 : (ms <= 64 && sizeof(A) == 4 ? 64 : 0);
}

template <typename A>
size_t mm_backward_smem_t(int ms) {
  const int mp = mm_backward_mp<A>(ms);
  return mp == 32 ? mm_backward_smem_bytes<A, 32>() : (mp == 64 ? mm_backward_smem_bytes<A, 64>() : 0);
}

template <typename T>
cudaError_t mm_backward_t(const MmBackwardArgs& args, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  auto run = [&](auto mp) -> cudaError_t {
    constexpr int MP = decltype(mp)::value;
    auto kernel = mm_backward_kernel<A, MP>;
    const size_t smem = mm_backward_smem_bytes<A, MP>();
    cudaError_t err = set_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    err = for_head_slices(args.p.B * args.p.H, [&](int bh0, int n) {
      MmBackwardArgs a = args;
      a.bh0 = bh0;
      NYSTROM_LAUNCH(kernel, dim3(n), mm_threads<MP>(), smem, stream)(a);
    });
    if (err != cudaSuccess || !args.original) return err;
    auto finish = mm_backward_original_kernel<A, MP>;
    const size_t smem2 = sizeof(A) * (MP * MP + 4);
    err = set_smem(finish, smem2);
    if (err != cudaSuccess) return err;
    NYSTROM_LAUNCH(finish, dim3(1), 256, smem2, stream)(args);
    return cudaGetLastError();
  };
  const int mp = mm_backward_mp<A>(args.p.ms);
  if (mp == 32) return run(Int<32>{});
  if constexpr (sizeof(A) == 4) {
    if (mp == 64) return run(Int<64>{});
  }
  return cudaErrorInvalidValue;
}

template <typename Kernel>
cudaError_t backward_launch(Kernel kernel, const BackwardArgs& args, size_t smem, cudaStream_t stream,
                            int threads = kThreads) {
  const cudaError_t err = set_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  return for_head_slices(args.p.B * args.p.H, [&](int bh0, int n) {
    BackwardArgs a = args;
    a.bh0 = bh0;
    NYSTROM_LAUNCH(kernel, dim3(args.groups, n), threads, smem, stream)(a);
  });
}

// Stages (owner-row buffers) one side of the tensor-core backward runs with:
// p.tc_stages where its shared memory fits the device, else 1 where that
// fits, 0 where neither does (D = Dv = 128: query side 224 / 190 KiB, key
// side 190.5 / 156.5 KiB with 2 / 1 stages; sm_80 has 163 KiB, sm_90 227).
template <typename T, bool kKeySide>
int tc_backward_stages(const Problem& p) {
  auto need = [&](int stages) {
    return kKeySide ? tc_backward_key_smem<T>(p.D, p.Dv, stages) : tc_backward_query_smem<T>(p.D, p.Dv, stages);
  };
  if (p.tc_stages >= 2 && need(2) <= p.smem_optin) return 2;
  return need(1) <= p.smem_optin ? 1 : 0;
}

// Whether the tensor-core backward kernel of one side serves the problem: the
// forward's shapes (tc_shape_supported), both switches on, and its shared
// memory with at least one stage on this device (the query side at
// D = Dv = 128 needs 190 KiB: sm_80 takes the CUDA-core kernel there).
template <typename T, bool kKeySide>
bool tc_backward_usable(const Problem& p) {
  if (!p.tensor_cores || !p.tc_backward || !tc_shape_supported(p.D, p.Dv, p.ms)) return false;
  return tc_backward_stages<T, kKeySide>(p) > 0;
}

// The tensor-core backward kernels, for the (D, Dv) pairs they are built for.
template <typename T, bool kKeySide>
cudaError_t tc_backward(const BackwardArgs& a, cudaStream_t stream) {
  return with_tc_head_dims(a.p.D, a.p.Dv, [&](auto d, auto dv) {
    constexpr int DD = decltype(d)::value, VV = decltype(dv)::value;
    BackwardArgs b = a;
    b.stages = tc_backward_stages<T, kKeySide>(a.p);
    if constexpr (kKeySide) {
      return backward_launch(tc_backward_key_kernel<T, DD, VV>, b, tc_backward_key_smem<T>(DD, VV, b.stages), stream,
                             kTcWarps * 32);
    } else {
      return backward_launch(tc_backward_query_kernel<T, DD, VV>, b, tc_backward_query_smem<T>(DD, VV, b.stages),
                             stream, kTcWarps * 32);
    }
  });
}

template <typename T>
cudaError_t backward_query_t(const Problem& p, RowsView q, RowsView dout, const void* k_lm, const void* w,
                             const void* lse_q, int groups, void* dq, void* part_dkl, void* part_dw,
                             cudaStream_t stream) {
  using A = typename Acc<T>::type;
  BackwardArgs a{};
  a.p = p;
  a.groups = groups;
  a.x = q;
  a.g = dout;
  a.lm = k_lm;
  a.lmv = w;
  a.lse = lse_q;
  a.out1 = dq;
  a.part1 = part_dkl;
  a.part2 = part_dw;
  constexpr int R = rpw<T>();
  const size_t smem = backward_smem_t<T>(p.D, p.Dv);
  return with_lane_columns(p.D, p.Dv, [&](auto nj) {
    return backward_launch(backward_query_kernel<T, A, R, decltype(nj)::value>, a, smem, stream);
  });
}

template <typename T>
cudaError_t backward_key_t(const Problem& p, RowsView k, RowsView v, const void* q_lm, const void* lse_l,
                           const void* dbv, const void* delta, int groups, void* dk, void* dv, void* part_dql,
                           cudaStream_t stream) {
  using A = typename Acc<T>::type;
  BackwardArgs a{};
  a.p = p;
  a.groups = groups;
  a.x = k;
  a.g = v;
  a.lm = q_lm;
  a.lmv = dbv;
  a.lse = lse_l;
  a.delta = delta;
  a.out1 = dk;
  a.out2 = dv;
  a.part1 = part_dql;
  constexpr int R = rpw<T>();
  const size_t smem = backward_smem_t<T>(p.D, p.Dv);
  return with_lane_columns(p.D, p.Dv, [&](auto nj) {
    return backward_launch(backward_key_kernel<T, A, R, decltype(nj)::value>, a, smem, stream);
  });
}

// The tensor-core backward (backward_tc_kernels.cuh), gradients in T: the
// glue calls these where tc_backward_usable holds for that side (launchers.h).
template <typename T>
cudaError_t backward_query_tc_t(const Problem& p, RowsView q, RowsView dout, const void* k_lm, const void* w,
                                const void* lse_q, int groups, void* ds, void* part_dkl, void* part_dw,
                                cudaStream_t stream) {
  if constexpr (is_half<T>()) {
    if (!tc_backward_usable<T, false>(p)) return cudaErrorInvalidValue;
    BackwardArgs a{};
    a.p = p;
    a.groups = groups;
    a.x = q;
    a.g = dout;
    a.lm = k_lm;
    a.lmv = w;
    a.lse = lse_q;
    a.out1 = ds;
    a.part1 = part_dkl;
    a.part2 = part_dw;
    return tc_backward<T, false>(a, stream);
  } else {
    return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t backward_key_tc_t(const Problem& p, RowsView k, RowsView v, const void* q_lm, const void* lse_l,
                              const void* dbv, const void* delta, const void* dkl, const void* dw, int groups,
                              void* dk, void* dv, void* part_dql, cudaStream_t stream) {
  if constexpr (is_half<T>()) {
    if (!tc_backward_usable<T, true>(p)) return cudaErrorInvalidValue;
    BackwardArgs a{};
    a.p = p;
    a.groups = groups;
    a.x = k;
    a.g = v;
    a.lm = q_lm;
    a.lmv = dbv;
    a.lse = lse_l;
    a.delta = delta;
    a.share1 = dkl;
    a.share2 = dw;
    a.out1 = dk;
    a.out2 = dv;
    a.part1 = part_dql;
    return tc_backward<T, true>(a, stream);
  } else {
    return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t backward_dq_tc_t(const Problem& p, RowsView q, const void* k_lm, const void* ds, const void* dql,
                             int groups, void* dq, cudaStream_t stream) {
  if constexpr (is_half<T>()) {
    if (!tc_backward_usable<T, false>(p)) return cudaErrorInvalidValue;
    BackwardArgs a{};
    a.p = p;
    a.groups = groups;
    a.x = q;
    a.lm = k_lm;
    a.lmv = ds;
    a.share1 = dql;
    a.out1 = dq;
    return with_tc_head_dims(p.D, p.D, [&](auto d, auto) {
      constexpr int DD = decltype(d)::value;
      return backward_launch(tc_backward_dq_kernel<T, DD>, a, tc_backward_dq_smem<T>(DD), stream, kTcWarps * 32);
    });
  } else {
    return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t spread_t(const Problem& p, Side side, Only only, const void* src, int d, const int* index, void* dst,
                     cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int n = side == Side::kQuery ? p.L : p.S;
  if (n == 0) return cudaSuccess;
  return for_head_slices(p.B * p.H, [&](int bh0, int heads) {
    NYSTROM_LAUNCH(spread_kernel<A>, dim3((n + kWarps - 1) / kWarps, heads), kThreads, 0, stream)(
        p, bh0, side, only, static_cast<const A*>(src), d, index, static_cast<A*>(dst));
  });
}

// Every launcher of one dtype: instantiated in inst_<dtype>.cu (empty PREFIX),
// declared extern in launchers.cu (PREFIX extern).
#define NYSTROM_LAUNCHERS(PREFIX, T)                                                                          \
  PREFIX template cudaError_t pool_t<T>(const Problem&, Side, Only, RowsView, int, void*, cudaStream_t);                 \
  PREFIX template bool landmark_pools_keys_t<T>(const Problem&);                                                        \
  PREFIX template cudaError_t landmark_partials_t<T>(const Problem&, const void*, RowsView, RowsView, int, void*, void*, \
                                              void*, void*, cudaStream_t);                                        \
  PREFIX template cudaError_t merge_t<T>(const Problem&, int, const void*, const void*, const void*, void*, void*,       \
                                  const void*, void*, cudaStream_t);                                              \
  PREFIX template cudaError_t query_rows_t<T>(const Problem&, RowsView, const void*, const void*, MutRowsView, void*,    \
                                       cudaStream_t);                                                             \
  PREFIX template cudaError_t newton_schulz_t<T>(int, int, int, int, const void*, const void*, const void*, void*,       \
                                          cudaStream_t);                                                          \
  PREFIX template cudaError_t backward_query_t<T>(const Problem&, RowsView, RowsView, const void*, const void*,          \
                                           const void*, int, void*, void*, void*, cudaStream_t);                  \
  PREFIX template cudaError_t backward_key_t<T>(const Problem&, RowsView, RowsView, const void*, const void*,            \
                                         const void*, const void*, int, void*, void*, void*, cudaStream_t);       \
  PREFIX template cudaError_t mm_backward_t<T>(const MmBackwardArgs&, cudaStream_t);                                   \
  PREFIX template cudaError_t spread_t<T>(const Problem&, Side, Only, const void*, int, const int*, void*, cudaStream_t); \
  PREFIX template cudaError_t backward_query_tc_t<T>(const Problem&, RowsView, RowsView, const void*, const void*,       \
                                              const void*, int, void*, void*, void*, cudaStream_t);               \
  PREFIX template cudaError_t backward_key_tc_t<T>(const Problem&, RowsView, RowsView, const void*, const void*,         \
                                            const void*, const void*, const void*, const void*, int, void*,       \
                                            void*, void*, cudaStream_t);                                          \
  PREFIX template cudaError_t backward_dq_tc_t<T>(const Problem&, RowsView, const void*, const void*, const void*, int,  \
                                           void*, cudaStream_t);

}  // namespace kern
}  // namespace nystrom::cuda
