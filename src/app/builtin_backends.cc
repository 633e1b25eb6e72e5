// The explicit list of backend types compiled into this binary (STYLE.md rule 3). Each
// backend folder enabled with -Dbackends=... contributes one register_<name>_backends().
#include "pvhost_config.h"
#include "src/device/registry.h"

namespace pvhost {

#if PVHOST_BACKEND_QDISK
void register_block_backends(Registry& r);  // backends/block: qdisk, vbd
#endif
#if PVHOST_BACKEND_CONSOLE
void register_console_backends(Registry& r);  // backends/console: console
#endif

void register_builtin_backends(Registry& r) {
#if PVHOST_BACKEND_QDISK
  register_block_backends(r);
#endif
#if PVHOST_BACKEND_CONSOLE
  register_console_backends(r);
#endif
}

}  // namespace pvhost
