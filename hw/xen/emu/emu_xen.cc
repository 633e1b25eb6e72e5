#include "hw/xen/xen.h"

namespace pvhost::xen {

Result<std::unique_ptr<Xen>> open_emulated(const std::string& rundir) {
  return fail(ENOSYS, fmt::format("emulated hypervisor in {}: not built yet", rundir));
}

}  // namespace pvhost::xen
