// Internal: the one run-time decision of the CPU instruction set
// (docs/DESIGN.md §6). Torch-free.
//
// The fused kernels (fused.h) exist once per instruction set; which one a
// process runs is decided here, once, from the CPU's features and the
// environment variable NYSTROM_CPU_SIMD:
//   unset or ""   the best this build and this CPU have
//   "avx512"      AVX-512 (if available; else the best below it)
//   "avx2"        at most AVX2/FMA (tests run both sets on one CPU)
//   "0", "none"   no fused kernels: every product goes through ATen, as on
//                 CPUs without AVX2 and on other architectures
// Any other value is reported once on stderr and treated as unset.
#pragma once

namespace nystrom::cpu {

enum class Isa : int {
  kNone = 0,    // ATen only
  kAvx2 = 1,    // AVX2 + FMA, 8 floats per vector
  kAvx512 = 2,  // AVX-512F + FMA, 16 floats per vector
};

/// The instruction set of this process's fused kernels (decided once).
Isa isa();

/// Floats per vector register of `i` (0 for kNone).
int vector_floats(Isa i);

/// "none", "avx2", "avx512".
const char* isa_name(Isa i);

/// The best instruction set this build has kernels for and this CPU runs,
/// ignoring NYSTROM_CPU_SIMD.
Isa best_available_isa();

}  // namespace nystrom::cpu
