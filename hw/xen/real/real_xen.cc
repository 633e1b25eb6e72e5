// The real Xen implementation of the interface layer, over libxenstore, libxenevtchn,
// libxengnttab, libxenforeignmemory, libxendevicemodel and libxenctrl.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <cstdint>

// Xen's library headers carry no extern "C" guards. xenctrl.h comes first: it defines
// __XEN_TOOLS__, which the public headers below need.
extern "C" {
#include <xenctrl.h>
#include <xen/hvm/ioreq.h>
#include <xen/memory.h>

#include <xendevicemodel.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
#include <xengnttab.h>
#include <xentoolcore.h>
#include <xentoollog.h>
}

#include <cstdarg>
#include <cstdio>
#include <mutex>

#include "hw/xen/xen.h"
#include "hw/xen/xs_client.h"
#include "src/log.h"

namespace pvhost::xen {
namespace {

// Routes libxen* messages into our log at debug level: the libraries print their own
// errors otherwise (libxencall in particular), and every failure reaches us as errno anyway.
struct QuietLogger {
  xentoollog_logger base;
};

void quiet_vmessage(xentoollog_logger*, xentoollog_level level, int errnoval, const char* context,
                    const char* format, va_list al) {
  if (!log::enabled(log::Level::debug)) return;
  char buf[512];
  std::vsnprintf(buf, sizeof buf, format, al);
  log::debug("libxen {} (level {}, errno {}): {}", context ? context : "?", static_cast<int>(level),
             errnoval, buf);
}
void quiet_progress(xentoollog_logger*, const char*, const char*, int, unsigned long, unsigned long) {}
void quiet_destroy(xentoollog_logger*) {}

xentoollog_logger* quiet_logger() {
  static QuietLogger logger{{quiet_vmessage, quiet_progress, quiet_destroy}};
  return &logger.base;
}

int prot_of(Access a) { return a == Access::read_only ? PROT_READ : PROT_READ | PROT_WRITE; }

class RealEventChannels final : public EventChannels {
 public:
  explicit RealEventChannels(xenevtchn_handle* h) : h_(h) {}
  ~RealEventChannels() override { xenevtchn_close(h_); }

  Result<Port> bind_interdomain(DomId remote, Port remote_port) override {
    xenevtchn_port_or_error_t p = xenevtchn_bind_interdomain(h_, remote.value(), remote_port.value());
    if (p < 0) return fail_errno(fmt::format("bind_interdomain dom{} port {}", remote, remote_port));
    return Port(static_cast<uint32_t>(p));
  }
  Result<Port> alloc_unbound(DomId remote) override {
    xenevtchn_port_or_error_t p = xenevtchn_bind_unbound_port(h_, remote.value());
    if (p < 0) return fail_errno(fmt::format("alloc_unbound for dom{}", remote));
    return Port(static_cast<uint32_t>(p));
  }
  Result<void> unbind(Port local) override {
    if (xenevtchn_unbind(h_, local.value()) != 0) return fail_errno(fmt::format("unbind port {}", local));
    return {};
  }
  Result<void> notify(Port local) override {
    if (xenevtchn_notify(h_, local.value()) != 0) return fail_errno(fmt::format("notify port {}", local));
    return {};
  }
  Result<void> unmask(Port local) override {
    if (xenevtchn_unmask(h_, local.value()) != 0) return fail_errno(fmt::format("unmask port {}", local));
    return {};
  }
  int fd() const override { return xenevtchn_fd(h_); }
  Result<std::optional<Port>> pending() override {
    xenevtchn_port_or_error_t p = xenevtchn_pending(h_);
    if (p < 0) {
      if (errno == EAGAIN) return std::optional<Port>();
      return fail_errno("evtchn pending");
    }
    return std::optional<Port>(Port(static_cast<uint32_t>(p)));
  }
  Result<void> restrict_to(DomId domid) override {
    if (xenevtchn_restrict(h_, domid.value()) != 0) return fail_errno("xenevtchn_restrict");
    return {};
  }

 private:
  xenevtchn_handle* h_;
};

class RealGrantTables final : public GrantTables, public Unmapper {
 public:
  explicit RealGrantTables(xengnttab_handle* h) : h_(h) {}
  ~RealGrantTables() override { xengnttab_close(h_); }

  Result<GuestMapping> map_refs(DomId domid, std::span<const GrantRef> refs, Access access) override {
    std::vector<uint32_t> raw(refs.size());
    for (size_t i = 0; i < refs.size(); ++i) raw[i] = refs[i].value();
    void* p = xengnttab_map_domain_grant_refs(h_, static_cast<uint32_t>(raw.size()), domid.value(),
                                              raw.data(), prot_of(access));
    if (p == nullptr) return fail_errno(fmt::format("map {} grant refs of dom{}", refs.size(), domid));
    return GuestMapping(static_cast<std::byte*>(p), refs.size(), this);
  }
  void unmap(GuestMapping& m) noexcept override {
    if (xengnttab_unmap(h_, m.data(), static_cast<uint32_t>(m.pages())) != 0)
      log::error("unmap {} grant pages: {}", m.pages(), errno_name(errno));
  }
  Result<void> copy(std::span<GrantCopySegment> segs) override {
    std::vector<xengnttab_grant_copy_segment_t> raw(segs.size());
    for (size_t i = 0; i < segs.size(); ++i) {
      const GrantCopySegment& s = segs[i];
      auto& r = raw[i];
      r = {};
      r.len = s.length;
      if (s.direction == GrantCopySegment::Direction::from_guest) {
        r.flags = GNTCOPY_source_gref;
        r.source.foreign.ref = s.ref.value();
        r.source.foreign.offset = s.offset;
        r.source.foreign.domid = s.domid.value();
        r.dest.virt = s.local;
      } else {
        r.flags = GNTCOPY_dest_gref;
        r.dest.foreign.ref = s.ref.value();
        r.dest.foreign.offset = s.offset;
        r.dest.foreign.domid = s.domid.value();
        r.source.virt = s.local;
      }
    }
    if (xengnttab_grant_copy(h_, static_cast<uint32_t>(raw.size()), raw.data()) != 0)
      return fail_errno("grant copy");
    for (size_t i = 0; i < segs.size(); ++i) segs[i].status = raw[i].status;
    return {};
  }
  Result<void> set_max_grants(uint32_t count) override {
    if (xengnttab_set_max_grants(h_, count) != 0) return fail_errno("xengnttab_set_max_grants");
    return {};
  }
  bool supports_copy() const override { return true; }

 private:
  xengnttab_handle* h_;
};

class RealForeignMemory final : public ForeignMemory, public Unmapper {
 public:
  explicit RealForeignMemory(xenforeignmemory_handle* h) : h_(h) {}
  ~RealForeignMemory() override { xenforeignmemory_close(h_); }

  Result<GuestMapping> map(DomId domid, std::span<const Gfn> gfns, Access access) override {
    std::vector<xen_pfn_t> arr(gfns.size());
    for (size_t i = 0; i < gfns.size(); ++i) arr[i] = gfns[i].value();
    std::vector<int> err(gfns.size());
    void* p = xenforeignmemory_map(h_, domid.value(), prot_of(access), gfns.size(), arr.data(), err.data());
    if (p == nullptr) return fail_errno(fmt::format("foreign map {} frames of dom{}", gfns.size(), domid));
    GuestMapping m(static_cast<std::byte*>(p), gfns.size(), this);
    for (size_t i = 0; i < err.size(); ++i)
      if (err[i] != 0) return fail(-err[i], fmt::format("foreign map gfn {:#x} of dom{}", gfns[i].value(), domid));
    return m;
  }
  Result<GuestMapping> map_resource(DomId domid, unsigned type, unsigned id, uint64_t frame, size_t nr,
                                    Access access) override {
    void* addr = nullptr;
    xenforeignmemory_resource_handle* res =
        xenforeignmemory_map_resource(h_, domid.value(), type, id, frame, nr, &addr, prot_of(access), 0);
    if (res == nullptr) return fail_errno(fmt::format("map resource type {} id {} of dom{}", type, id, domid));
    return GuestMapping(static_cast<std::byte*>(addr), nr, &resource_unmapper_,
                        reinterpret_cast<uint64_t>(res));
  }
  void unmap(GuestMapping& m) noexcept override {
    if (xenforeignmemory_unmap(h_, m.data(), m.pages()) != 0)
      log::error("foreign unmap {} pages: {}", m.pages(), errno_name(errno));
  }
  Result<void> restrict_to(DomId domid) override {
    if (xenforeignmemory_restrict(h_, domid.value()) != 0) return fail_errno("xenforeignmemory_restrict");
    return {};
  }

 private:
  struct ResourceUnmapper final : Unmapper {
    RealForeignMemory* self;
    explicit ResourceUnmapper(RealForeignMemory* s) : self(s) {}
    void unmap(GuestMapping& m) noexcept override {
      auto* res = reinterpret_cast<xenforeignmemory_resource_handle*>(m.cookie());
      if (xenforeignmemory_unmap_resource(self->h_, res) != 0)
        log::error("unmap resource: {}", errno_name(errno));
    }
  };
  xenforeignmemory_handle* h_;
  ResourceUnmapper resource_unmapper_{this};
};

class RealDeviceModel final : public DeviceModel {
 public:
  RealDeviceModel(xendevicemodel_handle* h, RealForeignMemory* fmem, xc_interface* xc)
      : h_(h), fmem_(fmem), xc_(xc) {}
  ~RealDeviceModel() override { xendevicemodel_close(h_); }

  Result<IoreqServerId> create_ioreq_server(DomId domid, bool buffered) override {
    ioservid_t id = 0;
    if (xendevicemodel_create_ioreq_server(h_, domid.value(),
                                           buffered ? HVM_IOREQSRV_BUFIOREQ_ATOMIC : HVM_IOREQSRV_BUFIOREQ_OFF,
                                           &id) != 0)
      return fail_errno(fmt::format("create ioreq server for dom{}", domid));
    return IoreqServerId{id};
  }
  Result<std::vector<Port>> ioreq_server_ports(DomId domid, IoreqServerId id) override {
    // The synchronous ioreq page is resource frame 1 (XENMEM_resource_ioreq_server_frame_ioreq(0)).
    GuestMapping page = PVHOST_TRY(fmem_->map_resource(domid, XENMEM_resource_ioreq_server, id.value,
                                                       XENMEM_resource_ioreq_server_frame_ioreq(0), 1,
                                                       Access::read_only));
    xc_dominfo_t info{};
    if (xc_domain_getinfo(xc_, domid.value(), 1, &info) != 1 || info.domid != domid.value())
      return fail(ENOENT, fmt::format("dom{} not found", domid));
    std::vector<Port> ports;
    const auto* iopage = reinterpret_cast<const shared_iopage_t*>(page.data());
    for (unsigned v = 0; v <= info.max_vcpu_id; ++v) {
      // Written by Xen, not the guest; still read once.
      ports.emplace_back(__atomic_load_n(&iopage->vcpu_ioreq[v].vp_eport, __ATOMIC_ACQUIRE));
    }
    return ports;
  }
  Result<void> map_io_range(DomId domid, IoreqServerId id, bool mmio, uint64_t start, uint64_t end) override {
    if (xendevicemodel_map_io_range_to_ioreq_server(h_, domid.value(), id.value, mmio, start, end) != 0)
      return fail_errno(fmt::format("map io range {:#x}-{:#x}", start, end));
    return {};
  }
  Result<void> unmap_io_range(DomId domid, IoreqServerId id, bool mmio, uint64_t start, uint64_t end) override {
    if (xendevicemodel_unmap_io_range_from_ioreq_server(h_, domid.value(), id.value, mmio, start, end) != 0)
      return fail_errno(fmt::format("unmap io range {:#x}-{:#x}", start, end));
    return {};
  }
  Result<void> set_ioreq_server_state(DomId domid, IoreqServerId id, bool enabled) override {
    if (xendevicemodel_set_ioreq_server_state(h_, domid.value(), id.value, enabled) != 0)
      return fail_errno("set ioreq server state");
    return {};
  }
  Result<void> destroy_ioreq_server(DomId domid, IoreqServerId id) override {
    if (xendevicemodel_destroy_ioreq_server(h_, domid.value(), id.value) != 0)
      return fail_errno("destroy ioreq server");
    return {};
  }
  Result<void> set_irq_level(DomId domid, uint32_t irq, bool level) override {
    if (xendevicemodel_set_irq_level(h_, domid.value(), irq, level) != 0) return fail_errno("set_irq_level");
    return {};
  }
  Result<void> inject_msi(DomId domid, uint64_t addr, uint32_t data) override {
    if (xendevicemodel_inject_msi(h_, domid.value(), addr, data) != 0) return fail_errno("inject_msi");
    return {};
  }
  Result<void> restrict_to(DomId domid) override {
    if (xendevicemodel_restrict(h_, domid.value()) != 0) return fail_errno("xendevicemodel_restrict");
    return {};
  }

 private:
  xendevicemodel_handle* h_;
  RealForeignMemory* fmem_;
  xc_interface* xc_;
};

class RealXen final : public Xen {
 public:
  std::string_view kind() const override { return "real"; }
  XenStore& store() override { return *store_; }
  GrantTables& grants() override { return *gnt_; }
  ForeignMemory& foreign() override { return *fmem_; }
  DeviceModel& device_model() override { return *dm_; }
  Result<std::unique_ptr<EventChannels>> open_event_channels() override {
    xenevtchn_handle* h = xenevtchn_open(quiet_logger(), 0);
    if (h == nullptr) return fail_errno("open /dev/xen/evtchn");
    auto ch = std::make_unique<RealEventChannels>(h);
    // libxenevtchn opens /dev/xen/evtchn blocking; pending() must not block (callers drain
    // it until nothing is left, as the emulated channels allow). Found on real Xen: the
    // second pending() of the first event blocked the queue's thread for good.
    const int fd = xenevtchn_fd(h);
    const int flags = ::fcntl(fd, F_GETFL);
    if (flags < 0 || ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0) return fail_errno("evtchn fd O_NONBLOCK");
    if (restricted_) PVHOST_TRY(ch->restrict_to(*restricted_));
    return ch;
  }
  Result<DomainInfo> domain_info(DomId domid) override {
    xc_dominfo_t info{};
    int n = xc_domain_getinfo(xc_, domid.value(), 1, &info);
    if (n < 0) return fail_errno(fmt::format("domain info dom{}", domid));
    if (n == 0 || info.domid != domid.value()) return fail(ENOENT, fmt::format("dom{} does not exist", domid));
    return DomainInfo{domid, info.dying != 0, info.shutdown != 0, info.max_vcpu_id};
  }
  Result<void> restrict_to(DomId domid) override {
    // Restricts every libxen* handle of the process, as QEMU's dm_restrict does.
    if (::xentoolcore_restrict_all(domid.value()) != 0) return fail_errno("xentoolcore_restrict_all");
    restricted_ = domid;
    return {};
  }
  ~RealXen() override {
    dm_.reset();
    fmem_.reset();
    gnt_.reset();
    store_.reset();
    if (xc_ != nullptr) xc_interface_close(xc_);
  }

  xc_interface* xc_ = nullptr;
  std::unique_ptr<XsClient> store_;
  std::unique_ptr<RealGrantTables> gnt_;
  std::unique_ptr<RealForeignMemory> fmem_;
  std::unique_ptr<RealDeviceModel> dm_;
  std::optional<DomId> restricted_;
};

}  // namespace

Result<std::unique_ptr<Xen>> open_real() {
  struct stat st;
  if (::stat("/dev/xen/privcmd", &st) != 0)
    return fail(ENOENT, "no Xen hypervisor: /dev/xen/privcmd not present; use --xen=emu for the emulated hypervisor");
  auto x = std::make_unique<RealXen>();
  x->xc_ = xc_interface_open(quiet_logger(), quiet_logger(), 0);
  if (x->xc_ == nullptr) return fail_errno("open libxenctrl (/dev/xen/privcmd)");
  x->store_ = PVHOST_TRY(XsClient::open(std::nullopt));
  xengnttab_handle* g = xengnttab_open(quiet_logger(), 0);
  if (g == nullptr) return fail_errno("open /dev/xen/gntdev");
  x->gnt_ = std::make_unique<RealGrantTables>(g);
  xenforeignmemory_handle* f = xenforeignmemory_open(quiet_logger(), 0);
  if (f == nullptr) return fail_errno("open foreign memory (/dev/xen/privcmd)");
  x->fmem_ = std::make_unique<RealForeignMemory>(f);
  xendevicemodel_handle* d = xendevicemodel_open(quiet_logger(), 0);
  if (d == nullptr) return fail_errno("open libxendevicemodel");
  x->dm_ = std::make_unique<RealDeviceModel>(d, x->fmem_.get(), x->xc_);
  return std::unique_ptr<Xen>(std::move(x));
}

}  // namespace pvhost::xen
