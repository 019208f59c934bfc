// The run-time choice of the CPU instruction set (isa.h). Compiled without
// any ISA flag: it only reads the CPU's features and the environment.
#include "cpu/isa.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(NYSTROM_X86_SIMD)
#include <cpuid.h>
#endif

namespace nystrom::cpu {

#if defined(NYSTROM_X86_SIMD)
namespace {

// The CPU's features that the levels need, each only where the operating
// system also saves the registers it uses (XCR0).
struct Features {
  bool avx2 = false;       // AVX2, FMA and F16C (ymm state)
  bool avx512f = false;    // AVX-512F (zmm and mask state)
  bool avx512bf16 = false; // AVX512-BF16 (vdpbf16ps) with AVX512-BW/VL
  bool amd = false;        // vendor "AuthenticAMD"
};

Features read_features() {
  Features f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) < 7 || !__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), f16c = c & (1u << 29);
  if (!osxsave) return f;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const unsigned long long xcr0 = (static_cast<unsigned long long>(xcr0_hi) << 32) | xcr0_lo;
  const bool ymm = (xcr0 & 0x6) == 0x6, zmm = (xcr0 & 0xe6) == 0xe6;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm && fma && f16c && (b & (1u << 5));
  f.avx512f = f.avx2 && zmm && (b & (1u << 16));
  const bool bw = b & (1u << 30), vl = b & (1u << 31);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512bf16 = f.avx512f && bw && vl && (a & (1u << 5));
  unsigned vendor[4] = {};
  __get_cpuid(0, &vendor[3], &vendor[0], &vendor[2], &vendor[1]);  // ebx, edx, ecx spell the vendor
  f.amd = std::memcmp(vendor, "AuthenticAMD", 12) == 0;
  return f;
}

const Features& features() {
  static const Features f = read_features();
  return f;
}

}  // namespace
#endif

Isa best_available_isa() {
#if defined(NYSTROM_X86_SIMD)
  const Features& f = features();
  if (f.avx512f) return Isa::kAvx512;
  return f.avx2 ? Isa::kAvx2 : Isa::kNone;
#else
  return Isa::kNone;
#endif
}

Isa isa() {
  static const Isa chosen = [] {
    const Isa best = best_available_isa();
    const char* env = std::getenv("NYSTROM_CPU_SIMD");
    const std::string want = env == nullptr ? "" : env;
    Isa pick = best;
    if (want == "0" || want == "none") {
      pick = Isa::kNone;
    } else if (want == "avx2") {
      pick = best == Isa::kNone ? Isa::kNone : Isa::kAvx2;
    } else if (want == "avx512") {
      pick = best >= Isa::kAvx512 ? Isa::kAvx512 : best;
    } else if (!want.empty()) {
      std::fprintf(stderr,
                   "torch-nystrom: NYSTROM_CPU_SIMD=\"%s\" is not one of 0, none, avx2, avx512; using %s\n",
                   want.c_str(), isa_name(best));
    }
    const char* verbose = std::getenv("NYSTROM_CPU_SIMD_VERBOSE");
    if (verbose != nullptr && *verbose != '\0' && std::string(verbose) != "0") {
      std::fprintf(stderr, "torch-nystrom: CPU kernels: %s (best on this CPU: %s; NYSTROM_CPU_SIMD=\"%s\")\n",
                   isa_name(pick), isa_name(best), want.c_str());
    }
    return pick;
  }();
  return chosen;
}

bool cpu_has_bf16_products() {
#if defined(NYSTROM_X86_SIMD) && defined(NYSTROM_BF16_KERNELS)
  return features().avx512bf16;
#else
  return false;
#endif
}

bool bf16_products() {
  static const bool chosen = [] {
    const bool has = isa() == Isa::kAvx512 && cpu_has_bf16_products();
    const char* env = std::getenv("NYSTROM_CPU_BF16");
    const std::string want = env == nullptr ? "" : env;
#if defined(NYSTROM_X86_SIMD) && defined(NYSTROM_BF16_KERNELS)
    bool pick = has && features().amd;
#else
    bool pick = false;
#endif
    if (want == "1") {
      pick = has;
    } else if (want == "0") {
      pick = false;
    } else if (!want.empty()) {
      std::fprintf(stderr, "torch-nystrom: NYSTROM_CPU_BF16=\"%s\" is not one of 0, 1; using %s\n", want.c_str(),
                   pick ? "1" : "0");
    }
    const char* verbose = std::getenv("NYSTROM_CPU_SIMD_VERBOSE");
    if (verbose != nullptr && *verbose != '\0' && std::string(verbose) != "0") {
      std::fprintf(stderr, "torch-nystrom: bfloat16 products on vdpbf16ps: %s (CPU has them: %s; NYSTROM_CPU_BF16=\"%s\")\n",
                   pick ? "yes" : "no", has ? "yes" : "no", want.c_str());
    }
    return pick;
  }();
  return chosen;
}

int vector_floats(Isa i) {
  switch (i) {
    case Isa::kAvx2: return 8;
    case Isa::kAvx512: return 16;
    case Isa::kNone: break;
  }
  return 0;
}

const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNone: break;
  }
  return "none";
}

}  // namespace nystrom::cpu
