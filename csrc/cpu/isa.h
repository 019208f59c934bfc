// Internal: the one run-time decision of the CPU instruction set
// (docs/DESIGN.md §6). Torch-free.
//
// The fused kernels (fused.h) exist once per instruction set; which one a
// process runs is decided here, once, from the CPU's features and the
// environment variable NYSTROM_CPU_SIMD. The levels, lowest first:
//   none     no fused kernels: every product goes through ATen, as on CPUs
//            without AVX2 and on other architectures
//   avx2     the fused float32 kernels, 8 floats per vector (AVX2, FMA, F16C)
//   avx512   the same kernels, 16 floats per vector (AVX-512F); bfloat16 and
//            float16 rows are converted to float32 as they are read
// NYSTROM_CPU_SIMD:
//   unset or ""   the best level this build and this CPU have
//   "avx512"      at most avx512
//   "avx2"        at most avx2 (tests run every level a CPU has)
//   "0", "none"   none
// Any other value is reported once on stderr and treated as unset. With
// NYSTROM_CPU_SIMD_VERBOSE=1 the decision is printed on stderr once.
//
// No level of its own (yet) for AVX512-BF16 (vdpbf16ps), AVX512-FP16 or AMX:
// half-precision rows are converted to float32 as they are read and multiplied
// on the FMA units, so that the statistics and every product keep float32
// accuracy (docs/DESIGN.md §5). An experiment on an Intel Xeon with
// AVX512-BF16 and no AMX (not kept) ran a vdpbf16ps forward tile 1.4x slower
// than the float32 kernel and doubled the error against float64, because the
// float32 operands (landmarks, probabilities) had to be rounded to bfloat16.
#pragma once

namespace nystrom::cpu {

enum class Isa : int {
  kNone = 0,    // ATen only
  kAvx2 = 1,    // AVX2 + FMA + F16C, 8 floats per vector
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
