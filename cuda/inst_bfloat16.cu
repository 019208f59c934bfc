// The launchers for bfloat16 inputs (one file per dtype so they compile in parallel).
#include "launch_templates.cuh"

namespace nystrom::cuda::kern {
NYSTROM_LAUNCHERS(, __nv_bfloat16)
}  // namespace nystrom::cuda::kern
