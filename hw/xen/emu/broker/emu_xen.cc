// pvhost's emulated Xen: every interface of hw/xen/xen.h over pvhost-xenemu's broker
// (protocol: hw/xen/emu/broker/wire.h). XenStore is the real libxenstore on RUNDIR/socket.
//
// Data path: grant copies never talk to the broker and never mmap; they check the granter's
// grant_entry_v1_t (grant_table.h, GNTTABOP_copy rules) and memcpy from a premapped view of
// its RAM. Grant maps ask the broker (it sets GTF_reading/GTF_writing and records the mapping
// so it is released if we die) and then map the frames locally.
#include <cstdint>

extern "C" {
#include <xen/grant_table.h>
#include <xen/hvm/ioreq.h>
#include <xen/memory.h>
}

#include <map>
#include <mutex>

#include "hw/xen/emu/broker/client.h"
#include "hw/xen/emu/broker/emu_xen.h"
#include "hw/xen/xen.h"
#include "hw/xen/xs_client.h"
#include "src/log.h"

namespace pvhost::xen {
namespace {

using xenemu::BrokerConnection;
using xenemu::DomainMemory;
using xenemu::wire::Op;

// Shared state of one emulated host connection: the main broker connection, domain views,
// and the dm_restrict domain. Thread-safe.
class EmuCore {
 public:
  EmuCore(std::string rundir, std::unique_ptr<BrokerConnection> conn)
      : rundir_(std::move(rundir)), conn_(std::move(conn)) {}

  BrokerConnection& conn() { return *conn_; }
  const std::string& rundir() const { return rundir_; }
  std::string socket_path() const { return rundir_ + "/" + std::string(xenemu::wire::kDom0Socket); }

  // The memory of `domid`, opened once and kept (domids are not reused by the broker while
  // the daemon runs, so a view never goes stale).
  Result<std::shared_ptr<DomainMemory>> memory(DomId domid) {
    std::lock_guard lock(mu_);
    if (auto it = views_.find(domid); it != views_.end()) return it->second;
    auto m = PVHOST_TRY(DomainMemory::open(*conn_, domid));
    views_[domid] = m;
    return m;
  }

  Result<void> check_allowed(DomId domid) const {
    std::lock_guard lock(mu_);
    if (restricted_ && *restricted_ != domid)
      return fail(EPERM, fmt::format("restricted to dom{}, not dom{}", *restricted_, domid));
    return {};
  }
  void restrict_to(DomId domid) {
    std::lock_guard lock(mu_);
    restricted_ = domid;
  }
  std::optional<DomId> restricted() const {
    std::lock_guard lock(mu_);
    return restricted_;
  }

 private:
  std::string rundir_;
  std::unique_ptr<BrokerConnection> conn_;
  mutable std::mutex mu_;
  std::map<DomId, std::shared_ptr<DomainMemory>> views_;  // guarded by mu_
  std::optional<DomId> restricted_;                       // guarded by mu_
};

// One handle = one broker connection, so closing it closes its ports (as closing
// /dev/xen/evtchn does). Ports are polled through one epoll fd (client.h PortSet).
class EmuEventChannels final : public EventChannels {
 public:
  EmuEventChannels(std::unique_ptr<BrokerConnection> conn, xenemu::PortSet ports, std::optional<DomId> restricted)
      : conn_(std::move(conn)), ports_(std::move(ports)), restricted_(restricted) {}

  Result<Port> bind_interdomain(DomId remote, Port remote_port) override {
    PVHOST_TRY(check(remote));
    auto r = PVHOST_TRY_CTX(conn_->call(Op::evtchn_bind_interdomain, {remote.value(), remote_port.value()}),
                            fmt::format("bind_interdomain dom{} port {}", remote, remote_port));
    return add(r);
  }
  Result<Port> alloc_unbound(DomId remote) override {
    PVHOST_TRY(check(remote));
    auto r = PVHOST_TRY_CTX(conn_->call(Op::evtchn_alloc_unbound, {remote.value()}),
                            fmt::format("alloc_unbound for dom{}", remote));
    return add(r);
  }
  Result<void> unbind(Port local) override {
    if (!ports_.contains(local)) return fail(EINVAL, fmt::format("unbind: port {} not bound here", local));
    ports_.remove(local);
    PVHOST_TRY_CTX(conn_->call(Op::evtchn_close, {local.value()}), fmt::format("unbind port {}", local));
    return {};
  }
  Result<void> notify(Port local) override { return ports_.notify(local); }
  Result<void> unmask(Port local) override { return ports_.unmask(local); }
  int fd() const override { return ports_.fd(); }
  Result<std::optional<Port>> pending() override { return ports_.pending(); }
  Result<void> restrict_to(DomId domid) override {
    restricted_ = domid;
    return {};
  }

 private:
  Result<void> check(DomId remote) const {
    if (restricted_ && *restricted_ != remote)
      return fail(EPERM, fmt::format("event channels restricted to dom{}", *restricted_));
    return {};
  }
  Result<Port> add(BrokerConnection::Reply& r) {
    if (r.fds.size() != 2) return fail(EPROTO, "event channel reply without its eventfds");
    const Port port(static_cast<uint32_t>(r.hdr.vals[0]));
    PVHOST_TRY(ports_.add(port, std::move(r.fds[0]), std::move(r.fds[1])));
    return port;
  }

  std::unique_ptr<BrokerConnection> conn_;
  xenemu::PortSet ports_;
  std::optional<DomId> restricted_;
};

class EmuGrantTables final : public GrantTables, public Unmapper {
 public:
  explicit EmuGrantTables(EmuCore& core) : core_(core) {}

  Result<GuestMapping> map_refs(DomId domid, std::span<const GrantRef> refs, Access access) override {
    PVHOST_TRY(core_.check_allowed(domid));
    auto mem = PVHOST_TRY(core_.memory(domid));
    const bool write = access == Access::read_write;
    std::vector<uint64_t> raw(refs.size());
    for (size_t i = 0; i < refs.size(); ++i) raw[i] = refs[i].value();
    auto r = PVHOST_TRY_CTX(core_.conn().call(Op::grant_map, {domid.value(), write ? 1u : 0u}, raw),
                            fmt::format("map {} grant refs of dom{}", refs.size(), domid));
    const uint64_t id = r.hdr.vals[0];
    auto pm = xenemu::map_frames(*mem, r.items, write, core_.conn().strict());
    if (!pm) {
      release(id);
      return std::unexpected(std::move(pm).error().add_context(fmt::format("map grants of dom{}", domid)));
    }
    std::byte* addr = pm->addr;
    {
      std::lock_guard lock(mu_);
      live_[id] = std::move(pm->reservation);
    }
    return GuestMapping(addr, refs.size(), this, id);
  }

  // Unmap first, then tell the broker (it clears GTF_reading/GTF_writing).
  void unmap(GuestMapping& m) noexcept override {
    {
      std::lock_guard lock(mu_);
      live_.erase(m.cookie());
    }
    release(m.cookie());
  }

  Result<void> copy(std::span<GrantCopySegment> segs) override {
    const DomId self = core_.conn().domid();
    std::shared_ptr<DomainMemory> last;  // batches are usually all one domain's
    for (GrantCopySegment& s : segs) {
      if (!core_.check_allowed(s.domid)) {
        s.status = GNTST_permission_denied;
        continue;
      }
      if (size_t{s.offset} + s.length > kPageSize) {
        s.status = GNTST_bad_copy_arg;
        continue;
      }
      if (!last || last->domid != s.domid) {
        auto mem = core_.memory(s.domid);
        if (!mem) {
          s.status = GNTST_bad_domain;
          continue;
        }
        last = std::move(*mem);
      }
      const bool to_guest = s.direction == GrantCopySegment::Direction::to_guest;
      auto page = last->copy_target(s.ref.value(), self, to_guest);
      if (!page) {
        s.status = page.error();
        continue;
      }
      // Shared memory: memcpy is the one copy in or out (STYLE.md rule 5).
      if (to_guest) std::memcpy(*page + s.offset, s.local, s.length);
      else std::memcpy(s.local, *page + s.offset, s.length);
      s.status = GNTST_okay;
    }
    return {};
  }
  Result<void> set_max_grants(uint32_t) override { return {}; }
  bool supports_copy() const override { return true; }

 private:
  void release(uint64_t id) noexcept {
    auto r = core_.conn().call(Op::grant_unmap, {id});
    if (!r) log::error("xenemu: release grant mapping {}: {}", id, r.error().describe());
  }

  EmuCore& core_;
  std::mutex mu_;
  std::map<uint64_t, Mapping> live_;  // mapping id -> its reserved range (empty when premapped)
};

class EmuForeignMemory final : public ForeignMemory, public Unmapper {
 public:
  explicit EmuForeignMemory(EmuCore& core) : core_(core) {}

  Result<GuestMapping> map(DomId domid, std::span<const Gfn> gfns, Access access) override {
    PVHOST_TRY(core_.check_allowed(domid));
    std::vector<uint64_t> raw(gfns.size());
    for (size_t i = 0; i < gfns.size(); ++i) raw[i] = gfns[i].value();
    PVHOST_TRY_CTX(core_.conn().call(Op::foreign_map, {domid.value()}, raw),
                   fmt::format("foreign map {} frames of dom{}", gfns.size(), domid));
    auto mem = PVHOST_TRY(core_.memory(domid));
    // Foreign maps are always page by page: they are few and long-lived (console ring,
    // framebuffer directory), and strict mode wants the faults.
    auto pm = PVHOST_TRY(xenemu::map_frames(*mem, raw, access == Access::read_write, true));
    return keep(std::move(pm), gfns.size());
  }

  Result<GuestMapping> map_resource(DomId domid, unsigned type, unsigned id, uint64_t frame, size_t nr,
                                    Access access) override {
    PVHOST_TRY(core_.check_allowed(domid));
    if (type != XENMEM_resource_ioreq_server) return fail(EOPNOTSUPP, fmt::format("resource type {}", type));
    if (frame != XENMEM_resource_ioreq_server_frame_ioreq(0) || nr != 1)
      return fail(EOPNOTSUPP, "only the synchronous ioreq page (frame 1) is emulated");
    auto r = PVHOST_TRY_CTX(core_.conn().call(Op::ioreq_info, {domid.value(), id}),
                            fmt::format("ioreq server {} of dom{}", id, domid));
    if (r.fds.size() != 1) return fail(EPROTO, "ioreq_info without the page");
    const int prot = access == Access::read_write ? PROT_READ | PROT_WRITE : PROT_READ;
    Mapping page = PVHOST_TRY(Mapping::map(r.fds[0].get(), kPageSize, 0, prot));
    xenemu::PageMapping pm{page.data(), std::move(page)};
    return keep(std::move(pm), 1);
  }

  void unmap(GuestMapping& m) noexcept override {
    std::lock_guard lock(mu_);
    live_.erase(m.cookie());
  }
  Result<void> restrict_to(DomId domid) override {
    core_.restrict_to(domid);
    return {};
  }

 private:
  GuestMapping keep(xenemu::PageMapping pm, size_t pages) {
    std::lock_guard lock(mu_);
    const uint64_t id = next_++;
    std::byte* addr = pm.addr;
    live_[id] = std::move(pm.reservation);
    return GuestMapping(addr, pages, this, id);
  }

  EmuCore& core_;
  std::mutex mu_;
  uint64_t next_ = 1;
  std::map<uint64_t, Mapping> live_;
};

class EmuDeviceModel final : public DeviceModel {
 public:
  explicit EmuDeviceModel(EmuCore& core) : core_(core) {}

  Result<IoreqServerId> create_ioreq_server(DomId domid, bool buffered) override {
    PVHOST_TRY(core_.check_allowed(domid));
    if (buffered) return fail(EOPNOTSUPP, "buffered ioreqs are not emulated");
    auto r = PVHOST_TRY_CTX(core_.conn().call(Op::ioreq_create, {domid.value()}),
                            fmt::format("create ioreq server for dom{}", domid));
    return IoreqServerId{static_cast<uint16_t>(r.hdr.vals[0])};
  }
  Result<std::vector<Port>> ioreq_server_ports(DomId domid, IoreqServerId id) override {
    PVHOST_TRY(core_.check_allowed(domid));
    auto r = PVHOST_TRY(core_.conn().call(Op::ioreq_info, {domid.value(), id.value}));
    std::vector<Port> ports;
    for (uint64_t p : r.items) ports.emplace_back(static_cast<uint32_t>(p));
    return ports;
  }
  Result<void> map_io_range(DomId domid, IoreqServerId id, bool mmio, uint64_t start, uint64_t end) override {
    return range(Op::ioreq_map_range, domid, id, mmio, start, end);
  }
  Result<void> unmap_io_range(DomId domid, IoreqServerId id, bool mmio, uint64_t start, uint64_t end) override {
    return range(Op::ioreq_unmap_range, domid, id, mmio, start, end);
  }
  Result<void> set_ioreq_server_state(DomId domid, IoreqServerId id, bool enabled) override {
    PVHOST_TRY(core_.check_allowed(domid));
    PVHOST_TRY_CTX(core_.conn().call(Op::ioreq_set_state, {domid.value(), id.value, enabled ? 1u : 0u}),
                   "set ioreq server state");
    return {};
  }
  Result<void> destroy_ioreq_server(DomId domid, IoreqServerId id) override {
    PVHOST_TRY(core_.check_allowed(domid));
    PVHOST_TRY_CTX(core_.conn().call(Op::ioreq_destroy, {domid.value(), id.value}), "destroy ioreq server");
    return {};
  }
  Result<void> set_irq_level(DomId domid, uint32_t irq, bool level) override {
    PVHOST_TRY(core_.check_allowed(domid));
    PVHOST_TRY_CTX(core_.conn().call(Op::set_irq_level, {domid.value(), irq, level ? 1u : 0u}), "set_irq_level");
    return {};
  }
  Result<void> inject_msi(DomId domid, uint64_t addr, uint32_t data) override {
    PVHOST_TRY(core_.check_allowed(domid));
    PVHOST_TRY_CTX(core_.conn().call(Op::inject_msi, {domid.value(), addr, data}), "inject_msi");
    return {};
  }
  Result<void> restrict_to(DomId domid) override {
    core_.restrict_to(domid);
    return {};
  }

 private:
  Result<void> range(Op op, DomId domid, IoreqServerId id, bool mmio, uint64_t start, uint64_t end) {
    PVHOST_TRY(core_.check_allowed(domid));
    PVHOST_TRY_CTX(core_.conn().call(op, {domid.value(), id.value, mmio ? 1u : 0u, start, end}),
                   fmt::format("io range {:#x}-{:#x}", start, end));
    return {};
  }
  EmuCore& core_;
};

// A XenStore that is not there: for open_emulated_broker_only (tests of the broker alone).
class AbsentStore final : public XenStore {
 public:
  Result<std::string> read(Transaction, std::string_view) override { return none(); }
  Result<void> write(Transaction, std::string_view, std::string_view) override { return none(); }
  Result<std::vector<std::string>> directory(Transaction, std::string_view) override { return none(); }
  Result<void> mkdir(Transaction, std::string_view) override { return none(); }
  Result<void> rm(Transaction, std::string_view) override { return none(); }
  Result<std::vector<Permission>> get_permissions(Transaction, std::string_view) override { return none(); }
  Result<void> set_permissions(Transaction, std::string_view, std::span<const Permission>) override { return none(); }
  Result<Transaction> transaction_start() override { return none(); }
  Result<void> transaction_end(Transaction, bool) override { return none(); }
  Result<Watch> watch(std::string_view, WatchCallback) override { return none(); }
  Result<std::string> get_domain_path(DomId domid) override { return fmt::format("/local/domain/{}", domid); }
  Result<void> attach(EventLoop&) override { return none(); }

 protected:
  void unwatch(uint64_t) noexcept override {}

 private:
  static std::unexpected<Error> none() { return fail(ENOTCONN, "no xenstore in this emulated host"); }
};

class EmuXen final : public Xen {
 public:
  EmuXen(std::unique_ptr<EmuCore> core, std::unique_ptr<XenStore> store)
      : core_(std::move(core)), store_(std::move(store)), gnt_(*core_), fmem_(*core_), dm_(*core_) {}

  std::string_view kind() const override { return "emu"; }
  XenStore& store() override { return *store_; }
  GrantTables& grants() override { return gnt_; }
  ForeignMemory& foreign() override { return fmem_; }
  DeviceModel& device_model() override { return dm_; }
  Result<std::unique_ptr<EventChannels>> open_event_channels() override {
    auto conn = PVHOST_TRY_CTX(BrokerConnection::connect(core_->socket_path()), "open event channels");
    auto ports = PVHOST_TRY(xenemu::PortSet::create());
    return std::unique_ptr<EventChannels>(
        std::make_unique<EmuEventChannels>(std::move(conn), std::move(ports), core_->restricted()));
  }
  Result<DomainInfo> domain_info(DomId domid) override {
    auto r = core_->conn().call(Op::domain_info, {domid.value()});
    if (!r) {
      if (r.error().code() == ESRCH) return fail(ENOENT, fmt::format("dom{} does not exist", domid));
      return std::unexpected(std::move(r).error().add_context(fmt::format("domain info dom{}", domid)));
    }
    return DomainInfo{domid, r->hdr.vals[1] != 0, false, static_cast<uint32_t>(r->hdr.vals[2])};
  }
  Result<void> restrict_to(DomId domid) override {
    core_->restrict_to(domid);
    return {};
  }

 private:
  std::unique_ptr<EmuCore> core_;
  std::unique_ptr<XenStore> store_;
  EmuGrantTables gnt_;
  EmuForeignMemory fmem_;
  EmuDeviceModel dm_;
};

Result<std::unique_ptr<Xen>> open_with(const std::string& rundir, std::unique_ptr<XenStore> store) {
  auto conn = PVHOST_TRY_CTX(BrokerConnection::connect(rundir + "/" + std::string(xenemu::wire::kDom0Socket)),
                             fmt::format("emulated hypervisor in {}", rundir));
  auto core = std::make_unique<EmuCore>(rundir, std::move(conn));
  return std::unique_ptr<Xen>(std::make_unique<EmuXen>(std::move(core), std::move(store)));
}

}  // namespace

Result<std::unique_ptr<Xen>> open_emulated(const std::string& rundir) {
  auto store = PVHOST_TRY_CTX(XsClient::open(rundir + "/socket"), fmt::format("emulated xenstored in {}", rundir));
  return open_with(rundir, std::move(store));
}

// Declared in hw/xen/emu/broker/emu_xen.h.
Result<std::unique_ptr<Xen>> open_emulated_broker_only(const std::string& rundir) {
  return open_with(rundir, std::make_unique<AbsentStore>());
}

}  // namespace pvhost::xen
