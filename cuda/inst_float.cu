// The launchers for float inputs (one file per dtype so they compile in parallel).
#include "launch_templates.cuh"

namespace nystrom::cuda::kern {
NYSTROM_LAUNCHERS(, float)
}  // namespace nystrom::cuda::kern
