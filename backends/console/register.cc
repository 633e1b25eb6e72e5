#include "src/device/registry.h"

namespace pvhost {

// Registers `console`. Filled in by the console backend.
void register_console_backends(Registry&) {}

}  // namespace pvhost
