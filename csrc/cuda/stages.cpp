// CUDA kernels of the sequence-parallel stage ops (docs/DESIGN.md §12): the
// same ATen stages as the CPU (csrc/stages.h), run by torch's CUDA kernels on
// CUDA tensors: m-sized batched products, masks instead of gathers, and no
// host synchronisation (the geometry stays on the device). In the emulated
// build (NYSTROM_CUDA_EMULATION) this file registers at the CPU key like the
// rest of the glue, so the emulated library serves the stage ops too.
#include "stage_ops.h"

#include <torch/library.h>

#if defined(NYSTROM_CUDA_EMULATION)
TORCH_LIBRARY_IMPL(nystrom, CPU, m) { NYSTROM_REGISTER_STAGES(m); }
#else
TORCH_LIBRARY_IMPL(nystrom, CUDA, m) { NYSTROM_REGISTER_STAGES(m); }
#endif
