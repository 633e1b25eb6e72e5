#include "hw/xen/emu/toolstack/domain.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>

#include "src/log.h"

namespace pvhost::xenemu {
namespace {

using xen::Permission;
using Kind = xen::Permission::Kind;

// A random version-4 UUID for /vm/<uuid> (libxl generates one per domain).
Result<std::string> new_uuid() {
  uint8_t b[16];
  UniqueFd fd(::open("/dev/urandom", O_RDONLY | O_CLOEXEC));
  if (!fd || ::read(fd.get(), b, sizeof b) != static_cast<ssize_t>(sizeof b)) return fail_errno("read /dev/urandom");
  b[6] = static_cast<uint8_t>((b[6] & 0x0f) | 0x40);
  b[8] = static_cast<uint8_t>((b[8] & 0x3f) | 0x80);
  return fmt::format("{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
                     b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14],
                     b[15]);
}

Result<void> put(xen::XenStore& xs, xen::Transaction t, const std::string& path, std::string_view value,
                 std::span<const Permission> perms) {
  PVHOST_TRY(xs.write(t, path, value));
  PVHOST_TRY(xs.set_permissions(t, path, perms));
  return {};
}

}  // namespace

Result<void> write_domain_nodes(xen::XenStore& xs, DomId domid, const DomainConfig& c) {
  const std::string dom = fmt::format("/local/domain/{}", domid);
  const std::string uuid = PVHOST_TRY(new_uuid());
  const std::string vm = "/vm/" + uuid;
  // libxl: the home is dom0's, readable by the guest; the guest's own corners are its.
  const Permission ro[] = {{kDom0, Kind::none}, {domid, Kind::read}};
  const Permission own[] = {{domid, Kind::none}};
  const uint64_t kib = uint64_t{c.memory_mib} * 1024;
  const auto start = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  return with_context(
      xen::transact(xs,
                    [&](xen::Transaction t) -> Result<void> {
                      PVHOST_TRY(put(xs, t, dom, "", ro));
                      PVHOST_TRY(put(xs, t, dom + "/vm", vm, ro));
                      PVHOST_TRY(put(xs, t, dom + "/name", c.name, ro));
                      PVHOST_TRY(put(xs, t, dom + "/domid", fmt::format("{}", domid), ro));
                      PVHOST_TRY(put(xs, t, dom + "/cpu", "", ro));
                      for (uint32_t v = 0; v < c.vcpus; ++v) {
                        PVHOST_TRY(put(xs, t, fmt::format("{}/cpu/{}", dom, v), "", ro));
                        PVHOST_TRY(put(xs, t, fmt::format("{}/cpu/{}/availability", dom, v), "online", ro));
                      }
                      PVHOST_TRY(put(xs, t, dom + "/memory", "", ro));
                      PVHOST_TRY(put(xs, t, dom + "/memory/static-max", fmt::format("{}", kib), ro));
                      PVHOST_TRY(put(xs, t, dom + "/memory/target", fmt::format("{}", kib), ro));
                      PVHOST_TRY(put(xs, t, dom + "/memory/videoram", "0", ro));
                      PVHOST_TRY(put(xs, t, dom + "/device", "", ro));
                      PVHOST_TRY(put(xs, t, dom + "/control", "", ro));
                      PVHOST_TRY(put(xs, t, dom + "/control/shutdown", "", own));
                      PVHOST_TRY(put(xs, t, dom + "/control/sysrq", "", own));
                      PVHOST_TRY(put(xs, t, dom + "/control/platform-feature-multiprocessor-suspend", "1", ro));
                      PVHOST_TRY(put(xs, t, dom + "/control/platform-feature-xs_reset_watches", "1", ro));
                      for (const char* d : {"data", "drivers", "feature", "attr", "error"})
                        PVHOST_TRY(put(xs, t, fmt::format("{}/{}", dom, d), "", own));
                      PVHOST_TRY(put(xs, t, vm, "", ro));
                      PVHOST_TRY(put(xs, t, vm + "/name", c.name, ro));
                      PVHOST_TRY(put(xs, t, vm + "/uuid", uuid, ro));
                      PVHOST_TRY(put(xs, t, vm + "/start_time", fmt::format("{:.2f}", start), ro));
                      return {};
                    }),
      fmt::format("write xenstore nodes of dom{}", domid));
}

Result<void> remove_domain_nodes(xen::XenStore& xs, DomId domid) {
  const std::string dom = fmt::format("/local/domain/{}", domid);
  return with_context(xen::transact(xs,
                                    [&](xen::Transaction t) -> Result<void> {
                                      auto vm = PVHOST_TRY(xen::read_optional(xs, t, dom + "/vm"));
                                      if (vm && vm->starts_with("/vm/")) {
                                        auto r = xs.rm(t, *vm);
                                        if (!r && r.error().code() != ENOENT) return r;
                                      }
                                      auto r = xs.rm(t, dom);
                                      if (!r && r.error().code() != ENOENT) return r;
                                      return {};
                                    }),
                      fmt::format("remove xenstore nodes of dom{}", domid));
}

Result<DomId> domain_create(Toolstack& ts, xen::XenStore& xs, const DomainConfig& config) {
  const DomId domid = PVHOST_TRY(ts.create_domain(config));
  auto nodes = write_domain_nodes(xs, domid, config);
  if (!nodes) {
    if (auto r = ts.destroy_domain(domid); !r)
      log::warn("destroy half-created dom{}: {}", domid, r.error().describe());
    return std::unexpected(std::move(nodes).error());
  }
  return domid;
}

Result<void> domain_destroy(Toolstack& ts, xen::XenStore& xs, DomId domid) {
  PVHOST_TRY(ts.domain_info(domid));  // ENOENT for an unknown domain, before touching xenstore
  PVHOST_TRY(remove_domain_nodes(xs, domid));
  return ts.destroy_domain(domid);
}

Result<std::string> domain_list_text(Toolstack& ts) {
  auto list = PVHOST_TRY(ts.list_domains());
  std::string out = fmt::format("{:<32} {:>5} {:>5} {:>5} {:>6}\n", "Name", "ID", "Mem", "VCPUs", "State");
  for (const DomainSummary& d : list) {
    out += fmt::format("{:<32} {:>5} {:>5} {:>5} {:>6}\n", d.name, d.domid, d.memory_mib, d.vcpus,
                       d.dying ? "--d---" : "r-----");
  }
  return out;
}

}  // namespace pvhost::xenemu
