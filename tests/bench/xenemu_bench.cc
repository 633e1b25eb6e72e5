// scripts/bench xenemu: pvhost-xenemu's costs next to their floors, measured in the same
// run on this machine (ARCHITECTURE.md "Cost floor"):
//   xenstore write / read latency        vs a unix-socket round trip between two processes
//   event-channel round trip (2 procs)   vs a raw eventfd round trip between two processes
//   grant copy throughput (from guest)   vs memcpy of the same pages
// Prints one JSON object.
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include <nlohmann/json.hpp>

#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/xen.h"
#include "tests/integration/harness.h"

using namespace pvhost;
using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

namespace {

double us(Clock::duration d) { return std::chrono::duration<double, std::micro>(d).count(); }

json stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) { return v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())))]; };
  return {{"median_us", pct(0.5)}, {"p99_us", pct(0.99)}, {"samples", v.size()}};
}

void die(const char* what, const Error& e) {
  std::fprintf(stderr, "bench-xenemu: %s: %s\n", what, e.describe().c_str());
  std::exit(1);
}
template <class T>
T must(Result<T> r, const char* what) {
  if (!r) die(what, r.error());
  return std::move(*r);
}
void must(Result<void> r, const char* what) {
  if (!r) die(what, r.error());
}

void write_u64(int fd, uint64_t v) { (void)!::write(fd, &v, sizeof v); }
uint64_t read_u64(int fd) {
  uint64_t v = 0;
  (void)!::read(fd, &v, sizeof v);
  return v;
}

// Round trip of one byte over a unix socket pair between two processes.
json unix_socket_floor(int n) {
  int sv[2];
  ::socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  pid_t pid = ::fork();
  if (pid == 0) {
    char c;
    for (int i = 0; i < n; ++i)
      if (::read(sv[1], &c, 1) != 1 || ::write(sv[1], &c, 1) != 1) ::_exit(1);
    ::_exit(0);
  }
  std::vector<double> v;
  char c = 'x';
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    (void)!::write(sv[0], &c, 1);
    (void)!::read(sv[0], &c, 1);
    v.push_back(us(Clock::now() - t0));
  }
  ::waitpid(pid, nullptr, 0);
  ::close(sv[0]);
  ::close(sv[1]);
  return stats(v);
}

// Two eventfds ping-ponged between two processes: the emulated event channel's floor.
json eventfd_floor(int n) {
  int a = ::eventfd(0, 0), b = ::eventfd(0, 0);
  pid_t pid = ::fork();
  if (pid == 0) {
    for (int i = 0; i < n; ++i) {
      read_u64(a);
      write_u64(b, 1);
    }
    ::_exit(0);
  }
  std::vector<double> v;
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    write_u64(a, 1);
    read_u64(b);
    v.push_back(us(Clock::now() - t0));
  }
  ::waitpid(pid, nullptr, 0);
  return stats(v);
}

json xenstore_latency(test::EmuHost& host, int n) {
  auto& xs = host.xs();
  std::vector<double> w, r;
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    must(xs.write(xen::kNoTransaction, "/bench/key", std::to_string(i)), "xenstore write");
    w.push_back(us(Clock::now() - t0));
    t0 = Clock::now();
    (void)must(xs.read(xen::kNoTransaction, "/bench/key"), "xenstore read");
    r.push_back(us(Clock::now() - t0));
  }
  return {{"write", stats(w)}, {"read", stats(r)}};
}

// The guest side of the event-channel and grant benchmarks, in a child process.
[[noreturn]] void guest_child(const std::string& rundir, DomId domid, int ctl, int rounds, size_t grant_pages) {
  auto g = must(xenemu::Guest::connect(rundir, domid), "guest connect");
  Port port = must(g->alloc_unbound(kDom0), "alloc_unbound");
  auto pages = must(g->alloc_pages(grant_pages), "alloc_pages");
  for (size_t i = 0; i < grant_pages * kPageSize; ++i) pages.data[i] = static_cast<std::byte>(i * 7);
  write_u64(ctl, port.value());
  for (size_t i = 0; i < grant_pages; ++i) {
    GrantRef ref = must(g->grant_access(kDom0, Gfn(pages.gfn.value() + i), xenemu::ReadOnly::yes), "grant");
    write_u64(ctl, ref.value());
  }
  for (int i = 0; i < rounds; ++i) {
    auto p = must(g->wait_event(std::chrono::milliseconds(5000)), "wait_event");
    if (!p) ::_exit(2);
    must(g->unmask(*p), "unmask");
    must(g->notify(port), "notify");
  }
  read_u64(ctl);  // parent done with the grants
  ::_exit(0);
}

}  // namespace

int main() {
  const int n = 5000;
  auto host = test::EmuHost::start();
  DomId domid = host->create_domain("bench", 64);

  json out;
  out["bench"] = "xenemu";
  out["floor_unix_socket_rtt"] = unix_socket_floor(n);
  out["floor_eventfd_rtt"] = eventfd_floor(n);
  out["xenstore"] = xenstore_latency(*host, 2000);

  const size_t grant_pages = 256;
  int ctl[2];
  ::socketpair(AF_UNIX, SOCK_STREAM, 0, ctl);
  pid_t child = ::fork();
  if (child == 0) guest_child(host->rundir(), domid, ctl[1], n, grant_pages);

  auto x = must(xen::open_emulated(host->rundir()), "open_emulated");
  auto ev = must(x->open_event_channels(), "open_event_channels");
  Port remote(static_cast<uint32_t>(read_u64(ctl[0])));
  std::vector<GrantRef> refs;
  for (size_t i = 0; i < grant_pages; ++i) refs.emplace_back(static_cast<uint32_t>(read_u64(ctl[0])));
  Port local = must(ev->bind_interdomain(domid, remote), "bind_interdomain");
  std::vector<double> rtt;
  pollfd pfd{ev->fd(), POLLIN, 0};
  for (int i = 0; i < n; ++i) {
    auto t0 = Clock::now();
    must(ev->notify(local), "notify");
    std::optional<Port> p;
    while (!(p = must(ev->pending(), "pending"))) ::poll(&pfd, 1, 5000);
    must(ev->unmask(*p), "unmask");
    rtt.push_back(us(Clock::now() - t0));
  }
  out["evtchn_rtt"] = stats(rtt);

  // Grant copy: the whole granted set, 64 segments per batch, repeated.
  std::vector<std::byte> dst(grant_pages * kPageSize), src(grant_pages * kPageSize, std::byte{1});
  const int reps = 64;
  auto t0 = Clock::now();
  for (int r = 0; r < reps; ++r) {
    for (size_t base = 0; base < grant_pages; base += 64) {
      std::vector<xen::GrantCopySegment> segs;
      for (size_t i = base; i < base + 64; ++i)
        segs.push_back({xen::GrantCopySegment::Direction::from_guest, domid, refs[i], 0, 4096, &dst[i * kPageSize]});
      must(x->grants().copy(segs), "grant copy");
      for (auto& s : segs)
        if (s.status != 0) die("grant copy segment", Error(EIO, fmt::format("status {}", s.status)));
    }
  }
  double copy_s = std::chrono::duration<double>(Clock::now() - t0).count();
  if (dst[4097] != static_cast<std::byte>(4097 * 7)) die("grant copy", Error(EIO, "copied data does not match"));
  t0 = Clock::now();
  for (int r = 0; r < reps; ++r)
    for (size_t i = 0; i < grant_pages; ++i) std::memcpy(&dst[i * kPageSize], &src[i * kPageSize], kPageSize);
  double memcpy_s = std::chrono::duration<double>(Clock::now() - t0).count();
  const double mib = static_cast<double>(reps * grant_pages * kPageSize) / (1 << 20);
  out["grant_copy_mib_s"] = mib / copy_s;
  out["floor_memcpy_mib_s"] = mib / memcpy_s;
  out["ratios"] = {
      {"evtchn_rtt_vs_eventfd_rtt", out["evtchn_rtt"]["median_us"].get<double>() /
                                        out["floor_eventfd_rtt"]["median_us"].get<double>()},
      {"xenstore_read_vs_unix_rtt", out["xenstore"]["read"]["median_us"].get<double>() /
                                        out["floor_unix_socket_rtt"]["median_us"].get<double>()},
      {"grant_copy_vs_memcpy", (mib / copy_s) / (mib / memcpy_s)},
  };
  write_u64(ctl[0], 1);
  ::waitpid(child, nullptr, 0);
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}
