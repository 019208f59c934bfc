// Umbrella header of torch-nystrom: the functional ops and the nn layer.
#pragma once

#include <nystrom/module.h>
#include <nystrom/ops.h>
