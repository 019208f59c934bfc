// The fused tile kernels for AVX-512 (compiled with -mavx512f -mfma).
#if defined(__AVX512F__) && defined(__FMA__)
#define NYSTROM_SIMD_NS avx512
#define NYSTROM_SIMD_WIDTH 16
#include "cpu/fused_impl.h"
#endif
