// The launchers for half inputs (one file per dtype so they compile in parallel).
#include "launch_templates.cuh"

namespace nystrom::cuda::kern {
NYSTROM_LAUNCHERS(, __half)
}  // namespace nystrom::cuda::kern
