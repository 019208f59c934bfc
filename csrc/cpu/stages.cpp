// CPU kernels of the sequence-parallel stage ops (docs/DESIGN.md §12): the
// ATen stages of csrc/stages.h on CPU tensors, with the CPU backend's batched
// Newton–Schulz (newton_schulz.h).
#include "stage_ops.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(nystrom, CPU, m) { NYSTROM_REGISTER_STAGES(m); }
