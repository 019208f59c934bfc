// The launchers for double inputs (one file per dtype so they compile in parallel).
#include "launch_templates.cuh"

namespace nystrom::cuda::kern {
NYSTROM_LAUNCHERS(, double)
}  // namespace nystrom::cuda::kern
