// Internal: what a build of the library is, for bug reports
// (`python -m torch_nystrom.info`, docs/usage.md). Torch-free.
//
// nystrom_build_info() returns one JSON object; every build of the library
// (the CPU/CUDA one, the emulated one) exports it. The backends that a build
// has contribute their parts through the hooks below, which are weak: a build
// without the CPU kernels (the emulated one) or without CUDA leaves them null.
#pragma once

extern "C" {

/// {"version", "torch_built", "cxx11_abi", "compiler", "cpu": {...} | null, "cuda": {...} | null}
const char* nystrom_build_info(void);

/// The CPU backend's part, a JSON object (csrc/cpu/cpu_build_info.cpp).
const char* nystrom_cpu_build_info(void) __attribute__((weak));

/// The CUDA backend's part, a JSON object (csrc/cuda/cuda_build_info.cpp).
const char* nystrom_cuda_build_info(void) __attribute__((weak));

}  // extern "C"
