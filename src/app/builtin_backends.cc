// The explicit list of backend types compiled into this binary (STYLE.md rule 3). Each
// backend folder, when enabled with -Dbackends=..., contributes one line here.
#include "pvhost_config.h"
#include "src/device/registry.h"

namespace pvhost {

Registry make_registry() {
  Registry r;
  return r;
}

}  // namespace pvhost
