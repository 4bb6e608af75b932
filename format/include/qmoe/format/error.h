// The error types live in core/ (qmoe/core/error.h); this header keeps the format module's
// spelling working.
#pragma once

#include "qmoe/core/error.h"
