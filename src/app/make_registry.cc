// pvhost's registry: the built-in backend types (pvhost-test links its own make_registry).
#include "src/device/registry.h"

namespace pvhost {

void register_builtin_backends(Registry& r);

Registry make_registry() {
  Registry r;
  register_builtin_backends(r);
  return r;
}

}  // namespace pvhost
