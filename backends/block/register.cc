#include "src/device/registry.h"

namespace pvhost {

// Registers `qdisk` (and `vbd`). Filled in by the block backend.
void register_block_backends(Registry&) {}

}  // namespace pvhost
