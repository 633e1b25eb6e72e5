// The toolstack's domain operations for the emulated hypervisor, done as libxl 4.17 does them
// (shared/reference/libxl-4.17-pv/xenstore-1-running-full.txt, `xenstore-ls -fp`): the broker
// creates the domain (and introduces it to xenstored), then one transaction writes its home
// /local/domain/N owned by dom0 and readable by N (n0,rN), the guest-writable directories
// (control/shutdown, control/sysrq, data, drivers, feature, attr, error: nN) and /vm/<uuid>.
// Destroy removes those nodes, then the domain.
//
// A library so that pvhost-xl, the tests and the demo share it.
#pragma once

#include <string>
#include <vector>

#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/xen.h"

namespace pvhost::xenemu {

// Writes the xenstore nodes of a freshly created domain (one transaction, retried on EAGAIN).
[[nodiscard]] Result<void> write_domain_nodes(xen::XenStore& xs, DomId domid, const DomainConfig& config);
// Removes /local/domain/N and its /vm/<uuid>; missing nodes are not an error.
[[nodiscard]] Result<void> remove_domain_nodes(xen::XenStore& xs, DomId domid);

// Broker + xenstore: the domain is destroyed again when its nodes cannot be written.
[[nodiscard]] Result<DomId> domain_create(Toolstack& ts, xen::XenStore& xs, const DomainConfig& config);
[[nodiscard]] Result<void> domain_destroy(Toolstack& ts, xen::XenStore& xs, DomId domid);
// "Name ID Mem VCPUs State" lines as `xl list` prints them.
[[nodiscard]] Result<std::string> domain_list_text(Toolstack& ts);

}  // namespace pvhost::xenemu
