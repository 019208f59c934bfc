// The fused tile kernels for AVX2/FMA (compiled with -mavx2 -mfma).
#if defined(__AVX2__) && defined(__FMA__)
#define NYSTROM_SIMD_NS avx2
#define NYSTROM_SIMD_WIDTH 8
#include "cpu/fused_impl.h"
#endif
