// The CPU backend's part of nystrom_build_info (build_info.h): the
// instruction sets built, the best this CPU runs, the one chosen (isa.h),
// whether bfloat16 inputs multiply on vdpbf16ps (available, chosen), and OpenMP.
#include "build_info.h"
#include "cpu/isa.h"

#include <string>

extern "C" const char* nystrom_cpu_build_info(void) {
  using nystrom::cpu::Isa;
  static const std::string info = [] {
    std::string built = "[";
#if defined(NYSTROM_X86_SIMD)
    built += "\"avx2\", \"avx512\"";
#endif
    built += "]";
    std::string s = "{\"isa_built\": " + built;
    s += std::string(", \"isa_available\": \"") + nystrom::cpu::isa_name(nystrom::cpu::best_available_isa()) + "\"";
    s += std::string(", \"isa_chosen\": \"") + nystrom::cpu::isa_name(nystrom::cpu::isa()) + "\"";
    s += std::string(", \"bf16_products_available\": ") + (nystrom::cpu::cpu_has_bf16_products() ? "true" : "false");
    s += std::string(", \"bf16_products\": ") + (nystrom::cpu::bf16_products() ? "true" : "false");
#if defined(_OPENMP)
    s += ", \"openmp\": " + std::to_string(_OPENMP);
#else
    s += ", \"openmp\": null";
#endif
    return s + "}";
  }();
  return info.c_str();
}
