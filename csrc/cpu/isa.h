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
// bfloat16 inputs on the avx512 level may in addition multiply on vdpbf16ps
// (AVX512-BF16; fused_bf16.h): the float32 operands of the long products
// (landmarks, probabilities, W) are rounded to bfloat16, the sums, statistics
// and the pseudoinverse stay float32 (docs/DESIGN.md §5, §6). Chosen by
// bf16_products(): by default where the CPU has AVX512-BF16 and is an AMD one
// (Zen 4 runs vdpbf16ps at twice the multiply-adds of its FMA per cycle; an
// Intel Xeon without AMX ran it 1.4x slower than the float32 kernel, since
// there it issues at half the FMA rate). NYSTROM_CPU_BF16=1 turns it on
// wherever the CPU has it, =0 off. float16 has no such level: AVX512-FP16
// multiplies in float16 (no float32 sums), so its rows are converted to
// float32 as they are read, as are bfloat16 rows where the level is off.
#pragma once

namespace nystrom::cpu {

enum class Isa : int {
  kNone = 0,    // ATen only
  kAvx2 = 1,    // AVX2 + FMA + F16C, 8 floats per vector
  kAvx512 = 2,  // AVX-512F + FMA, 16 floats per vector
};

/// The instruction set of this process's fused kernels (decided once).
Isa isa();

/// Whether this build has the vdpbf16ps kernels (fused_bf16.h) and this CPU
/// (and its OS) runs AVX512-BF16 with AVX512-BW/VL, ignoring NYSTROM_CPU_BF16.
bool cpu_has_bf16_products();

/// Whether bfloat16 inputs multiply on vdpbf16ps in this process (decided
/// once; needs isa() == Isa::kAvx512): the CPU has them and, unless
/// NYSTROM_CPU_BF16 says otherwise, is an AMD one.
bool bf16_products();

/// Floats per vector register of `i` (0 for kNone).
int vector_floats(Isa i);

/// "none", "avx2", "avx512".
const char* isa_name(Isa i);

/// The best instruction set this build has kernels for and this CPU runs,
/// ignoring NYSTROM_CPU_SIMD.
Isa best_available_isa();

}  // namespace nystrom::cpu
