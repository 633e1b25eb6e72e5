#include "tests/unit/block_formats/test_util.h"
