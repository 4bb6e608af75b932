// bf16.h lives in core/ (qmoe/core/bf16.h); this header keeps the format module's spelling working.
#pragma once

#include "qmoe/core/bf16.h"
