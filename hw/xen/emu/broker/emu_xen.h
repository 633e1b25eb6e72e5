// Extra entry point of pvhost's emulated Xen client (emu_xen.cc), beside open_emulated() in
// hw/xen/xen.h: the broker without xenstore, for tests of the hypervisor broker alone. Its
// store() fails every call with ENOTCONN.
#pragma once

#include <memory>
#include <string>

#include "hw/xen/xen.h"

namespace pvhost::xen {

[[nodiscard]] Result<std::unique_ptr<Xen>> open_emulated_broker_only(const std::string& rundir);

}  // namespace pvhost::xen
