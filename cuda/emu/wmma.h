// nvcuda::wmma for the CUDA emulation: 16x16x16 fragments, matrix_a and
// matrix_b row_major or col_major (__half or __nv_bfloat16), float
// accumulators; fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync.
//
// A fragment is a 16x16 tile of which, as on a GPU, each lane holds a share:
// here the 8 elements 8*lane .. 8*lane+7 of the row-major tile (a real
// fragment's layout is unspecified, which is why its elements are not
// accessible: there is no x[] / num_elements, and code that indexes them does
// not compile). fill_fragment, load_matrix_sync and store_matrix_sync act on
// the calling lane's share at once, without waiting for the other lanes, as
// the hardware does: a __syncwarp missing between other lanes' writes and a
// load, or between a store and other lanes' reads, shows under some schedule.
// mma_sync is the collective: when all 32 lanes are there it gathers the
// shares, computes d = c + a*b (elements widened to float, each dot product
// summed in float in k order; real tensor cores sum in an order and with
// roundings of their own) and gives every lane all of d.
//
// Shared-memory traffic (a model, for the bank-conflict counts of
// torch.ops.nystrom._emulator("banks"); the real fragment layout is not
// documented, the model is that of the mma.sync m16n8k16 operands, which the
// SASS of these loads matches: 32-bit LDS for 16-bit tiles, 64-bit for float).
// A tile is 16 lines of 16 elements, `ldm` elements apart in memory (rows for
// row-major storage, columns for column-major). Each of a load's or store's 4
// instructions has lane (g, t) = (lane / 4, lane % 4) touch line g or g + 8:
// 16-bit tiles the 4-byte word t or t + 4 of the line, float tiles the 8 bytes
// at float 2t or 2t + 8. The lanes served together (the warp for 4-byte
// words, each half warp for 8-byte ones) take as many wavefronts as the most
// words any of the 32 banks holds; the ideal is their words / 32. With the
// line pitch a multiple of 128 bytes every line starts on bank 0: 8 lines on
// the same 4 banks (16-bit, 8-way) or 4 lines on the same 8 (float, 4-way);
// a pitch longer by 8 elements (16 bytes for 16-bit tiles, 32 for float
// ones) spreads the lines over all 32 banks: the ideal.
//
// Checks (kernel faults naming the site): memory operands 256-bit aligned
// and ldm a multiple of 16 bytes, as CUDA requires; and, at every warp
// collective and when a warp's last lane returns, all 32 lanes must have made
// the same fill/load/store calls since the warp's previous collective: same
// sites, same pointers, ldm, layouts and fill values.
#pragma once

#include "device.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulated WMMA has only 16x16x16 fragments");
  static_assert(std::is_same<Use, accumulator>::value
                    ? std::is_same<T, float>::value && std::is_same<Layout, void>::value
                    : (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value) &&
                          (std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value),
                "emulated WMMA fragments: matrix_a/matrix_b of __half or __nv_bfloat16 with a layout, "
                "accumulator of float");

 public:
  using element_type = T;
  // Logical row-major tile: a is [m][k], b is [k][n], an accumulator [m][n].
  // A lane's share is valid after a load; every element after fill or mma.
  T tile[16 * 16];
};

namespace emu_detail {
using ::nystrom::emu::Site;
using ::nystrom::emu::detail::fail;
using ::nystrom::emu::detail::LaneArgs;
using ::nystrom::emu::detail::Op;

inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void check_memory(const void* p, unsigned ldm, std::size_t elem, const Site& site, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) fail(site, std::string(what) + ": the pointer is not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) {
    fail(site, std::string(what) + ": ldm = " + std::to_string(ldm) + " is not a multiple of 16 bytes");
  }
}

// Element (r, c) of a 16x16 tile stored with leading dimension ldm.
template <class T>
T& at(T* p, unsigned ldm, bool row_major_storage, int r, int c) {
  return row_major_storage ? p[static_cast<std::size_t>(r) * ldm + c] : p[static_cast<std::size_t>(c) * ldm + r];
}

template <class T>
void load_share(T* tile, const T* m, unsigned ldm, bool rows) {
  const int lane = ::nystrom::emu::detail::lane_id();
  for (int e = 8 * lane; e < 8 * lane + 8; ++e) tile[e] = at(const_cast<T*>(m), ldm, rows, e / 16, e % 16);
}

// The whole tile of a fragment, each share from the lane that holds it.
template <class Frag, class T>
void gather(const LaneArgs* lanes, int which, T* out) {
  for (int l = 0; l < 32; ++l) {
    std::memcpy(out + 8 * l, static_cast<const Frag*>(lanes[l].in[which])->tile + 8 * l, 8 * sizeof(T));
  }
}
}  // namespace emu_detail

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v,
                          ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  for (auto& e : f.tile) e = v;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  ::nystrom::emu::detail::note_fragment_op(emu_detail::Op::kWmmaFill, site, nullptr, 0, 0, bits);
}

/// matrix_a / matrix_b: the layout is the fragment's.
template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm,
                             ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load needs a layout_t argument");
  emu_detail::check_memory(p, ldm, sizeof(T), site, "load_matrix_sync");
  // a's rows are m, b's rows are k; col_major memory holds the transpose.
  emu_detail::load_share(f.tile, p, ldm, std::is_same<Layout, row_major>::value);
  ::nystrom::emu::detail::note_wmma_traffic(p, ldm, sizeof(T));
  ::nystrom::emu::detail::note_fragment_op(emu_detail::Op::kWmmaLoad, site, p, ldm, 0, 0);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout, ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  emu_detail::check_memory(p, ldm, sizeof(float), site, "load_matrix_sync");
  emu_detail::load_share(f.tile, p, ldm, layout == mem_row_major);
  ::nystrom::emu::detail::note_wmma_traffic(p, ldm, sizeof(float));
  ::nystrom::emu::detail::note_fragment_op(emu_detail::Op::kWmmaLoad, site, p, ldm, static_cast<int>(layout), 0);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout, ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  emu_detail::check_memory(p, ldm, sizeof(float), site, "store_matrix_sync");
  const int lane = ::nystrom::emu::detail::lane_id();
  for (int e = 8 * lane; e < 8 * lane + 8; ++e) emu_detail::at(p, ldm, layout == mem_row_major, e / 16, e % 16) = f.tile[e];
  ::nystrom::emu::detail::note_wmma_traffic(p, ldm, sizeof(float));
  ::nystrom::emu::detail::note_fragment_op(emu_detail::Op::kWmmaStore, site, p, ldm, static_cast<int>(layout), 0);
}

template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
                     ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  using Acc = fragment<accumulator, 16, 16, 16, float>;
  using FA = fragment<matrix_a, 16, 16, 16, T, LA>;
  using FB = fragment<matrix_b, 16, 16, 16, T, LB>;
  emu_detail::LaneArgs x;
  x.out = &d;
  x.in[0] = &a;
  x.in[1] = &b;
  x.in[2] = &c;
  ::nystrom::emu::detail::collective(
      emu_detail::Op::kWmmaMma, site, x, [](emu_detail::LaneArgs* lanes, const ::nystrom::emu::Site&) {
        T ta[256], tb[256];
        float tc[256], a32[256], b32[256], out[256];
        emu_detail::gather<FA>(lanes, 0, ta);
        emu_detail::gather<FB>(lanes, 1, tb);
        emu_detail::gather<Acc>(lanes, 2, tc);
        for (int i = 0; i < 256; ++i) {
          a32[i] = emu_detail::widen(ta[i]);
          b32[i] = emu_detail::widen(tb[i]);
        }
        for (int i = 0; i < 16; ++i)
          for (int j = 0; j < 16; ++j) {
            float s = tc[i * 16 + j];
            for (int k = 0; k < 16; ++k) s += a32[i * 16 + k] * b32[k * 16 + j];
            out[i * 16 + j] = s;
          }
        // d may alias c: written only after every product is formed.
        for (int l = 0; l < 32; ++l) std::memcpy(static_cast<Acc*>(lanes[l].out)->tile, out, sizeof out);
      });
}

}  // namespace wmma
}  // namespace nvcuda
