// Tests of pvhost-xenemu's hypervisor broker through its two clients: pvhost's emulated Xen
// (dom0, hw/xen/emu/broker/emu_xen.cc) and the guest library (hw/xen/emu/guest/). The broker
// runs in a forked process in strict mode; backends and guests that must be separate
// processes (death, faults, cross-process notification) are forked children too.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>

extern "C" {
#include <xen/grant_table.h>
#include <xen/hvm/ioreq.h>
#include <xen/memory.h>
}

#include <catch2/catch.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <functional>
#include <thread>

#include "hw/xen/emu/broker/broker.h"
#include "hw/xen/emu/broker/client.h"
#include "hw/xen/emu/broker/emu_xen.h"
#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/xen.h"
#include "src/log.h"

using namespace pvhost;
using namespace std::chrono_literals;
using xen::Access;
using xenemu::Guest;
using xenemu::ReadOnly;
using xenemu::Toolstack;

namespace {

struct Rundir {
  std::string path;
  Rundir() {
    char t[] = "/tmp/xenemu-test-XXXXXX";
    path = ::mkdtemp(t);
  }
  ~Rundir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

// A broker in its own process, strict mode, killed at the end of the test.
class BrokerProcess {
 public:
  explicit BrokerProcess(bool strict = true) {
    int p[2];
    REQUIRE(::pipe(p) == 0);
    pid_ = ::fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      ::close(p[0]);
      auto loop = EventLoop::create("broker");
      if (!loop) ::_exit(3);
      auto b = xenemu::Broker::start(**loop, xenemu::BrokerOptions{dir_.path, strict});
      if (!b) ::_exit(4);
      const char ok = 1;
      if (::write(p[1], &ok, 1) != 1) ::_exit(5);
      (void)(*loop)->run();
      ::_exit(0);
    }
    ::close(p[1]);
    char ok = 0;
    REQUIRE(::read(p[0], &ok, 1) == 1);
    ::close(p[0]);
  }
  ~BrokerProcess() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
  }
  const std::string& dir() const { return dir_.path; }

 private:
  Rundir dir_;
  pid_t pid_ = -1;
};

// Values between a test and its forked children.
class Pipe {
 public:
  Pipe() { REQUIRE(::pipe(fd_) == 0); }
  ~Pipe() {
    ::close(fd_[0]);
    ::close(fd_[1]);
  }
  void put(uint64_t v) const { (void)!::write(fd_[1], &v, sizeof v); }
  // 0 on timeout or error (tests never send 0 as a meaningful last value without checking).
  uint64_t get(int timeout_ms = 5000) const {
    pollfd p{fd_[0], POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) != 1) return ~uint64_t{0};
    uint64_t v = ~uint64_t{0};
    if (::read(fd_[0], &v, sizeof v) != sizeof v) return ~uint64_t{0};
    return v;
  }

 private:
  int fd_[2];
};

// Runs `fn` in a child process; its return value is the exit code.
pid_t spawn(const std::function<int()>& fn) {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(fn());
  return pid;
}
// Exit code, or -signal when the child was killed.
int wait_child(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid) return -1000;
  if (WIFSIGNALED(status)) return -WTERMSIG(status);
  return WEXITSTATUS(status);
}

bool eventually(const std::function<bool()>& pred, std::chrono::milliseconds limit = 3000ms) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < end) {
    if (pred()) return true;
    std::this_thread::sleep_for(5ms);
  }
  return pred();
}

template <class T>
T must(Result<T> r) {
  if (!r) FAIL(r.error().describe());
  return std::move(*r);
}
void must(Result<void> r) {
  if (!r) FAIL(r.error().describe());
}

struct QuietLog {
  QuietLog() { log::set_level(log::Level::warn); }
};

struct Host {
  QuietLog quiet;  // before the broker forks
  BrokerProcess broker;
  std::unique_ptr<Toolstack> tools = must(Toolstack::connect(broker.dir()));
  std::unique_ptr<xen::Xen> dom0 = must(xen::open_emulated_broker_only(broker.dir()));

  DomId create(const char* name, uint32_t mib = 16, uint32_t vcpus = 1) {
    return must(tools->create_domain({name, mib, vcpus, 4}));
  }
  std::unique_ptr<Guest> guest(DomId d) { return must(Guest::connect(broker.dir(), d)); }
};

// A granted page with a recognisable pattern.
struct Granted {
  xenemu::GuestPages page;
  GrantRef ref;
};
Granted grant_pattern(Guest& g, DomId to, ReadOnly ro, uint8_t fill = 0x5a) {
  Granted out{must(g.alloc_pages(1)), GrantRef()};
  std::memset(out.page.data, fill, kPageSize);
  out.ref = must(g.grant_access(to, out.page.gfn, ro));
  return out;
}

}  // namespace

TEST_CASE("domains: create, list and info; dom0 only", "[xenemu]") {
  Host h;
  const DomId a = h.create("alpha", 8, 2);
  auto info = must(h.tools->domain_info(a));
  CHECK(info.name == "alpha");
  CHECK(info.vcpus == 2);
  CHECK(info.memory_mib == 8);
  auto di = must(h.dom0->domain_info(a));
  CHECK(di.max_vcpu_id == 1);
  CHECK_FALSE(di.dying);
  auto list = must(h.tools->list_domains());
  REQUIRE(list.size() == 2);  // dom0 and alpha
  CHECK(std::filesystem::exists(h.broker.dir() + "/hv-domain-" + std::to_string(a.value()) + ".sock"));
  // A guest cannot create domains.
  auto guest_conn = must(xenemu::BrokerConnection::connect(h.broker.dir() + "/hv-domain-" +
                                                            std::to_string(a.value()) + ".sock"));
  auto r = guest_conn->call(xenemu::wire::Op::domain_create, {8, 1, 4}, {}, "evil");
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == EPERM);
  auto missing = h.dom0->domain_info(DomId(999));
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code() == ENOENT);
}

TEST_CASE("grants: a permitted grant maps read-write and sets GTF_reading|GTF_writing until unmapped", "[xenemu]") {
  Host h;
  const DomId d = h.create("g");
  auto g = h.guest(d);
  REQUIRE(g->strict());
  Granted gr = grant_pattern(*g, kDom0, ReadOnly::no);
  CHECK_FALSE(g->grant_in_use(gr.ref));
  {
    std::vector<GrantRef> refs{gr.ref};
    auto m = must(h.dom0->grants().map_refs(d, refs, Access::read_write));
    CHECK(std::to_integer<int>(m.data()[100]) == 0x5a);
    m.data()[7] = std::byte{0x11};  // the guest sees the backend's write
    CHECK(std::to_integer<int>(gr.page.data[7]) == 0x11);
    CHECK(g->grant_in_use(gr.ref));
  }
  CHECK(eventually([&] { return !g->grant_in_use(gr.ref); }));
}

TEST_CASE("grants: map_refs maps several refs contiguously, in order", "[xenemu]") {
  Host h;
  const DomId d = h.create("multi");
  auto g = h.guest(d);
  Granted a = grant_pattern(*g, kDom0, ReadOnly::yes, 0xa1);
  Granted b = grant_pattern(*g, kDom0, ReadOnly::yes, 0xb2);
  std::vector<GrantRef> refs{b.ref, a.ref};
  auto m = must(h.dom0->grants().map_refs(d, refs, Access::read_only));
  CHECK(m.pages() == 2);
  CHECK(std::to_integer<int>(m.data()[0]) == 0xb2);
  CHECK(std::to_integer<int>(m.data()[kPageSize]) == 0xa1);
}

TEST_CASE("grants: a read-only grant maps read-only and refuses a writable map", "[xenemu]") {
  Host h;
  const DomId d = h.create("ro");
  auto g = h.guest(d);
  Granted gr = grant_pattern(*g, kDom0, ReadOnly::yes);
  std::vector<GrantRef> refs{gr.ref};
  auto w = h.dom0->grants().map_refs(d, refs, Access::read_write);
  REQUIRE_FALSE(w);
  CHECK(w.error().code() == EPERM);
  CHECK_FALSE(g->grant_in_use(gr.ref));  // the refused map left no flag behind
  auto m = must(h.dom0->grants().map_refs(d, refs, Access::read_only));
  CHECK(std::to_integer<int>(m.data()[0]) == 0x5a);
}

TEST_CASE("grants: a grant for another domain, an ungranted ref and an out-of-range ref are refused", "[xenemu]") {
  Host h;
  const DomId d = h.create("wrong");
  const DomId other = h.create("other");
  auto g = h.guest(d);
  Granted to_other = grant_pattern(*g, other, ReadOnly::no);
  std::vector<GrantRef> refs{to_other.ref};
  auto r = h.dom0->grants().map_refs(d, refs, Access::read_only);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == EPERM);

  std::vector<GrantRef> ungranted{GrantRef(to_other.ref.value() + 1)};
  r = h.dom0->grants().map_refs(d, ungranted, Access::read_only);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == EPERM);

  std::vector<GrantRef> out_of_range{GrantRef(1u << 20)};
  r = h.dom0->grants().map_refs(d, out_of_range, Access::read_only);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == EINVAL);

  // All or nothing: a good ref before a bad one is not left pinned.
  Granted good = grant_pattern(*g, kDom0, ReadOnly::no);
  std::vector<GrantRef> mixed{good.ref, to_other.ref};
  REQUIRE_FALSE(h.dom0->grants().map_refs(d, mixed, Access::read_write));
  CHECK_FALSE(g->grant_in_use(good.ref));
}

TEST_CASE("grants: end_access fails while mapped and succeeds after unmap", "[xenemu]") {
  Host h;
  const DomId d = h.create("end");
  auto g = h.guest(d);
  Granted gr = grant_pattern(*g, kDom0, ReadOnly::no);
  std::vector<GrantRef> refs{gr.ref};
  auto m = must(h.dom0->grants().map_refs(d, refs, Access::read_only));
  auto busy = g->end_access(gr.ref);
  REQUIRE_FALSE(busy);
  CHECK(busy.error().code() == EBUSY);
  m.reset();
  must(g->end_access(gr.ref));
  // Ended: the backend can no longer map it.
  REQUIRE_FALSE(h.dom0->grants().map_refs(d, refs, Access::read_only));
}

TEST_CASE("grants: batched copy checks every segment like GNTTABOP_copy", "[xenemu]") {
  Host h;
  const DomId d = h.create("copy");
  auto g = h.guest(d);
  Granted rw = grant_pattern(*g, kDom0, ReadOnly::no, 0x33);
  Granted ro = grant_pattern(*g, kDom0, ReadOnly::yes, 0x44);
  Granted other = grant_pattern(*g, DomId(77), ReadOnly::no, 0x55);
  std::byte in[64] = {}, in_ro[64] = {}, out[64], bad[64] = {};
  std::memset(out, 0x99, sizeof out);
  using Dir = xen::GrantCopySegment::Direction;
  std::vector<xen::GrantCopySegment> segs{
      {Dir::from_guest, d, rw.ref, 10, 64, in},
      {Dir::to_guest, d, rw.ref, 200, 64, out},
      {Dir::from_guest, d, ro.ref, 0, 64, in_ro},
      {Dir::to_guest, d, ro.ref, 0, 64, out},            // read-only: refused
      {Dir::from_guest, d, other.ref, 0, 64, bad},       // granted to dom77: refused
      {Dir::from_guest, d, rw.ref, 4090, 64, bad},       // crosses the page: refused
      {Dir::from_guest, d, GrantRef(1u << 20), 0, 8, bad},
  };
  must(h.dom0->grants().copy(segs));
  CHECK(segs[0].status == GNTST_okay);
  CHECK(std::to_integer<int>(in[0]) == 0x33);
  CHECK(segs[1].status == GNTST_okay);
  CHECK(std::to_integer<int>(rw.page.data[200]) == 0x99);
  CHECK(segs[2].status == GNTST_okay);
  CHECK(std::to_integer<int>(in_ro[63]) == 0x44);
  CHECK(segs[3].status == GNTST_permission_denied);
  CHECK(std::to_integer<int>(ro.page.data[0]) == 0x44);
  CHECK(segs[4].status == GNTST_permission_denied);
  CHECK(segs[5].status == GNTST_bad_copy_arg);
  CHECK(segs[6].status == GNTST_bad_gntref);
  CHECK(std::to_integer<int>(bad[0]) == 0);
}

TEST_CASE("grants: strict mode faults on a touch outside the granted page", "[xenemu]") {
  Host h;
  const DomId d = h.create("strict");
  auto g = h.guest(d);
  // Two adjacent guest pages; only the first is granted.
  auto pages = must(g->alloc_pages(2));
  std::memset(pages.data, 0x21, 2 * kPageSize);
  const GrantRef ref = must(g->grant_access(kDom0, pages.gfn, ReadOnly::no));
  const std::string dir = h.broker.dir();
  enum class Touch { inside, after, before };
  auto backend = [&](Touch touch) {
    return spawn([&, touch] {
      auto x = xen::open_emulated_broker_only(dir);
      if (!x) return 10;
      std::vector<GrantRef> refs{ref};
      auto m = (*x)->grants().map_refs(d, refs, Access::read_write);
      if (!m) return 11;
      volatile auto* p = reinterpret_cast<volatile uint8_t*>(m->data());
      if (p[kPageSize - 1] != 0x21) return 12;
      // The default action, not Catch2's or a sanitizer's handler: the parent expects SIGSEGV.
      ::signal(SIGSEGV, SIG_DFL);
      if (touch == Touch::after) return static_cast<int>(p[kPageSize]);  // the next guest page
      if (touch == Touch::before) return static_cast<int>(*(p - 1));
      return 0;
    });
  };
  CHECK(wait_child(backend(Touch::inside)) == 0);
  CHECK(wait_child(backend(Touch::after)) == -SIGSEGV);
  CHECK(wait_child(backend(Touch::before)) == -SIGSEGV);
}

TEST_CASE("grants: a dead backend's mapping is released", "[xenemu]") {
  Host h;
  const DomId d = h.create("death");
  auto g = h.guest(d);
  Granted gr = grant_pattern(*g, kDom0, ReadOnly::no);
  Pipe mapped;
  const std::string dir = h.broker.dir();
  const pid_t child = spawn([&] {
    auto x = xen::open_emulated_broker_only(dir);
    if (!x) return 10;
    std::vector<GrantRef> refs{gr.ref};
    auto m = (*x)->grants().map_refs(d, refs, Access::read_write);
    if (!m) return 11;
    mapped.put(1);
    ::pause();  // killed while holding the mapping
    return 0;
  });
  REQUIRE(mapped.get() == 1);
  CHECK(g->grant_in_use(gr.ref));
  REQUIRE_FALSE(g->end_access(gr.ref));
  ::kill(child, SIGKILL);
  CHECK(wait_child(child) == -SIGKILL);
  CHECK(eventually([&] { return !g->grant_in_use(gr.ref); }));
  must(g->end_access(gr.ref));
}

TEST_CASE("evtchn: two processes notify each other both ways", "[xenemu]") {
  Host h;
  const DomId d = h.create("ev");
  Pipe port_out, go;
  const std::string dir = h.broker.dir();
  const pid_t child = spawn([&] {
    auto g = Guest::connect(dir, d);
    if (!g) return 10;
    auto p = (*g)->alloc_unbound(kDom0);
    if (!p) return 11;
    port_out.put(p->value());
    // Wait for the backend's notification, answer it.
    auto ev = (*g)->wait_event(5000ms);
    if (!ev || !*ev || **ev != *p) return 12;
    if (!(*g)->notify(*p)) return 13;
    if (!(*g)->unmask(*p)) return 14;
    return go.get() == 2 ? 0 : 15;
  });
  const Port remote(static_cast<uint32_t>(port_out.get()));
  auto ev = must(h.dom0->open_event_channels());
  const Port local = must(ev->bind_interdomain(d, remote));
  must(ev->notify(local));
  pollfd p{ev->fd(), POLLIN, 0};
  REQUIRE(::poll(&p, 1, 5000) == 1);
  auto pend = must(ev->pending());
  REQUIRE(pend);
  CHECK(*pend == local);
  // Masked until unmask: nothing more pending.
  CHECK_FALSE(must(ev->pending()));
  must(ev->unmask(local));
  go.put(2);
  CHECK(wait_child(child) == 0);
}

TEST_CASE("evtchn: unbind returns the peer's port to unbound, rebindable", "[xenemu]") {
  Host h;
  const DomId d = h.create("unbind");
  auto g = h.guest(d);
  const Port gp = must(g->alloc_unbound(kDom0));
  auto ev = must(h.dom0->open_event_channels());
  const Port local = must(ev->bind_interdomain(d, gp));
  // Already bound: a second bind is refused (EVTCHNOP_bind_interdomain needs ECS_UNBOUND).
  auto again = ev->bind_interdomain(d, gp);
  REQUIRE_FALSE(again);
  CHECK(again.error().code() == EINVAL);
  must(ev->unbind(local));
  CHECK_FALSE(ev->notify(local));
  const Port local2 = must(ev->bind_interdomain(d, gp));
  must(ev->notify(local2));
  auto fired = must(g->wait_event(2000ms));
  REQUIRE(fired);
  CHECK(*fired == gp);
}

TEST_CASE("evtchn: a peer's death returns the port to unbound", "[xenemu]") {
  Host h;
  const DomId d = h.create("peer");
  auto g = h.guest(d);
  const Port gp = must(g->alloc_unbound(kDom0));
  Pipe bound;
  const std::string dir = h.broker.dir();
  const pid_t child = spawn([&] {
    auto x = xen::open_emulated_broker_only(dir);
    if (!x) return 10;
    auto ev = (*x)->open_event_channels();
    if (!ev) return 11;
    auto p = (*ev)->bind_interdomain(d, gp);
    if (!p || !(*ev)->notify(*p)) return 12;
    bound.put(1);
    ::pause();
    return 0;
  });
  REQUIRE(bound.get() == 1);
  auto fired = must(g->wait_event(2000ms));
  REQUIRE(fired);
  auto status = must(xenemu::BrokerConnection::connect(h.broker.dir() + "/hv.sock"));
  auto st = must(status->call(xenemu::wire::Op::evtchn_status, {d.value(), gp.value()}));
  CHECK(st.hdr.vals[0] == 2);  // interdomain
  ::kill(child, SIGKILL);
  CHECK(wait_child(child) == -SIGKILL);
  CHECK(eventually([&] {
    auto s = status->call(xenemu::wire::Op::evtchn_status, {d.value(), gp.value()});
    return s && s->hdr.vals[0] == 1;  // unbound again, still for dom0
  }));
  auto ev = must(h.dom0->open_event_channels());
  must(ev->bind_interdomain(d, gp));
}

TEST_CASE("ioreq: an MMIO write and read round trip between a guest and a device model", "[xenemu]") {
  Host h;
  const DomId d = h.create("io", 16, 2);
  auto& dm = h.dom0->device_model();
  const xen::IoreqServerId id = must(dm.create_ioreq_server(d, false));
  must(dm.map_io_range(d, id, true, 0xfe000000, 0xfe000fff));
  must(dm.set_ioreq_server_state(d, id, true));
  auto ports = must(dm.ioreq_server_ports(d, id));
  REQUIRE(ports.size() == 2);
  auto page = must(h.dom0->foreign().map_resource(d, XENMEM_resource_ioreq_server, id.value,
                                                  XENMEM_resource_ioreq_server_frame_ioreq(0), 1,
                                                  Access::read_write));
  auto* slot = reinterpret_cast<ioreq_t*>(static_cast<void*>(page.data()));
  CHECK(slot[0].vp_eport == ports[0].value());
  auto ev = must(h.dom0->open_event_channels());
  const Port local = must(ev->bind_interdomain(d, ports[0]));

  const std::string dir = h.broker.dir();
  const pid_t guest = spawn([&] {
    auto g = Guest::connect(dir, d);
    if (!g) return 10;
    if (!(*g)->mmio_write(0xfe000010, 4, 0x1234)) return 11;
    auto v = (*g)->mmio_read(0xfe000010, 4);
    if (!v || *v != 0x1235) return 12;
    auto unassigned = (*g)->mmio_read(0xfd000000, 2);  // nobody serves it
    if (!unassigned || *unassigned != 0xffff) return 13;
    return 0;
  });

  // The device model: one write, one read (hvm/ioreq.h: READY -> handle -> IORESP_READY).
  auto* state_byte = reinterpret_cast<uint8_t*>(&slot[0]._pad0) + sizeof slot[0]._pad0;
  uint64_t reg = 0;
  for (int served = 0; served < 2; ++served) {
    pollfd p{ev->fd(), POLLIN, 0};
    REQUIRE(::poll(&p, 1, 5000) == 1);
    auto pend = must(ev->pending());
    REQUIRE(pend);
    REQUIRE(*pend == local);
    REQUIRE((__atomic_load_n(state_byte, __ATOMIC_ACQUIRE) & 0xf) == STATE_IOREQ_READY);
    ioreq_t req;
    std::memcpy(&req, &slot[0], sizeof req);  // one copy out of shared memory
    CHECK(req.type == IOREQ_TYPE_COPY);
    CHECK(req.addr == 0xfe000010);
    CHECK(req.size == 4);
    if (req.dir == IOREQ_WRITE) reg = req.data;
    else __atomic_store_n(&slot[0].data, reg + 1, __ATOMIC_RELAXED);
    __atomic_store_n(state_byte, static_cast<uint8_t>(STATE_IORESP_READY), __ATOMIC_RELEASE);
    must(ev->notify(local));
    must(ev->unmask(local));
  }
  CHECK(reg == 0x1234);
  CHECK(wait_child(guest) == 0);
  must(dm.destroy_ioreq_server(d, id));
}

TEST_CASE("interrupts: set_irq_level and inject_msi reach the guest", "[xenemu]") {
  Host h;
  const DomId d = h.create("irq");
  auto g = h.guest(d);
  const int fd = must(g->interrupt_fd());
  must(h.dom0->device_model().set_irq_level(d, 5, true));
  must(h.dom0->device_model().inject_msi(d, 0xfee00000, 0x41));
  pollfd p{fd, POLLIN, 0};
  REQUIRE(::poll(&p, 1, 2000) == 1);
  auto i1 = must(g->next_interrupt());
  REQUIRE(i1);
  CHECK(i1->kind == xenemu::Interrupt::Kind::irq_level);
  CHECK(i1->irq == 5);
  CHECK(i1->level);
  auto i2 = must(g->next_interrupt());
  REQUIRE(i2);
  CHECK(i2->kind == xenemu::Interrupt::Kind::msi);
  CHECK(i2->addr == 0xfee00000);
  CHECK(i2->data == 0x41);
  CHECK_FALSE(must(g->next_interrupt()));
}

TEST_CASE("foreign: an unprivileged caller is refused, dom0 maps guest frames", "[xenemu]") {
  Host h;
  const DomId a = h.create("a");
  const DomId b = h.create("b");
  auto gb = h.guest(b);
  auto page = must(gb->alloc_pages(1));
  std::memset(page.data, 0x6b, kPageSize);
  auto as_a = must(xenemu::BrokerConnection::connect(h.broker.dir() + "/hv-domain-" +
                                                      std::to_string(a.value()) + ".sock"));
  std::vector<uint64_t> gfns{page.gfn.value()};
  auto r = as_a->call(xenemu::wire::Op::foreign_map, {b.value()}, gfns);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == EPERM);
  std::vector<Gfn> frames{page.gfn};
  auto m = must(h.dom0->foreign().map(b, frames, Access::read_only));
  CHECK(std::to_integer<int>(m.data()[123]) == 0x6b);
  // Restricted to another domain (dm_restrict), dom0's handle refuses too.
  must(h.dom0->restrict_to(a));
  CHECK_FALSE(h.dom0->foreign().map(b, frames, Access::read_only));
}

TEST_CASE("domains: destroy with everything mapped", "[xenemu]") {
  Host h;
  const DomId d = h.create("doomed");
  auto g = h.guest(d);
  Granted gr = grant_pattern(*g, kDom0, ReadOnly::no, 0x77);
  const Port gp = must(g->alloc_unbound(kDom0));
  auto ev = must(h.dom0->open_event_channels());
  const Port local = must(ev->bind_interdomain(d, gp));
  const xen::IoreqServerId id = must(h.dom0->device_model().create_ioreq_server(d, false));
  std::vector<GrantRef> refs{gr.ref};
  auto m = must(h.dom0->grants().map_refs(d, refs, Access::read_write));

  must(h.tools->destroy_domain(d));
  // The domain is dying while a backend still has its grants mapped; the mapping stays valid.
  auto info = must(h.dom0->domain_info(d));
  CHECK(info.dying);
  CHECK(std::to_integer<int>(m.data()[0]) == 0x77);
  CHECK_FALSE(std::filesystem::exists(h.broker.dir() + "/hv-domain-" + std::to_string(d.value()) + ".sock"));
  // The guest's connection is gone, the ioreq server too, our port is no longer connected.
  CHECK_FALSE(g->alloc_pages(1));
  CHECK_FALSE(h.dom0->device_model().ioreq_server_ports(d, id));
  CHECK_FALSE(h.dom0->grants().map_refs(d, refs, Access::read_only));
  auto status = must(xenemu::BrokerConnection::connect(h.broker.dir() + "/hv.sock"));
  auto st = must(status->call(xenemu::wire::Op::evtchn_status, {0, local.value()}));
  CHECK(st.hdr.vals[0] == 1);
  // The last unmap reaps it.
  m.reset();
  auto gone = h.dom0->domain_info(d);
  REQUIRE_FALSE(gone);
  CHECK(gone.error().code() == ENOENT);
  CHECK(must(h.tools->list_domains()).size() == 1);
}

TEST_CASE("daemon: --daemonize returns with the sockets live; SIGTERM removes them", "[xenemu]") {
  const char* build = std::getenv("PVHOST_BUILD_DIR");
  REQUIRE(build != nullptr);
  const std::string exe = std::string(build) + "/hw/xen/emu/broker/pvhost-xenemu";
  Rundir dir;
  const std::string pidfile = dir.path + "/xenemu.pid";
  const std::string cmd = exe + " --rundir " + dir.path + " --strict --daemonize --pidfile " + pidfile + " -D " +
                          dir.path + "/xenemu.log";
  REQUIRE(std::system(cmd.c_str()) == 0);
  CHECK(std::filesystem::exists(dir.path + "/hv.sock"));
  auto tools = must(Toolstack::connect(dir.path));
  const DomId d = must(tools->create_domain({"daemon", 4, 1, 1}));
  CHECK(std::filesystem::exists(dir.path + "/hv-domain-" + std::to_string(d.value()) + ".sock"));
  FILE* f = std::fopen(pidfile.c_str(), "r");
  REQUIRE(f != nullptr);
  int pid = 0;
  REQUIRE(std::fscanf(f, "%d", &pid) == 1);
  std::fclose(f);
  REQUIRE(::kill(pid, SIGTERM) == 0);
  CHECK(eventually([&] { return ::kill(pid, 0) != 0; }));
  CHECK_FALSE(std::filesystem::exists(dir.path + "/hv.sock"));
  CHECK_FALSE(std::filesystem::exists(dir.path + "/hv-domain-" + std::to_string(d.value()) + ".sock"));
  CHECK_FALSE(std::filesystem::exists(pidfile));
}
