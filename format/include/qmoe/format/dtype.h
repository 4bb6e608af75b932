// dtype.h lives in core/ (qmoe/core/dtype.h); this header keeps the format module's spelling
// working.
#pragma once

#include "qmoe/core/dtype.h"
