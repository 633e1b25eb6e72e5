#include "backends/block/qdisk.h"
#include "src/device/registry.h"

namespace pvhost {

// Registers `qdisk` and `vbd` (backends/block/qdisk.cc).
void register_block_backends(Registry& r) { blkif::register_types(r); }

}  // namespace pvhost
