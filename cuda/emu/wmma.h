// nvcuda::wmma for the CUDA emulation: 16x16x16 fragments, matrix_a
// row_major, matrix_b row_major or col_major (__half or __nv_bfloat16), float
// accumulators; fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync.
//
// A fragment is the whole 16x16 tile, held by every lane (a real fragment
// spreads it over the 32 lanes in an unspecified layout, which is why its
// elements are not accessible here: there is no x[] / num_elements, and code
// that indexes them does not compile). Every operation is warp-collective:
// all 32 lanes must reach the same call site, and the memory operands must
// be the same in every lane (pointer, ldm, layout), 256-bit aligned, with
// ldm a multiple of 16 bytes, as the CUDA documentation requires; anything
// else is a kernel fault naming the site. The product runs once per warp:
// d = c + a*b with the elements of a and b widened to float and each dot
// product summed in float in k order (real tensor cores sum in an order and
// with roundings of their own).
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
  T tile[16 * 16];
};

namespace emu_detail {
using ::nystrom::emu::Site;
using ::nystrom::emu::detail::fail;
using ::nystrom::emu::detail::LaneArgs;

inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }

// All lanes must name the same memory the same way.
inline void check_uniform(const LaneArgs* lanes, const Site& site, const char* what, std::size_t elem) {
  for (int l = 1; l < 32; ++l) {
    if (lanes[l].mem != lanes[0].mem || lanes[l].ldm != lanes[0].ldm || lanes[l].layout != lanes[0].layout) {
      fail(site, std::string(what) + ": lane " + std::to_string(l) +
                     " passes a different pointer, ldm or layout than lane 0 (the operands of a warp-collective "
                     "WMMA operation must be the same in every lane)");
    }
  }
  if (reinterpret_cast<std::uintptr_t>(lanes[0].mem) % 32 != 0) {
    fail(site, std::string(what) + ": the pointer is not 256-bit aligned");
  }
  if ((lanes[0].ldm * elem) % 16 != 0) {
    fail(site, std::string(what) + ": ldm = " + std::to_string(lanes[0].ldm) + " is not a multiple of 16 bytes");
  }
}

template <class Frag>
void copy_to_lanes(LaneArgs* lanes) {
  for (int l = 1; l < 32; ++l) std::memcpy(lanes[l].out, lanes[0].out, sizeof(Frag));
}

// Element (r, c) of a 16x16 tile stored with leading dimension ldm.
template <class T>
T at(const T* p, unsigned ldm, bool row_major_storage, int r, int c) {
  return row_major_storage ? p[static_cast<std::size_t>(r) * ldm + c] : p[static_cast<std::size_t>(c) * ldm + r];
}
}  // namespace emu_detail

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v, ::nystrom::emu::Site site =
                                                                                     ::nystrom::emu::Site::here()) {
  using Frag = fragment<Use, 16, 16, 16, T, Layout>;
  emu_detail::LaneArgs a;
  std::memcpy(&a.value, &v, sizeof(T));
  a.out = &f;
  ::nystrom::emu::detail::collective(
      ::nystrom::emu::detail::Op::kWmmaFill, site, a, [](emu_detail::LaneArgs* lanes, const ::nystrom::emu::Site& s) {
        for (int l = 1; l < 32; ++l) {
          if (lanes[l].value != lanes[0].value) {
            emu_detail::fail(s, "fill_fragment: lane " + std::to_string(l) + " fills a different value than lane 0");
          }
        }
        T x;
        std::memcpy(&x, &lanes[0].value, sizeof(T));
        auto* f0 = static_cast<Frag*>(lanes[0].out);
        for (auto& e : f0->tile) e = x;
        emu_detail::copy_to_lanes<Frag>(lanes);
      });
}

/// matrix_a / matrix_b: the layout is the fragment's.
template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm,
                             ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load needs a layout_t argument");
  using Frag = fragment<Use, 16, 16, 16, T, Layout>;
  emu_detail::LaneArgs a;
  a.out = &f;
  a.mem = p;
  a.ldm = ldm;
  ::nystrom::emu::detail::collective(
      ::nystrom::emu::detail::Op::kWmmaLoad, site, a, [](emu_detail::LaneArgs* lanes, const ::nystrom::emu::Site& s) {
        emu_detail::check_uniform(lanes, s, "load_matrix_sync", sizeof(T));
        const T* m = static_cast<const T*>(lanes[0].mem);
        auto* f0 = static_cast<Frag*>(lanes[0].out);
        // Stored row-major: a's rows are m, b's rows are k. col_major swaps.
        const bool rows = std::is_same<Layout, row_major>::value;
        for (int r = 0; r < 16; ++r)
          for (int c = 0; c < 16; ++c) f0->tile[r * 16 + c] = emu_detail::at(m, lanes[0].ldm, rows, r, c);
        emu_detail::copy_to_lanes<Frag>(lanes);
      });
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout, ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  using Frag = fragment<accumulator, 16, 16, 16, float>;
  emu_detail::LaneArgs a;
  a.out = &f;
  a.mem = p;
  a.ldm = ldm;
  a.layout = static_cast<int>(layout);
  ::nystrom::emu::detail::collective(
      ::nystrom::emu::detail::Op::kWmmaLoad, site, a, [](emu_detail::LaneArgs* lanes, const ::nystrom::emu::Site& s) {
        emu_detail::check_uniform(lanes, s, "load_matrix_sync", sizeof(float));
        const float* m = static_cast<const float*>(lanes[0].mem);
        auto* f0 = static_cast<Frag*>(lanes[0].out);
        const bool rows = lanes[0].layout == mem_row_major;
        for (int r = 0; r < 16; ++r)
          for (int c = 0; c < 16; ++c) f0->tile[r * 16 + c] = emu_detail::at(m, lanes[0].ldm, rows, r, c);
        emu_detail::copy_to_lanes<Frag>(lanes);
      });
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout, ::nystrom::emu::Site site = ::nystrom::emu::Site::here()) {
  using Frag = fragment<accumulator, 16, 16, 16, float>;
  emu_detail::LaneArgs a;
  a.in[0] = &f;
  a.mem = p;
  a.ldm = ldm;
  a.layout = static_cast<int>(layout);
  ::nystrom::emu::detail::collective(
      ::nystrom::emu::detail::Op::kWmmaStore, site, a, [](emu_detail::LaneArgs* lanes, const ::nystrom::emu::Site& s) {
        emu_detail::check_uniform(lanes, s, "store_matrix_sync", sizeof(float));
        auto* m = static_cast<float*>(const_cast<void*>(lanes[0].mem));
        const auto* f0 = static_cast<const Frag*>(lanes[0].in[0]);
        const std::size_t ld = lanes[0].ldm;
        const bool rows = lanes[0].layout == mem_row_major;
        for (int r = 0; r < 16; ++r)
          for (int c = 0; c < 16; ++c) (rows ? m[r * ld + c] : m[c * ld + r]) = f0->tile[r * 16 + c];
      });
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
      ::nystrom::emu::detail::Op::kWmmaMma, site, x, [](emu_detail::LaneArgs* lanes, const ::nystrom::emu::Site& s) {
        // Operands chosen per lane (say, by a lane-dependent condition) differ.
        for (int l = 1; l < 32; ++l) {
          if (std::memcmp(lanes[l].in[0], lanes[0].in[0], sizeof(FA)) != 0 ||
              std::memcmp(lanes[l].in[1], lanes[0].in[1], sizeof(FB)) != 0 ||
              std::memcmp(lanes[l].in[2], lanes[0].in[2], sizeof(Acc)) != 0) {
            emu_detail::fail(s, "mma_sync: lane " + std::to_string(l) + " holds other operand fragments than lane 0");
          }
        }
        const auto* fa = static_cast<const FA*>(lanes[0].in[0]);
        const auto* fb = static_cast<const FB*>(lanes[0].in[1]);
        const auto* fc = static_cast<const Acc*>(lanes[0].in[2]);
        float a32[256], b32[256], out[256];
        for (int i = 0; i < 256; ++i) {
          a32[i] = emu_detail::widen(fa->tile[i]);
          b32[i] = emu_detail::widen(fb->tile[i]);
        }
        for (int i = 0; i < 16; ++i)
          for (int j = 0; j < 16; ++j) {
            float s = fc->tile[i * 16 + j];
            for (int k = 0; k < 16; ++k) s += a32[i * 16 + k] * b32[k * 16 + j];
            out[i * 16 + j] = s;
          }
        // d may alias c: write only after every product is formed.
        for (int l = 0; l < 32; ++l) std::memcpy(static_cast<Acc*>(lanes[l].out)->tile, out, sizeof out);
      });
}

}  // namespace wmma
}  // namespace nvcuda
