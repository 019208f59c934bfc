// The run-time choice of the CPU instruction set (isa.h). Compiled without
// any ISA flag: it only reads the CPU's features and the environment.
#include "cpu/isa.h"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace nystrom::cpu {

Isa best_available_isa() {
#if defined(NYSTROM_X86_SIMD)
  static const Isa best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (avx2 && __builtin_cpu_supports("avx512f")) return Isa::kAvx512;
    return avx2 ? Isa::kAvx2 : Isa::kNone;
  }();
  return best;
#else
  return Isa::kNone;
#endif
}

Isa isa() {
  static const Isa chosen = [] {
    const Isa best = best_available_isa();
    const char* env = std::getenv("NYSTROM_CPU_SIMD");
    const std::string want = env == nullptr ? "" : env;
    if (want.empty() || want == "avx512") return best;
    if (want == "0" || want == "none") return Isa::kNone;
    if (want == "avx2") return best == Isa::kNone ? Isa::kNone : Isa::kAvx2;
    std::fprintf(stderr,
                 "torch-nystrom: NYSTROM_CPU_SIMD=\"%s\" is not one of 0, none, avx2, avx512; using %s\n",
                 want.c_str(), isa_name(best));
    return best;
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
