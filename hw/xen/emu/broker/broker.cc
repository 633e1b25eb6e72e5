#include "hw/xen/emu/broker/broker.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>

extern "C" {
#include <xen/grant_table.h>
#include <xen/hvm/ioreq.h>
}

#include <map>
#include <set>
#include <vector>

#include "hw/xen/emu/broker/client.h"
#include "hw/xen/emu/broker/wire.h"
#include "src/log.h"

namespace pvhost::xenemu {
namespace {

using wire::Op;

constexpr uint16_t kMaxDomid = 0x7FEF;        // DOMID_FIRST_RESERVED - 1 (xen.h)
constexpr uint32_t kMaxPorts = 4096;          // EVTCHN_2L_NR_CHANNELS for 64-bit guests
constexpr uint32_t kReservedGrantRefs = 8;    // GNTTAB_NR_RESERVED_ENTRIES (console, xenstore)
constexpr uint32_t kMaxVcpus = 128;           // ioreq_t slots in one shared_iopage_t page
constexpr uint64_t kMaxMemoryMib = 16384;
constexpr uint32_t kMaxGrantFrames = 256;

struct Client;

// One event-channel port (event_channel.h): ECS_UNBOUND or ECS_INTERDOMAIN. Each port keeps
// the pair of eventfds of its channel: created at alloc_unbound, handed reversed to the binder.
struct PortEntry {
  enum class State { unbound, interdomain };
  State state = State::unbound;
  DomId remote;
  uint32_t remote_port = 0;
  Client* owner = nullptr;  // nullptr: owned by the hypervisor (an ioreq server's vp_eport)
  UniqueFd recv;            // read by the owner of this port
  UniqueFd send;            // written by the owner of this port
};

// Xen's active grant entry: pin counts decide when GTF_reading/GTF_writing are set and cleared.
struct Pin {
  uint32_t readers = 0;  // every mapping, read-only or writable
  uint32_t writers = 0;
  uint32_t frame = 0;
  DomId mapper;
};

struct IoreqRange {
  bool mmio;
  uint64_t start;
  uint64_t end;  // inclusive, as XEN_DMOP_map_io_range_to_ioreq_server
};

struct IoreqServer {
  uint16_t id = 0;
  DomId dm;
  bool enabled = false;
  std::vector<IoreqRange> ranges;
  UniqueFd page_fd;
  Mapping page;
  std::vector<uint32_t> ports;  // vp_eport per vCPU, in the guest's domain
};

struct Domain {
  DomId id;
  std::string name;
  uint64_t memory_mib = 0;
  uint32_t vcpus = 1;
  uint32_t grant_frames = 0;
  bool dying = false;
  UniqueFd ram;
  UniqueFd gnttab;
  Mapping gnttab_map;
  uint64_t ram_pages = 0;
  uint32_t grant_entries = 0;
  std::map<uint32_t, PortEntry> ports;
  std::map<uint32_t, Pin> pins;
  size_t live_mappings = 0;  // grant mappings of this domain's grants not yet unmapped
  std::vector<Client*> page_owner;
  std::vector<Client*> ref_owner;
  std::map<uint16_t, IoreqServer> ioreq;
  uint16_t next_ioreq = 1;
  std::vector<UniqueFd> irq_subscribers;
  UniqueFd listen;
  EventLoop::Watch listen_watch;
  std::string sock_path;
};

struct Client {
  uint64_t id = 0;
  UniqueFd fd;
  EventLoop::Watch watch;
  DomId domid;
  std::set<uint64_t> mappings;
};

struct GrantMapping {
  Client* owner = nullptr;
  DomId granter;
  std::vector<uint32_t> refs;
  bool write = false;
};

struct Reply {
  wire::Response hdr;
  std::vector<uint64_t> items;
  std::vector<int> fds;          // borrowed; SCM_RIGHTS duplicates them
  std::vector<UniqueFd> owned;   // closed after sending
};

Result<UniqueFd> make_memfd(const std::string& name, size_t bytes) {
  UniqueFd fd(::memfd_create(name.c_str(), MFD_CLOEXEC));
  if (!fd) return fail_errno("memfd_create " + name);
  if (::ftruncate(fd.get(), static_cast<off_t>(bytes)) != 0) return fail_errno("ftruncate " + name);
  return fd;
}

Result<UniqueFd> listen_on(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return fail(ENAMETOOLONG, "socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return fail_errno("socket");
  ::unlink(path.c_str());  // a stale socket of an earlier run; ENOENT is the normal case
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
    return fail_errno("bind " + path);
  if (::listen(fd.get(), 64) != 0) return fail_errno("listen " + path);
  return fd;
}

class BrokerImpl final : public Broker {
 public:
  BrokerImpl(EventLoop& loop, BrokerOptions options, BrokerHooks hooks)
      : loop_(loop), options_(std::move(options)), hooks_(std::move(hooks)) {}

  ~BrokerImpl() override {
    shutting_down_ = true;
    listen_watch_.reset();
    std::vector<DomId> ids;
    for (auto& [id, d] : domains_) ids.push_back(d.id);
    for (DomId id : ids)
      if (id != kDom0) destroy_domain(id);
    clients_.clear();
    domains_.clear();
    if (!sock_path_.empty()) ::unlink(sock_path_.c_str());  // best effort on shutdown
  }

  Result<void> init() {
    Domain& dom0 = domains_[0];
    dom0.id = kDom0;
    dom0.name = "Domain-0";
    sock_path_ = options_.rundir + "/" + std::string(wire::kDom0Socket);
    listen_ = PVHOST_TRY(listen_on(sock_path_));
    listen_watch_ = PVHOST_TRY(loop_.watch_fd(listen_.get(), EPOLLIN, [this](uint32_t) { accept_on(listen_.get(), kDom0); }));
    log::info("xenemu broker: listening on {}{}", sock_path_, options_.strict ? " (strict grant mapping)" : "");
    return {};
  }

  void domain_released(DomId domid) override {
    if (domid != kDom0 && domains_.contains(domid.value()) && !domains_[domid.value()].dying) destroy_domain(domid);
  }
  size_t domain_count() const override { return domains_.size(); }

 private:
  // --- connections -------------------------------------------------------------------------

  void accept_on(int listen_fd, DomId domid) {
    for (;;) {
      UniqueFd fd(::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (!fd) {
        if (errno != EAGAIN && errno != EINTR) log::warn("xenemu broker: accept: {}", errno_name(errno));
        return;
      }
      auto c = std::make_unique<Client>();
      c->id = next_client_++;
      c->domid = domid;
      c->fd = std::move(fd);
      Client* raw = c.get();
      auto w = loop_.watch_fd(raw->fd.get(), EPOLLIN, [this, raw](uint32_t) { on_readable(*raw); });
      if (!w) {
        log::warn("xenemu broker: watch connection: {}", w.error().describe());
        continue;
      }
      raw->watch = std::move(*w);
      clients_[raw->id] = std::move(c);
      log::debug("xenemu broker: dom{} connected (client {})", domid, raw->id);
    }
  }

  void on_readable(Client& c) {
    auto m = wire::recv_message<wire::Request>(c.fd.get());
    if (!m) {
      if (m.error().code() == EAGAIN) return;
      if (m.error().code() != ECONNRESET) log::warn("xenemu broker: client {}: {}", c.id, m.error().describe());
      disconnect(c);
      return;
    }
    Reply reply;
    auto r = handle(c, m->hdr, m->items);
    if (r) {
      reply = std::move(*r);
    } else {
      reply.hdr.error = r.error().code() != 0 ? r.error().code() : EIO;
      const std::string text = r.error().what();
      std::snprintf(reply.hdr.message, sizeof reply.hdr.message, "%s", text.c_str());
      log::debug("xenemu broker: dom{} op {}: {}", c.domid, m->hdr.op, r.error().describe());
    }
    reply.hdr.nitems = static_cast<uint32_t>(reply.items.size());
    auto sent = wire::send_message(c.fd.get(), reply.hdr, reply.items, reply.fds);
    if (!sent) {
      log::warn("xenemu broker: reply to client {}: {}", c.id, sent.error().describe());
      disconnect(c);
    }
  }

  // A handle closed (process death included): its ports close, its grant mappings are
  // released as Xen does when gntdev is closed, its pages and grant refs are freed.
  void disconnect(Client& c) {
    const uint64_t id = c.id;
    for (uint64_t mid : std::set<uint64_t>(c.mappings)) release_mapping(mid);
    if (auto it = domains_.find(c.domid.value()); it != domains_.end()) {
      Domain& d = it->second;
      std::vector<uint32_t> owned;
      for (auto& [p, e] : d.ports)
        if (e.owner == &c) owned.push_back(p);
      for (uint32_t p : owned) close_port(d, p);
      for (auto& o : d.page_owner)
        if (o == &c) o = nullptr;
      for (auto& o : d.ref_owner)
        if (o == &c) o = nullptr;
    }
    log::debug("xenemu broker: client {} (dom{}) gone", id, c.domid);
    clients_.erase(id);  // destroys the watch: allowed from inside its callback
  }

  // --- requests ----------------------------------------------------------------------------

  bool privileged_over(const Client& c, DomId target) const {
    if (c.domid == kDom0) return true;
    if (hooks_.target_of) {
      std::optional<DomId> t = hooks_.target_of(c.domid);
      return t && *t == target;
    }
    return false;
  }

  Result<Domain*> find_domain(uint64_t id, bool allow_dying = false) {
    auto it = domains_.find(static_cast<uint16_t>(id));
    if (id > kMaxDomid || it == domains_.end()) return fail(ESRCH, fmt::format("dom{} does not exist", id));
    if (it->second.dying && !allow_dying) return fail(ESRCH, fmt::format("dom{} is dying", id));
    return &it->second;
  }

  Result<Reply> handle(Client& c, const wire::Request& req, std::span<const uint64_t> items) {
    if (req.op < static_cast<uint32_t>(Op::hello) || req.op > static_cast<uint32_t>(Op::guest_interrupts))
      return fail(ENOSYS, fmt::format("unknown operation {}", req.op));
    const auto op = static_cast<Op>(req.op);
    const bool dom0 = c.domid == kDom0;
    switch (op) {
      case Op::hello: {
        Reply r;
        r.hdr.vals[0] = c.domid.value();
        r.hdr.vals[1] = options_.strict ? 1 : 0;
        r.hdr.vals[2] = dom0 ? 1 : 0;
        return r;
      }
      case Op::domain_create:
        if (!dom0) return fail(EPERM, "domain create needs dom0");
        return create_domain(req);
      case Op::domain_destroy: {
        if (!dom0) return fail(EPERM, "domain destroy needs dom0");
        Domain* d = PVHOST_TRY(find_domain(req.args[0]));
        if (d->id == kDom0) return fail(EINVAL, "dom0 cannot be destroyed");
        destroy_domain(d->id);
        return Reply{};
      }
      case Op::domain_list: {
        Reply r;
        for (auto& [id, d] : domains_) r.items.push_back(id);
        return r;
      }
      case Op::domain_info: {
        Domain* d = PVHOST_TRY(find_domain(req.args[0], true));
        Reply r;
        r.hdr.vals[0] = 1;
        r.hdr.vals[1] = d->dying ? 1 : 0;
        r.hdr.vals[2] = d->vcpus - 1;
        r.hdr.vals[3] = d->memory_mib;
        r.hdr.vals[4] = d->grant_frames;
        std::snprintf(r.hdr.message, sizeof r.hdr.message, "%s", d->name.c_str());
        return r;
      }
      case Op::domain_memory: {
        Domain* d = PVHOST_TRY(find_domain(req.args[0], true));
        if (!d->ram) return fail(EINVAL, fmt::format("dom{} has no memory", d->id));
        Reply r;
        r.hdr.vals[0] = d->ram_pages;
        r.hdr.vals[1] = d->grant_entries;
        r.fds = {d->ram.get(), d->gnttab.get()};
        return r;
      }
      case Op::grant_map: return grant_map(c, req, items);
      case Op::grant_unmap: {
        if (!c.mappings.contains(req.args[0])) return fail(EINVAL, fmt::format("no grant mapping {}", req.args[0]));
        release_mapping(req.args[0]);
        return Reply{};
      }
      case Op::foreign_map: {
        Domain* d = PVHOST_TRY(find_domain(req.args[0], true));
        if (!privileged_over(c, d->id))
          return fail(EPERM, fmt::format("dom{} may not map dom{}'s memory", c.domid, d->id));
        for (uint64_t g : items)
          if (g >= d->ram_pages) return fail(EINVAL, fmt::format("gfn {:#x} outside dom{}'s RAM", g, d->id));
        return Reply{};
      }
      case Op::evtchn_alloc_unbound: return alloc_unbound(c, req);
      case Op::evtchn_bind_interdomain: return bind_interdomain(c, req);
      case Op::evtchn_close: {
        Domain& d = domains_.at(c.domid.value());
        auto it = d.ports.find(static_cast<uint32_t>(req.args[0]));
        if (it == d.ports.end() || it->second.owner != &c)
          return fail(EINVAL, fmt::format("port {} is not bound by this handle", req.args[0]));
        close_port(d, it->first);
        return Reply{};
      }
      case Op::evtchn_status: {
        Domain* d = PVHOST_TRY(find_domain(req.args[0], true));
        if (d->id != c.domid && !privileged_over(c, d->id)) return fail(EPERM, "evtchn status of another domain");
        Reply r;
        auto it = d->ports.find(static_cast<uint32_t>(req.args[1]));
        if (it != d->ports.end()) {
          r.hdr.vals[0] = it->second.state == PortEntry::State::unbound ? 1 : 2;
          r.hdr.vals[1] = it->second.remote.value();
          r.hdr.vals[2] = it->second.remote_port;
        }
        return r;
      }
      case Op::ioreq_create: return ioreq_create(c, req);
      case Op::ioreq_info: {
        IoreqServer* s = PVHOST_TRY(find_ioreq(c, req));
        Reply r;
        r.hdr.vals[0] = s->ports.size();
        for (uint32_t p : s->ports) r.items.push_back(p);
        r.fds = {s->page_fd.get()};
        return r;
      }
      case Op::ioreq_map_range:
      case Op::ioreq_unmap_range: {
        IoreqServer* s = PVHOST_TRY(find_ioreq(c, req));
        IoreqRange range{req.args[2] != 0, req.args[3], req.args[4]};
        if (range.end < range.start) return fail(EINVAL, "io range ends before it starts");
        if (op == Op::ioreq_map_range) {
          s->ranges.push_back(range);
        } else {
          std::erase_if(s->ranges, [&](const IoreqRange& x) {
            return x.mmio == range.mmio && x.start == range.start && x.end == range.end;
          });
        }
        return Reply{};
      }
      case Op::ioreq_set_state: {
        IoreqServer* s = PVHOST_TRY(find_ioreq(c, req));
        s->enabled = req.args[2] != 0;
        return Reply{};
      }
      case Op::ioreq_destroy: {
        IoreqServer* s = PVHOST_TRY(find_ioreq(c, req));
        destroy_ioreq(domains_.at(static_cast<uint16_t>(req.args[0])), s->id);
        return Reply{};
      }
      case Op::set_irq_level:
      case Op::inject_msi: {
        Domain* d = PVHOST_TRY(find_domain(req.args[0]));
        if (!privileged_over(c, d->id)) return fail(EPERM, "interrupts need privilege over the domain");
        wire::InterruptRecord rec;
        if (op == Op::set_irq_level) {
          rec.kind = wire::kInterruptIrq;
          rec.irq = static_cast<uint32_t>(req.args[1]);
          rec.level = req.args[2] != 0 ? 1 : 0;
        } else {
          rec.kind = wire::kInterruptMsi;
          rec.addr = req.args[1];
          rec.data = static_cast<uint32_t>(req.args[2]);
        }
        std::erase_if(d->irq_subscribers, [&](const UniqueFd& fd) {
          if (::send(fd.get(), &rec, sizeof rec, MSG_NOSIGNAL | MSG_DONTWAIT) == sizeof rec) return false;
          if (errno == EAGAIN) {
            PVHOST_LOG_RATELIMITED(log::Level::warn, "xenemu broker: dom{} interrupt queue full, dropped", d->id);
            return false;
          }
          return true;  // the guest process is gone
        });
        return Reply{};
      }
      case Op::guest_alloc_pages: return guest_alloc_pages(c, req);
      case Op::guest_free_pages: {
        Domain& d = domains_.at(c.domid.value());
        const uint64_t gfn = req.args[0], n = req.args[1];
        if (gfn > d.page_owner.size() || n > d.page_owner.size() - gfn) return fail(EINVAL, "free: bad range");
        for (uint64_t i = gfn; i < gfn + n; ++i)
          if (d.page_owner[i] != &c) return fail(EINVAL, fmt::format("free: gfn {:#x} not owned here", i));
        for (uint64_t i = gfn; i < gfn + n; ++i) d.page_owner[i] = nullptr;
        return Reply{};
      }
      case Op::guest_alloc_refs: return guest_alloc_refs(c, req);
      case Op::guest_free_refs: {
        Domain& d = domains_.at(c.domid.value());
        for (uint64_t ref : items)
          if (ref < d.ref_owner.size() && d.ref_owner[ref] == &c) d.ref_owner[ref] = nullptr;
        return Reply{};
      }
      case Op::guest_ioreq_lookup: return guest_ioreq_lookup(c, req);
      case Op::guest_interrupts: {
        Domain& d = domains_.at(c.domid.value());
        int sv[2];
        if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) != 0) return fail_errno("socketpair");
        UniqueFd ours(sv[0]), theirs(sv[1]);
        PVHOST_TRY(set_nonblocking(ours.get()));
        d.irq_subscribers.push_back(std::move(ours));
        Reply r;
        r.fds = {theirs.get()};
        r.owned.push_back(std::move(theirs));
        return r;
      }
    }
    return fail(ENOSYS, "unhandled operation");
  }

  // --- domains -----------------------------------------------------------------------------

  Result<Reply> create_domain(const wire::Request& req) {
    const uint64_t mib = req.args[0] != 0 ? req.args[0] : 64;
    const uint64_t vcpus = req.args[1] != 0 ? req.args[1] : 1;
    const uint64_t frames = req.args[2] != 0 ? req.args[2] : 32;  // libxl's max_grant_frames default
    if (mib > kMaxMemoryMib) return fail(EINVAL, fmt::format("memory {} MiB: at most {}", mib, kMaxMemoryMib));
    if (vcpus > kMaxVcpus) return fail(EINVAL, fmt::format("{} vCPUs: at most {}", vcpus, kMaxVcpus));
    if (frames > kMaxGrantFrames) return fail(EINVAL, fmt::format("{} grant frames: at most {}", frames, kMaxGrantFrames));
    uint16_t id = 0;
    for (uint32_t tries = 0; tries < kMaxDomid; ++tries) {
      const uint16_t candidate = next_domid_;
      next_domid_ = next_domid_ >= kMaxDomid ? 1 : static_cast<uint16_t>(next_domid_ + 1);
      if (!domains_.contains(candidate)) {
        id = candidate;
        break;
      }
    }
    if (id == 0) return fail(ENOSPC, "no free domain id");
    Domain d;
    d.id = DomId(id);
    d.name = std::string(req.name, strnlen(req.name, sizeof req.name));
    if (d.name.empty()) d.name = fmt::format("dom{}", id);
    d.memory_mib = mib;
    d.vcpus = static_cast<uint32_t>(vcpus);
    d.grant_frames = static_cast<uint32_t>(frames);
    d.ram_pages = mib * (1024 * 1024 / kPageSize);
    d.grant_entries = static_cast<uint32_t>(frames * kPageSize / sizeof(grant_entry_v1_t));
    d.ram = PVHOST_TRY(make_memfd(fmt::format("xenemu-dom{}-ram", id), d.ram_pages * kPageSize));
    d.gnttab = PVHOST_TRY(make_memfd(fmt::format("xenemu-dom{}-gnttab", id), frames * kPageSize));
    d.gnttab_map = PVHOST_TRY(Mapping::map(d.gnttab.get(), frames * kPageSize, 0, PROT_READ | PROT_WRITE));
    d.page_owner.assign(d.ram_pages, nullptr);
    d.ref_owner.assign(d.grant_entries, nullptr);
    d.sock_path = options_.rundir + "/" + wire::domain_socket_name(id);
    d.listen = PVHOST_TRY(listen_on(d.sock_path));
    Domain& placed = domains_[id] = std::move(d);
    const DomId domid(id);
    auto w = loop_.watch_fd(placed.listen.get(), EPOLLIN,
                            [this, domid, fd = placed.listen.get()](uint32_t) { accept_on(fd, domid); });
    if (!w) {
      ::unlink(placed.sock_path.c_str());
      domains_.erase(id);
      return std::unexpected(std::move(w).error());
    }
    placed.listen_watch = std::move(*w);
    if (hooks_.introduce_domain) {
      auto r = hooks_.introduce_domain(domid);
      if (!r) {
        destroy_domain(domid);
        return std::unexpected(std::move(r).error().add_context("introduce to xenstored"));
      }
    }
    log::info("xenemu broker: created dom{} '{}': {} MiB, {} vCPUs, {} grant frames", id, placed.name, mib, vcpus,
              frames);
    Reply r;
    r.hdr.vals[0] = id;
    return r;
  }

  // Everything of the domain goes: ioreq servers, ports (peers' ports fall back to unbound),
  // its connections (their own mappings released), its socket. Mappings *of* its grants held
  // by backends stay valid (the memfd lives on in their address space); the domain stays as a
  // dying zombie until the last of them is unmapped, as a Xen domain does.
  void destroy_domain(DomId id) {
    auto it = domains_.find(id.value());
    if (it == domains_.end()) return;
    Domain& d = it->second;
    const bool was_dying = d.dying;
    d.dying = true;
    std::vector<uint16_t> servers;
    for (auto& [sid, s] : d.ioreq) servers.push_back(sid);
    for (uint16_t sid : servers) destroy_ioreq(d, sid);
    std::vector<Client*> gone;
    for (auto& [cid, c] : clients_)
      if (c->domid == id) gone.push_back(c.get());
    for (Client* c : gone) disconnect(*c);
    std::vector<uint32_t> ports;
    for (auto& [p, e] : d.ports) ports.push_back(p);
    for (uint32_t p : ports) close_port(d, p);
    d.irq_subscribers.clear();
    d.listen_watch.reset();
    d.listen.reset();
    if (!d.sock_path.empty()) ::unlink(d.sock_path.c_str());  // best effort: the socket is closed already
    if (!was_dying) {
      log::info("xenemu broker: destroyed dom{} ({} grant mappings still held)", id, d.live_mappings);
      if (hooks_.release_domain) {
        auto r = hooks_.release_domain(id);
        if (!r) log::warn("xenemu broker: release dom{} in xenstored: {}", id, r.error().describe());
      }
    }
    reap(id);
  }

  void reap(DomId id) {
    auto it = domains_.find(id.value());
    if (it != domains_.end() && it->second.dying && it->second.live_mappings == 0) domains_.erase(it);
  }

  // --- grants (grant_table.h, Xen's map_grant_ref/_set_status_v1) --------------------------

  // Sets `bits` in the shared entry with compare-and-swap, re-checking the entry each round
  // (the guest may change it concurrently); GNTST_* on refusal.
  static int16_t set_status(Domain& d, uint32_t ref, DomId mapper, bool write, uint16_t bits) {
    uint32_t* w = grant_word(d.gnttab_map.data(), ref);
    uint32_t old = __atomic_load_n(w, __ATOMIC_ACQUIRE);
    for (;;) {
      const int16_t st = check_grant_entry(static_cast<uint16_t>(old & 0xffff), static_cast<uint16_t>(old >> 16),
                                           mapper, write);
      if (st != GNTST_okay) return st;
      if (__atomic_compare_exchange_n(w, &old, old | bits, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return GNTST_okay;
    }
  }
  static void clear_status(Domain& d, uint32_t ref, uint16_t bits) {
    __atomic_fetch_and(grant_word(d.gnttab_map.data(), ref), ~uint32_t{bits}, __ATOMIC_ACQ_REL);
  }

  int16_t pin(Domain& d, uint32_t ref, DomId mapper, bool write, uint32_t& frame) {
    if (ref >= d.grant_entries) return GNTST_bad_gntref;
    auto it = d.pins.find(ref);
    if (it == d.pins.end()) {
      const int16_t st = set_status(d, ref, mapper, write, write ? GTF_reading | GTF_writing : GTF_reading);
      if (st != GNTST_okay) return st;
      const uint32_t f = __atomic_load_n(grant_frame(d.gnttab_map.data(), ref), __ATOMIC_ACQUIRE);
      if (f >= d.ram_pages) {
        clear_status(d, ref, GTF_reading | GTF_writing);
        return GNTST_bad_page;
      }
      it = d.pins.emplace(ref, Pin{0, 0, f, mapper}).first;
    } else {
      // Already pinned: the active entry decides (Xen checks act->domid), except that the
      // first writable pin must set GTF_writing through the shared entry's checks.
      if (it->second.mapper != mapper) return GNTST_permission_denied;
      if (write && it->second.writers == 0) {
        const int16_t st = set_status(d, ref, mapper, true, GTF_writing);
        if (st != GNTST_okay) return st;
      }
    }
    ++it->second.readers;
    if (write) ++it->second.writers;
    frame = it->second.frame;
    return GNTST_okay;
  }

  void unpin(Domain& d, uint32_t ref, bool write) {
    auto it = d.pins.find(ref);
    if (it == d.pins.end()) return;
    if (write && --it->second.writers == 0) clear_status(d, ref, GTF_writing);
    if (--it->second.readers == 0) {
      clear_status(d, ref, GTF_reading | GTF_writing);
      d.pins.erase(it);
    }
  }

  Result<Reply> grant_map(Client& c, const wire::Request& req, std::span<const uint64_t> refs) {
    Domain* d = PVHOST_TRY(find_domain(req.args[0]));
    if (!d->gnttab_map.valid()) return fail(EINVAL, fmt::format("dom{} has no grant table", d->id));
    if (refs.empty()) return fail(EINVAL, "no grant refs");
    const bool write = req.args[1] != 0;
    Reply r;
    for (size_t i = 0; i < refs.size(); ++i) {
      uint32_t frame = 0;
      const int16_t st = refs[i] > UINT32_MAX ? int16_t{GNTST_bad_gntref}
                                              : pin(*d, static_cast<uint32_t>(refs[i]), c.domid, write, frame);
      if (st != GNTST_okay) {
        for (size_t j = 0; j < i; ++j) unpin(*d, static_cast<uint32_t>(refs[j]), write);
        return fail(st == GNTST_bad_gntref ? EINVAL : EPERM,
                    fmt::format("map grant ref {} of dom{}: GNTST {}", refs[i], d->id, st));
      }
      r.items.push_back(frame);
    }
    const uint64_t mid = next_mapping_++;
    GrantMapping& m = mappings_[mid];
    m.owner = &c;
    m.granter = d->id;
    m.write = write;
    for (uint64_t ref : refs) m.refs.push_back(static_cast<uint32_t>(ref));
    c.mappings.insert(mid);
    ++d->live_mappings;
    r.hdr.vals[0] = mid;
    return r;
  }

  void release_mapping(uint64_t mid) {
    auto it = mappings_.find(mid);
    if (it == mappings_.end()) return;
    GrantMapping m = std::move(it->second);
    mappings_.erase(it);
    if (m.owner != nullptr) m.owner->mappings.erase(mid);
    auto d = domains_.find(m.granter.value());
    if (d == domains_.end()) return;
    for (uint32_t ref : m.refs) unpin(d->second, ref, m.write);
    --d->second.live_mappings;
    reap(m.granter);
  }

  // --- event channels (event_channel.h) ----------------------------------------------------

  static Result<uint32_t> free_port(Domain& d) {
    for (uint32_t p = 1; p < kMaxPorts; ++p)
      if (!d.ports.contains(p)) return p;
    return fail(ENOSPC, fmt::format("dom{}: no free event channel port", d.id));
  }

  // EVTCHNOP_alloc_unbound: also creates the channel's pair of eventfds.
  static Result<uint32_t> new_unbound(Domain& d, DomId remote, Client* owner) {
    const uint32_t p = PVHOST_TRY(free_port(d));
    PortEntry e;
    e.state = PortEntry::State::unbound;
    e.remote = remote;
    e.owner = owner;
    e.recv = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    e.send = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!e.recv || !e.send) return fail_errno("eventfd");
    d.ports[p] = std::move(e);
    return p;
  }

  Result<Reply> alloc_unbound(Client& c, const wire::Request& req) {
    DomId remote(static_cast<uint16_t>(req.args[0]));
    if (remote == kDomidSelf) remote = c.domid;
    PVHOST_TRY(find_domain(remote.value()));
    Domain& d = domains_.at(c.domid.value());
    const uint32_t p = PVHOST_TRY(new_unbound(d, remote, &c));
    Reply r;
    r.hdr.vals[0] = p;
    r.fds = {d.ports[p].recv.get(), d.ports[p].send.get()};
    return r;
  }

  // EVTCHNOP_bind_interdomain: the remote port must be unbound and name us as its remote.
  Result<Reply> bind_interdomain(Client& c, const wire::Request& req) {
    Domain* rd = PVHOST_TRY(find_domain(req.args[0]));
    const auto rport = static_cast<uint32_t>(req.args[1]);
    auto rit = rd->ports.find(rport);
    if (rit == rd->ports.end() || rit->second.state != PortEntry::State::unbound || rit->second.remote != c.domid)
      return fail(EINVAL, fmt::format("dom{} port {} is not unbound for dom{}", rd->id, rport, c.domid));
    Domain& d = domains_.at(c.domid.value());
    const uint32_t p = PVHOST_TRY(free_port(d));
    PortEntry e;
    e.state = PortEntry::State::interdomain;
    e.remote = rd->id;
    e.remote_port = rport;
    e.owner = &c;
    e.recv = PVHOST_TRY(rit->second.send.dup());
    e.send = PVHOST_TRY(rit->second.recv.dup());
    rit->second.state = PortEntry::State::interdomain;
    rit->second.remote = c.domid;
    rit->second.remote_port = p;
    PortEntry& placed = d.ports[p] = std::move(e);
    Reply r;
    r.hdr.vals[0] = p;
    r.fds = {placed.recv.get(), placed.send.get()};
    return r;
  }

  // EVTCHNOP_close: an interdomain peer falls back to ECS_UNBOUND, still naming us.
  void close_port(Domain& d, uint32_t port) {
    auto it = d.ports.find(port);
    if (it == d.ports.end()) return;
    if (it->second.state == PortEntry::State::interdomain) {
      auto rd = domains_.find(it->second.remote.value());
      if (rd != domains_.end()) {
        auto rp = rd->second.ports.find(it->second.remote_port);
        if (rp != rd->second.ports.end() && rp->second.remote == d.id && rp->second.remote_port == port) {
          rp->second.state = PortEntry::State::unbound;
          rp->second.remote_port = 0;
        }
      }
    }
    d.ports.erase(it);
  }

  // --- ioreq servers (hvm/dm_op.h, hvm/ioreq.h) --------------------------------------------

  Result<IoreqServer*> find_ioreq(const Client& c, const wire::Request& req) {
    Domain* d = PVHOST_TRY(find_domain(req.args[0]));
    if (!privileged_over(c, d->id)) return fail(EPERM, fmt::format("dom{} has no privilege over dom{}", c.domid, d->id));
    auto it = d->ioreq.find(static_cast<uint16_t>(req.args[1]));
    if (it == d->ioreq.end()) return fail(ENOENT, fmt::format("no ioreq server {} for dom{}", req.args[1], d->id));
    return &it->second;
  }

  Result<Reply> ioreq_create(const Client& c, const wire::Request& req) {
    Domain* d = PVHOST_TRY(find_domain(req.args[0]));
    if (!privileged_over(c, d->id)) return fail(EPERM, fmt::format("dom{} has no privilege over dom{}", c.domid, d->id));
    if (d->id == kDom0) return fail(EINVAL, "no ioreq servers for dom0");
    IoreqServer s;
    s.id = d->next_ioreq++;
    s.dm = c.domid;
    s.page_fd = PVHOST_TRY(make_memfd(fmt::format("xenemu-dom{}-ioreq{}", d->id, s.id), kPageSize));
    s.page = PVHOST_TRY(Mapping::map(s.page_fd.get(), kPageSize, 0, PROT_READ | PROT_WRITE));
    auto* iopage = reinterpret_cast<shared_iopage_t*>(static_cast<void*>(s.page.data()));
    for (uint32_t v = 0; v < d->vcpus; ++v) {
      // Each vCPU's port is a port of the guest, unbound towards the device model, which
      // binds it with bind_interdomain(guest, vp_eport) as QEMU does.
      const uint32_t p = PVHOST_TRY(new_unbound(*d, c.domid, nullptr));
      s.ports.push_back(p);
      __atomic_store_n(&iopage->vcpu_ioreq[v].vp_eport, p, __ATOMIC_RELEASE);
    }
    const uint16_t id = s.id;
    d->ioreq[id] = std::move(s);
    Reply r;
    r.hdr.vals[0] = id;
    return r;
  }

  void destroy_ioreq(Domain& d, uint16_t id) {
    auto it = d.ioreq.find(id);
    if (it == d.ioreq.end()) return;
    for (uint32_t p : it->second.ports) close_port(d, p);
    d.ioreq.erase(it);
  }

  Result<Reply> guest_ioreq_lookup(const Client& c, const wire::Request& req) {
    Domain& d = domains_.at(c.domid.value());
    const bool mmio = req.args[0] != 0;
    const uint64_t addr = req.args[1];
    const uint64_t vcpu = req.args[2];
    if (vcpu >= d.vcpus) return fail(EINVAL, fmt::format("no vCPU {}", vcpu));
    Reply r;
    for (auto& [id, s] : d.ioreq) {
      if (!s.enabled) continue;
      for (const IoreqRange& range : s.ranges) {
        if (range.mmio != mmio || addr < range.start || addr > range.end) continue;
        PortEntry& port = d.ports.at(s.ports[vcpu]);
        r.hdr.vals[0] = 1;
        r.hdr.vals[1] = id;
        r.hdr.vals[2] = s.ports[vcpu];
        r.fds = {s.page_fd.get(), port.recv.get(), port.send.get()};
        return r;
      }
    }
    return r;  // vals[0] = 0: nobody serves this address
  }

  // --- guest memory and grant refs ---------------------------------------------------------

  // First fit over the domain's RAM, shared by every process of the domain.
  Result<Reply> guest_alloc_pages(Client& c, const wire::Request& req) {
    Domain& d = domains_.at(c.domid.value());
    const uint64_t n = req.args[0];
    if (n == 0 || n > d.page_owner.size()) return fail(EINVAL, fmt::format("allocate {} pages", n));
    uint64_t run = 0;
    for (uint64_t i = 0; i < d.page_owner.size(); ++i) {
      run = d.page_owner[i] == nullptr ? run + 1 : 0;
      if (run == n) {
        const uint64_t first = i + 1 - n;
        for (uint64_t j = first; j <= i; ++j) d.page_owner[j] = &c;
        Reply r;
        r.hdr.vals[0] = first;
        return r;
      }
    }
    return fail(ENOMEM, fmt::format("dom{}: no {} free contiguous pages", d.id, n));
  }

  // Refs free in the broker's view and not in use in the table (a dead process may have left
  // an entry granted; it is skipped until its mappings go and the table entry is cleared).
  Result<Reply> guest_alloc_refs(Client& c, const wire::Request& req) {
    Domain& d = domains_.at(c.domid.value());
    const uint64_t n = req.args[0];
    if (n == 0 || n > d.grant_entries) return fail(EINVAL, fmt::format("allocate {} grant refs", n));
    Reply r;
    for (uint32_t ref = kReservedGrantRefs; ref < d.grant_entries && r.items.size() < n; ++ref) {
      if (d.ref_owner[ref] != nullptr || d.pins.contains(ref)) continue;
      uint32_t* w = grant_word(d.gnttab_map.data(), ref);
      const uint32_t word = __atomic_load_n(w, __ATOMIC_ACQUIRE);
      if ((word & 0xffff) != 0) {
        // Left granted by a process that died: revoke it now that nobody has it mapped.
        uint32_t expected = word;
        if ((word & (GTF_reading | GTF_writing)) != 0 ||
            !__atomic_compare_exchange_n(w, &expected, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
          continue;
      }
      d.ref_owner[ref] = &c;
      r.items.push_back(ref);
    }
    if (r.items.empty()) return fail(ENOSPC, fmt::format("dom{}: grant table full", d.id));
    return r;
  }

  EventLoop& loop_;
  BrokerOptions options_;
  BrokerHooks hooks_;
  bool shutting_down_ = false;
  std::string sock_path_;
  UniqueFd listen_;
  EventLoop::Watch listen_watch_;
  std::map<uint16_t, Domain> domains_;
  std::map<uint64_t, std::unique_ptr<Client>> clients_;
  std::map<uint64_t, GrantMapping> mappings_;
  uint64_t next_client_ = 1;
  uint64_t next_mapping_ = 1;
  uint16_t next_domid_ = 1;
};

}  // namespace

Result<std::unique_ptr<Broker>> Broker::start(EventLoop& loop, BrokerOptions options, BrokerHooks hooks) {
  auto b = std::make_unique<BrokerImpl>(loop, std::move(options), std::move(hooks));
  PVHOST_TRY_CTX(b->init(), "start the hypervisor broker");
  return std::unique_ptr<Broker>(std::move(b));
}

}  // namespace pvhost::xenemu
