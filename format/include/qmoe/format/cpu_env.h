// QMOE_CPU_SIMD lives in core/ (qmoe/core/cpu_env.h); this header keeps the format module's
// spelling working.
#pragma once

#include "qmoe/core/cpu_env.h"
