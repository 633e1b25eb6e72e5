#include "hw/xen/emu/guest/guest.h"

#include <poll.h>

#include <cstdint>

extern "C" {
#include <xen/grant_table.h>
#include <xen/hvm/ioreq.h>
}

#include "hw/xen/emu/broker/client.h"

namespace pvhost::xenemu {

using wire::Op;

// --- toolstack ---------------------------------------------------------------------------

Toolstack::Toolstack(std::unique_ptr<BrokerConnection> conn) : conn_(std::move(conn)) {}
Toolstack::~Toolstack() = default;

Result<std::unique_ptr<Toolstack>> Toolstack::connect(const std::string& rundir) {
  auto conn = PVHOST_TRY(BrokerConnection::connect(rundir + "/" + std::string(wire::kDom0Socket)));
  return std::unique_ptr<Toolstack>(new Toolstack(std::move(conn)));
}

Result<DomId> Toolstack::create_domain(const DomainConfig& c) {
  auto r = PVHOST_TRY_CTX(conn_->call(Op::domain_create, {c.memory_mib, c.vcpus, c.max_grant_frames}, {}, c.name),
                          fmt::format("create domain '{}'", c.name));
  return DomId(static_cast<uint16_t>(r.hdr.vals[0]));
}

Result<void> Toolstack::destroy_domain(DomId domid) {
  PVHOST_TRY_CTX(conn_->call(Op::domain_destroy, {domid.value()}), fmt::format("destroy dom{}", domid));
  return {};
}

Result<DomainSummary> Toolstack::domain_info(DomId domid) {
  auto r = conn_->call(Op::domain_info, {domid.value()});
  if (!r) {
    if (r.error().code() == ESRCH) return fail(ENOENT, fmt::format("dom{} does not exist", domid));
    return std::unexpected(std::move(r).error());
  }
  DomainSummary s;
  s.domid = domid;
  s.dying = r->hdr.vals[1] != 0;
  s.vcpus = static_cast<uint32_t>(r->hdr.vals[2] + 1);
  s.memory_mib = r->hdr.vals[3];
  s.max_grant_frames = static_cast<uint32_t>(r->hdr.vals[4]);
  r->hdr.message[sizeof r->hdr.message - 1] = '\0';
  s.name = r->hdr.message;
  return s;
}

Result<std::vector<DomainSummary>> Toolstack::list_domains() {
  auto r = PVHOST_TRY_CTX(conn_->call(Op::domain_list), "list domains");
  std::vector<DomainSummary> out;
  for (uint64_t id : r.items) {
    auto s = domain_info(DomId(static_cast<uint16_t>(id)));
    if (s) out.push_back(std::move(*s));  // a domain reaped in between is simply not listed
  }
  return out;
}

// --- guest -------------------------------------------------------------------------------

// A cached ioreq server: its shared page and the vCPU's vp_eport eventfds.
struct Guest::IoreqServerView {
  Mapping page;
  UniqueFd recv;
  UniqueFd send;
};

Guest::~Guest() = default;

Result<std::unique_ptr<Guest>> Guest::connect(const std::string& rundir, DomId domid) {
  auto g = std::unique_ptr<Guest>(new Guest());
  g->domid_ = domid;
  g->conn_ = PVHOST_TRY_CTX(BrokerConnection::connect(rundir + "/" + wire::domain_socket_name(domid.value())),
                            fmt::format("connect as dom{}", domid));
  g->mem_ = PVHOST_TRY(DomainMemory::open(*g->conn_, domid));
  g->ports_ = std::make_unique<PortSet>(PVHOST_TRY(PortSet::create()));
  return g;
}

bool Guest::strict() const { return conn_->strict(); }
uint64_t Guest::ram_pages() const { return mem_->ram_pages; }
std::byte* Guest::page(Gfn gfn) const { return gfn.value() < mem_->ram_pages ? mem_->page(gfn.value()) : nullptr; }

Result<GuestPages> Guest::alloc_pages(size_t count) {
  auto r = PVHOST_TRY_CTX(conn_->call(Op::guest_alloc_pages, {count}), fmt::format("allocate {} pages", count));
  const Gfn gfn(r.hdr.vals[0]);
  std::byte* p = mem_->page(gfn.value());
  std::memset(p, 0, count * kPageSize);
  return GuestPages{gfn, count, p};
}

Result<void> Guest::free_pages(const GuestPages& pages) {
  PVHOST_TRY(conn_->call(Op::guest_free_pages, {pages.gfn.value(), pages.count}));
  return {};
}

Result<GrantRef> Guest::grant_access(DomId backend, Gfn gfn, ReadOnly ro) {
  if (gfn.value() >= mem_->ram_pages) return fail(EINVAL, fmt::format("grant gfn {:#x}: outside RAM", gfn.value()));
  if (free_refs_.empty()) {
    auto r = PVHOST_TRY_CTX(conn_->call(Op::guest_alloc_refs, {32}), "allocate grant refs");
    for (uint64_t ref : r.items) free_refs_.push_back(static_cast<uint32_t>(ref));
  }
  const uint32_t ref = free_refs_.back();
  free_refs_.pop_back();
  // grant_table.h: write frame and domid, then flags after a write barrier.
  __atomic_store_n(grant_frame(mem_->gnttab.data(), ref), static_cast<uint32_t>(gfn.value()), __ATOMIC_RELAXED);
  const uint16_t flags = static_cast<uint16_t>(GTF_permit_access | (ro == ReadOnly::yes ? GTF_readonly : 0));
  __atomic_store_n(grant_word(mem_->gnttab.data(), ref), uint32_t{flags} | (uint32_t{backend.value()} << 16),
                   __ATOMIC_RELEASE);
  return GrantRef(ref);
}

Result<void> Guest::end_access(GrantRef ref) {
  if (ref.value() >= mem_->grant_entries) return fail(EINVAL, fmt::format("grant ref {} out of range", ref));
  uint32_t* w = grant_word(mem_->gnttab.data(), ref.value());
  uint32_t old = __atomic_load_n(w, __ATOMIC_ACQUIRE);
  // gnttab_end_foreign_access_ref (v1): clear flags with cmpxchg unless reading/writing.
  do {
    if ((old & (GTF_reading | GTF_writing)) != 0)
      return fail(EBUSY, fmt::format("grant ref {} is still mapped by the backend", ref));
  } while (!__atomic_compare_exchange_n(w, &old, old & 0xffff0000u, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
  free_refs_.push_back(ref.value());
  return {};
}

bool Guest::grant_in_use(GrantRef ref) const {
  if (ref.value() >= mem_->grant_entries) return false;
  return (__atomic_load_n(grant_word(mem_->gnttab.data(), ref.value()), __ATOMIC_ACQUIRE) &
          (GTF_reading | GTF_writing)) != 0;
}

Result<Port> Guest::alloc_unbound(DomId remote) {
  auto r = PVHOST_TRY_CTX(conn_->call(Op::evtchn_alloc_unbound, {remote.value()}),
                          fmt::format("alloc_unbound for dom{}", remote));
  if (r.fds.size() != 2) return fail(EPROTO, "alloc_unbound without eventfds");
  const Port port(static_cast<uint32_t>(r.hdr.vals[0]));
  PVHOST_TRY(ports_->add(port, std::move(r.fds[0]), std::move(r.fds[1])));
  return port;
}

Result<Port> Guest::bind_interdomain(DomId remote, Port remote_port) {
  auto r = PVHOST_TRY_CTX(conn_->call(Op::evtchn_bind_interdomain, {remote.value(), remote_port.value()}),
                          fmt::format("bind_interdomain dom{} port {}", remote, remote_port));
  if (r.fds.size() != 2) return fail(EPROTO, "bind_interdomain without eventfds");
  const Port port(static_cast<uint32_t>(r.hdr.vals[0]));
  PVHOST_TRY(ports_->add(port, std::move(r.fds[0]), std::move(r.fds[1])));
  return port;
}

Result<void> Guest::close_port(Port port) {
  ports_->remove(port);
  PVHOST_TRY_CTX(conn_->call(Op::evtchn_close, {port.value()}), fmt::format("close port {}", port));
  return {};
}

Result<void> Guest::notify(Port port) { return ports_->notify(port); }
Result<void> Guest::unmask(Port port) { return ports_->unmask(port); }
int Guest::event_fd() const { return ports_->fd(); }
Result<std::optional<Port>> Guest::wait_event(std::chrono::milliseconds timeout) {
  return ports_->pending(static_cast<int>(timeout.count()));
}

Result<uint64_t> Guest::mmio_read(uint64_t addr, unsigned size) { return io(true, addr, size, true, 0); }
Result<void> Guest::mmio_write(uint64_t addr, unsigned size, uint64_t value) {
  PVHOST_TRY(io(true, addr, size, false, value));
  return {};
}
Result<uint64_t> Guest::pio_read(uint16_t port, unsigned size) { return io(false, port, size, true, 0); }
Result<void> Guest::pio_write(uint16_t port, unsigned size, uint64_t value) {
  PVHOST_TRY(io(false, port, size, false, value));
  return {};
}

// The vCPU side of hvm/ioreq.h on vCPU 0: fill the ioreq_t, publish STATE_IOREQ_READY,
// notify vp_eport, wait for STATE_IORESP_READY, take the data, return the slot to NONE.
Result<uint64_t> Guest::io(bool mmio, uint64_t addr, unsigned size, bool read, uint64_t value) {
  if (size != 1 && size != 2 && size != 4 && size != 8) return fail(EINVAL, fmt::format("access size {}", size));
  const uint64_t mask = size == 8 ? ~uint64_t{0} : (uint64_t{1} << (size * 8)) - 1;
  auto r = PVHOST_TRY_CTX(conn_->call(Op::guest_ioreq_lookup, {mmio ? 1u : 0u, addr, 0}),
                          fmt::format("{} {:#x}", mmio ? "mmio" : "pio", addr));
  if (r.hdr.vals[0] == 0) return read ? mask : 0;  // unassigned: reads as all ones
  const uint64_t key = (r.hdr.vals[1] << 32) | r.hdr.vals[2];
  auto it = ioreq_.find(key);
  if (it == ioreq_.end()) {
    if (r.fds.size() != 3) return fail(EPROTO, "ioreq lookup without page and port");
    auto v = std::make_unique<IoreqServerView>();
    v->page = PVHOST_TRY(Mapping::map(r.fds[0].get(), kPageSize, 0, PROT_READ | PROT_WRITE));
    v->recv = std::move(r.fds[1]);
    v->send = std::move(r.fds[2]);
    it = ioreq_.emplace(key, std::move(v)).first;
  }
  // hvm/ioreq.h layout: the state/flags bitfield byte sits between _pad0 and type.
  static_assert(sizeof(ioreq_t) == 32 && offsetof(ioreq_t, _pad0) == 28 && offsetof(ioreq_t, type) == 31);
  IoreqServerView& view = *it->second;
  auto* slot = reinterpret_cast<ioreq_t*>(static_cast<void*>(view.page.data()));  // vcpu_ioreq[0]
  // The state/flags byte follows _pad0 (hvm/ioreq.h): state:4, data_is_ptr:1, dir:1, df:1.
  auto* state_byte = reinterpret_cast<uint8_t*>(&slot->_pad0) + sizeof slot->_pad0;
  const auto state_of = [&] { return static_cast<uint8_t>(__atomic_load_n(state_byte, __ATOMIC_ACQUIRE) & 0xf); };
  if (state_of() != STATE_IOREQ_NONE) return fail(EBUSY, "vCPU 0 has an ioreq in flight");
  slot->addr = addr;
  slot->data = read ? 0 : value & mask;
  slot->count = 1;
  slot->size = size;
  slot->type = mmio ? IOREQ_TYPE_COPY : IOREQ_TYPE_PIO;
  const uint8_t dir = read ? IOREQ_READ : IOREQ_WRITE;
  __atomic_store_n(state_byte, static_cast<uint8_t>(STATE_IOREQ_READY | (dir << 5)), __ATOMIC_RELEASE);
  const uint64_t one = 1;
  if (::write(view.send.get(), &one, sizeof one) != sizeof one) return fail_errno("notify vp_eport");
  const auto deadline = std::chrono::steady_clock::now() + io_timeout_;
  while (state_of() != STATE_IORESP_READY) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      // Abandon the request: the device model may still answer; the next access checks.
      return fail(ETIMEDOUT, fmt::format("{} {:#x}: no response from the device model", mmio ? "mmio" : "pio", addr));
    }
    pollfd pfd{view.recv.get(), POLLIN, 0};
    if (::poll(&pfd, 1, static_cast<int>(left.count())) < 0 && errno != EINTR) return fail_errno("poll vp_eport");
    uint64_t count = 0;
    (void)::read(view.recv.get(), &count, sizeof count);  // EAGAIN: spurious wake, fine
  }
  const uint64_t data = __atomic_load_n(&slot->data, __ATOMIC_ACQUIRE);
  __atomic_store_n(state_byte, static_cast<uint8_t>(STATE_IOREQ_NONE), __ATOMIC_RELEASE);
  return read ? data & mask : 0;
}

Result<int> Guest::interrupt_fd() {
  if (!interrupts_) {
    auto r = PVHOST_TRY_CTX(conn_->call(Op::guest_interrupts), "subscribe to interrupts");
    if (r.fds.size() != 1) return fail(EPROTO, "guest_interrupts without a socket");
    interrupts_ = std::move(r.fds[0]);
    PVHOST_TRY(set_nonblocking(interrupts_.get()));
  }
  return interrupts_.get();
}

Result<std::optional<Interrupt>> Guest::next_interrupt() {
  const int fd = PVHOST_TRY(interrupt_fd());
  wire::InterruptRecord rec;
  const ssize_t n = ::recv(fd, &rec, sizeof rec, MSG_DONTWAIT);
  if (n < 0) {
    if (errno == EAGAIN) return std::optional<Interrupt>();
    return fail_errno("receive interrupt");
  }
  if (n != sizeof rec) return fail(EPROTO, "short interrupt record");
  Interrupt i;
  if (rec.kind == wire::kInterruptMsi) {
    i.kind = Interrupt::Kind::msi;
    i.addr = rec.addr;
    i.data = rec.data;
  } else {
    i.kind = Interrupt::Kind::irq_level;
    i.irq = rec.irq;
    i.level = rec.level != 0;
  }
  return std::optional<Interrupt>(i);
}

}  // namespace pvhost::xenemu
