// Client-side pieces shared by pvhost's emulated Xen (hw/xen/emu/broker/emu_xen.cc) and the
// guest library (hw/xen/emu/guest/): a broker connection, a process-local view of one
// domain's memory, grant-entry checks, and an event-channel port set.
// Header-only, so that xen_lib and the guest library never share an object file.
#pragma once

#include <sys/epoll.h>
#include <sys/eventfd.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>

extern "C" {
#include <xen/grant_table.h>
}

#include <fmt/format.h>

#include "hw/xen/emu/broker/wire.h"
#include "src/types.h"

namespace pvhost::xenemu {

// One connection to the broker. Thread-safe: one request at a time.
class BrokerConnection {
 public:
  struct Reply {
    wire::Response hdr;
    std::vector<uint64_t> items;
    std::vector<UniqueFd> fds;
  };

  [[nodiscard]] static Result<std::unique_ptr<BrokerConnection>> connect(const std::string& socket_path) {
    UniqueFd fd = PVHOST_TRY_CTX(wire::connect_seqpacket(socket_path), "connect to the hypervisor broker");
    auto c = std::unique_ptr<BrokerConnection>(new BrokerConnection(std::move(fd)));
    Reply hello = PVHOST_TRY_CTX(c->call(wire::Op::hello), "broker hello");
    c->domid_ = DomId(static_cast<uint16_t>(hello.hdr.vals[0]));
    c->strict_ = hello.hdr.vals[1] != 0;
    c->privileged_ = hello.hdr.vals[2] != 0;
    return c;
  }

  // Sends `op` and waits for its response; a non-zero response error becomes an Error.
  [[nodiscard]] Result<Reply> call(wire::Op op, std::initializer_list<uint64_t> args = {},
                                   std::span<const uint64_t> items = {}, std::string_view name = {}) {
    wire::Request req;
    req.op = static_cast<uint32_t>(op);
    req.nitems = static_cast<uint32_t>(items.size());
    size_t i = 0;
    for (uint64_t a : args) {
      if (i < std::size(req.args)) req.args[i++] = a;
    }
    wire::copy_name(req.name, name);
    std::lock_guard lock(mu_);
    PVHOST_TRY(wire::send_message(fd_.get(), req, items, {}));
    auto m = PVHOST_TRY(wire::recv_message<wire::Response>(fd_.get()));
    if (m.hdr.error != 0) {
      m.hdr.message[sizeof m.hdr.message - 1] = '\0';
      return fail(m.hdr.error, m.hdr.message);
    }
    return Reply{m.hdr, std::move(m.items), std::move(m.fds)};
  }

  [[nodiscard]] DomId domid() const { return domid_; }
  [[nodiscard]] bool strict() const { return strict_; }
  [[nodiscard]] bool privileged() const { return privileged_; }
  [[nodiscard]] int fd() const { return fd_.get(); }

 private:
  explicit BrokerConnection(UniqueFd fd) : fd_(std::move(fd)) {}
  std::mutex mu_;
  UniqueFd fd_;
  DomId domid_;
  bool strict_ = false;
  bool privileged_ = false;
};

// The grant rules of grant_table.h ("Introducing a valid entry into the grant table" and
// Xen's _set_status_v1): the entry must be GTF_permit_access for `mapper`, and not
// GTF_readonly when write access is wanted. Returns GNTST_okay or a GNTST_* error.
[[nodiscard]] inline int16_t check_grant_entry(uint16_t flags, uint16_t entry_domid, DomId mapper, bool write) {
  if ((flags & GTF_type_mask) != GTF_permit_access) return GNTST_permission_denied;
  if (entry_domid != mapper.value()) return GNTST_permission_denied;
  if (write && (flags & GTF_readonly) != 0) return GNTST_permission_denied;
  return GNTST_okay;
}

// flags (low 16 bits) and domid (high 16 bits) of a grant_entry_v1_t, read as one word so
// both come from the same instant, as Xen's shared-entry "scombo" does.
[[nodiscard]] inline uint32_t* grant_word(std::byte* table, uint32_t ref) {
  static_assert(sizeof(grant_entry_v1_t) == 8 && offsetof(grant_entry_v1_t, flags) == 0 &&
                offsetof(grant_entry_v1_t, domid) == 2);
  return reinterpret_cast<uint32_t*>(static_cast<void*>(table + size_t{ref} * sizeof(grant_entry_v1_t)));
}
[[nodiscard]] inline uint32_t* grant_frame(std::byte* table, uint32_t ref) {
  return reinterpret_cast<uint32_t*>(
      static_cast<void*>(table + size_t{ref} * sizeof(grant_entry_v1_t) + offsetof(grant_entry_v1_t, frame)));
}

// A process-local view of one domain's memory: the whole guest RAM (read-write) and its grant
// table (read-write: the guest writes entries, the broker sets GTF_reading/GTF_writing).
// The fds stay open so pages can be mapped one by one (strict mode, foreign maps).
struct DomainMemory {
  DomId domid;
  UniqueFd ram_fd;
  UniqueFd gnttab_fd;
  Mapping ram;
  Mapping gnttab;
  uint64_t ram_pages = 0;
  uint32_t grant_entries = 0;

  [[nodiscard]] static Result<std::shared_ptr<DomainMemory>> open(BrokerConnection& conn, DomId domid) {
    auto r = PVHOST_TRY(conn.call(wire::Op::domain_memory, {domid.value()}));
    if (r.fds.size() != 2) return fail(EPROTO, "domain_memory: expected two fds");
    auto m = std::make_shared<DomainMemory>();
    m->domid = domid;
    m->ram_pages = r.hdr.vals[0];
    m->grant_entries = static_cast<uint32_t>(r.hdr.vals[1]);
    m->ram_fd = std::move(r.fds[0]);
    m->gnttab_fd = std::move(r.fds[1]);
    m->ram = PVHOST_TRY_CTX(Mapping::map(m->ram_fd.get(), m->ram_pages * kPageSize, 0, PROT_READ | PROT_WRITE),
                            fmt::format("map RAM of dom{}", domid));
    const size_t gnt_bytes = (size_t{m->grant_entries} * sizeof(grant_entry_v1_t) + kPageSize - 1) / kPageSize * kPageSize;
    m->gnttab = PVHOST_TRY_CTX(Mapping::map(m->gnttab_fd.get(), gnt_bytes, 0, PROT_READ | PROT_WRITE),
                               fmt::format("map grant table of dom{}", domid));
    return m;
  }

  [[nodiscard]] std::byte* page(uint64_t gfn) const { return ram.data() + gfn * kPageSize; }

  // Checks a grant of this domain for a copy by `mapper` (GNTTABOP_copy rules) and returns the
  // granted page, or a GNTST_* error.
  [[nodiscard]] std::expected<std::byte*, int16_t> copy_target(uint32_t ref, DomId mapper, bool write) const {
    if (ref >= grant_entries) return std::unexpected(int16_t{GNTST_bad_gntref});
    // The guest may rewrite its entry at any time: read flags+domid once, then the frame.
    const uint32_t word = __atomic_load_n(grant_word(gnttab.data(), ref), __ATOMIC_ACQUIRE);
    const int16_t st = check_grant_entry(static_cast<uint16_t>(word & 0xffff), static_cast<uint16_t>(word >> 16),
                                         mapper, write);
    if (st != GNTST_okay) return std::unexpected(st);
    const uint32_t frame = __atomic_load_n(grant_frame(gnttab.data(), ref), __ATOMIC_ACQUIRE);
    if (frame >= ram_pages) return std::unexpected(int16_t{GNTST_bad_page});
    return page(frame);
  }
};

// Maps guest frames of `mem` at consecutive addresses. In strict mode every page is its own
// MAP_FIXED mapping inside a reserved PROT_NONE range with a guard page before and after it,
// so touching anything not granted faults. Otherwise consecutive frames are served from the premapped RAM
// view without any mmap (the returned Mapping is then empty).
struct PageMapping {
  std::byte* addr = nullptr;
  Mapping reservation;  // empty when served from the premapped view
};
[[nodiscard]] inline Result<PageMapping> map_frames(const DomainMemory& mem, std::span<const uint64_t> gfns,
                                                    bool write, bool strict) {
  if (gfns.empty()) return fail(EINVAL, "no frames to map");
  for (uint64_t g : gfns)
    if (g >= mem.ram_pages) return fail(EINVAL, fmt::format("gfn {:#x} outside dom{}'s RAM", g, mem.domid));
  bool consecutive = true;
  for (size_t i = 1; i < gfns.size(); ++i) consecutive = consecutive && gfns[i] == gfns[0] + i;
  if (!strict && consecutive) return PageMapping{mem.page(gfns[0]), Mapping()};
  Mapping res = PVHOST_TRY(Mapping::anonymous((gfns.size() + 2) * kPageSize, PROT_NONE));
  const int prot = write ? PROT_READ | PROT_WRITE : PROT_READ;
  for (size_t i = 0; i < gfns.size(); ++i) {
    void* want = res.data() + (i + 1) * kPageSize;
    void* p = ::mmap(want, kPageSize, prot, MAP_SHARED | MAP_FIXED, mem.ram_fd.get(),
                     static_cast<off_t>(gfns[i] * kPageSize));
    if (p == MAP_FAILED) return fail_errno(fmt::format("mmap gfn {:#x}", gfns[i]));
  }
  std::byte* addr = res.data() + kPageSize;
  return PageMapping{addr, std::move(res)};
}

// The ports of one event-channel handle, polled through one epoll fd. A port's recv eventfd
// is registered EPOLLONESHOT: once pending() reports it the port is masked until unmask()
// re-arms it (event_channel.h: a pending event is masked until the guest/backend unmasks).
class PortSet {
 public:
  [[nodiscard]] static Result<PortSet> create() {
    PortSet s;
    s.epfd_ = UniqueFd(::epoll_create1(EPOLL_CLOEXEC));
    if (!s.epfd_) return fail_errno("epoll_create1");
    return s;
  }

  [[nodiscard]] Result<void> add(Port port, UniqueFd recv, UniqueFd send) {
    PVHOST_TRY(set_nonblocking(recv.get()));
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.u32 = port.value();
    if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, recv.get(), &ev) != 0) return fail_errno("epoll_ctl add");
    std::lock_guard lock(*mu_);
    ports_[port.value()] = Entry{std::move(recv), std::move(send)};
    return {};
  }
  void remove(Port port) {
    std::lock_guard lock(*mu_);
    auto it = ports_.find(port.value());
    if (it == ports_.end()) return;
    // The fd is closed right after; EPOLL_CTL_DEL failing changes nothing.
    (void)::epoll_ctl(epfd_.get(), EPOLL_CTL_DEL, it->second.recv.get(), nullptr);
    ports_.erase(it);
  }
  [[nodiscard]] bool contains(Port port) const {
    std::lock_guard lock(*mu_);
    return ports_.contains(port.value());
  }
  // A plain eventfd write towards the peer: no broker on the data path.
  [[nodiscard]] Result<void> notify(Port port) {
    int fd = -1;
    {
      std::lock_guard lock(*mu_);
      auto it = ports_.find(port.value());
      if (it == ports_.end()) return fail(EINVAL, fmt::format("notify: port {} not bound here", port));
      fd = it->second.send.get();
    }
    const uint64_t one = 1;
    if (::write(fd, &one, sizeof one) != sizeof one) return fail_errno(fmt::format("notify port {}", port));
    return {};
  }
  [[nodiscard]] Result<void> unmask(Port port) {
    std::lock_guard lock(*mu_);
    auto it = ports_.find(port.value());
    if (it == ports_.end()) return fail(EINVAL, fmt::format("unmask: port {} not bound here", port));
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLONESHOT;
    ev.data.u32 = port.value();
    if (::epoll_ctl(epfd_.get(), EPOLL_CTL_MOD, it->second.recv.get(), &ev) != 0) return fail_errno("epoll_ctl mod");
    return {};
  }
  [[nodiscard]] Result<std::optional<Port>> pending(int timeout_ms = 0) {
    epoll_event ev{};
    int n;
    do {
      n = ::epoll_wait(epfd_.get(), &ev, 1, timeout_ms);
    } while (n < 0 && errno == EINTR);
    if (n < 0) return fail_errno("epoll_wait");
    if (n == 0) return std::optional<Port>();
    std::lock_guard lock(*mu_);
    auto it = ports_.find(ev.data.u32);
    if (it != ports_.end()) {
      uint64_t count = 0;
      // Clears the eventfd; EAGAIN (already cleared) is fine.
      (void)::read(it->second.recv.get(), &count, sizeof count);
    }
    return std::optional<Port>(Port(ev.data.u32));
  }
  [[nodiscard]] int fd() const { return epfd_.get(); }

 private:
  struct Entry {
    UniqueFd recv;  // readable when the peer notified us
    UniqueFd send;  // written to notify the peer
  };
  UniqueFd epfd_;
  std::unique_ptr<std::mutex> mu_ = std::make_unique<std::mutex>();
  std::map<uint32_t, Entry> ports_;
};

}  // namespace pvhost::xenemu
