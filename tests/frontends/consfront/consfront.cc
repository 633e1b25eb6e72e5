// consfront: a PV console frontend running as a guest process on pvhost-xenemu (guest
// library), doing what Linux's hvc_xen does (xencons_connect_backend), so the console
// backend can be tested end to end.
//
//   consfront --rundir DIR --domid N (--devid D | --primary) [options]
//
//   --devid D        secondary console /local/domain/N/device/console/D: a granted page,
//                    an unbound port, ring-ref/port written by the guest, then Initialised;
//                    Connected once the backend is.
//   --primary        the primary console /local/domain/N/console: a page whose gfn is the
//                    ring-ref. Its keys are written as dom0 (RUNDIR/socket), playing the
//                    domain builder, which is who writes them on Xen.
//   --send BYTES     writes BYTES of the test pattern (pattern_byte(offset)) into `out`,
//                    in pieces of --chunk (default 5000: bursts larger than the ring),
//                    waiting for the backend to make room.
//   --echo           copies everything from `in` back to `out` (for byte-exact round trips).
//   --message TEXT   writes TEXT and CRLF into `out` once connected (the demo's console line).
//   --read-delay-ms M  sleeps M ms before each read of `in` (a slow guest: host backpressure).
//   --cycles K       after each --send, waits until the backend drained `out`, closes the
//                    frontend (Closing, Closed), re-initialises (Initialising) and connects
//                    again with a fresh page and port; K connections in all. The pattern
//                    offset continues across cycles.
//   --hostile out-prod|in-cons  after connecting, corrupts an index and notifies.
//
// After its work consfront stays connected (echoing if --echo) until the backend goes to
// Closing or Closed (device_del, or a protocol violation), then writes Closed and exits 0.
// Progress lines go to stdout: "connected <n>", "sent <bytes>", "drained", "closed".
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "backends/console/ring.h"
#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/xs_client.h"
#include "tests/frontends/consfront/pattern.h"

using namespace pvhost;
using namespace std::chrono_literals;

namespace {

struct Args {
  std::string rundir;
  DomId domid;
  std::optional<std::string> devid;
  bool primary = false;
  uint64_t send = 0;
  size_t chunk = 5000;
  bool echo = false;
  int read_delay_ms = 0;
  int cycles = 1;
  std::string hostile;
  std::string message;
};

Result<Args> parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    auto value = [&]() -> Result<std::string> {
      if (i + 1 >= argc) return fail(EINVAL, k + " needs a value");
      return std::string(argv[++i]);
    };
    if (k == "--rundir") a.rundir = PVHOST_TRY(value());
    else if (k == "--domid") a.domid = DomId(static_cast<uint16_t>(std::stoul(PVHOST_TRY(value()))));
    else if (k == "--devid") a.devid = PVHOST_TRY(value());
    else if (k == "--primary") a.primary = true;
    else if (k == "--send") a.send = std::stoull(PVHOST_TRY(value()));
    else if (k == "--message") a.message = PVHOST_TRY(value());
    else if (k == "--chunk") a.chunk = std::stoul(PVHOST_TRY(value()));
    else if (k == "--echo") a.echo = true;
    else if (k == "--read-delay-ms") a.read_delay_ms = std::stoi(PVHOST_TRY(value()));
    else if (k == "--cycles") a.cycles = std::stoi(PVHOST_TRY(value()));
    else if (k == "--hostile") a.hostile = PVHOST_TRY(value());
    else return fail(EINVAL, "unknown option " + k);
  }
  if (a.rundir.empty() || (!a.devid && !a.primary)) return fail(EINVAL, "--rundir and --devid or --primary are required");
  if (a.chunk == 0) a.chunk = 1;
  return a;
}

void say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

class Frontend {
 public:
  Frontend(Args a, std::unique_ptr<xenemu::Guest> g, std::unique_ptr<xen::XsClient> xs,
           std::unique_ptr<xen::XsClient> dom0)
      : args_(std::move(a)), guest_(std::move(g)), xs_(std::move(xs)), dom0_(std::move(dom0)) {
    fe_path_ = args_.primary ? fmt::format("/local/domain/{}/console", args_.domid)
                             : fmt::format("/local/domain/{}/device/console/{}", args_.domid, *args_.devid);
  }

  Result<int> run() {
    be_path_ = PVHOST_TRY_CTX(xs_->read(xen::kNoTransaction, fe_path_ + "/backend"), "reading backend");
    for (int cycle = 0; cycle < args_.cycles; ++cycle) {
      PVHOST_TRY(connect());
      say(fmt::format("connected {}", cycle + 1));
      if (!args_.hostile.empty()) return hostile();
      // The echo queue is what step() writes into `out`, so a message rides on it.
      if (cycle == 0 && !args_.message.empty())
        for (char c : args_.message + "\r\n") echo_.push_back(static_cast<std::byte>(c));
      PVHOST_TRY(send_pattern());
      if (cycle + 1 < args_.cycles) {
        PVHOST_TRY(wait_drained());
        PVHOST_TRY(close_and_reinit());
      }
    }
    // Serve until the backend closes.
    for (;;) {
      PVHOST_TRY(step(/*may_send=*/false));
      if (backend_closing()) break;
    }
    PVHOST_TRY(write_state("6"));
    say("closed");
    return 0;
  }

 private:
  Result<void> write_state(const std::string& s) {
    if (args_.primary) return {};  // no state node on the primary console
    return xs_->write(xen::kNoTransaction, fe_path_ + "/state", s);
  }
  std::string backend_state() {
    auto v = xen::read_optional(*xs_, xen::kNoTransaction, be_path_ + "/state");
    return v && *v ? **v : std::string("gone");
  }
  bool backend_closing() {
    if (++poll_ % 8 != 0) return false;  // xenstore every few rounds
    const std::string s = backend_state();
    return s == "5" || s == "6" || s == "gone";
  }
  Result<void> wait_backend(const std::string& want) {
    for (int i = 0; i < 2000; ++i) {
      if (backend_state() == want) return {};
      std::this_thread::sleep_for(5ms);
    }
    return fail(ETIMEDOUT, fmt::format("backend state {} never reached (now {})", want, backend_state()));
  }

  Result<void> connect() {
    page_ = PVHOST_TRY_CTX(guest_->alloc_pages(1), "alloc ring page");
    std::memset(page_.data, 0, kPageSize);
    port_ = PVHOST_TRY_CTX(guest_->alloc_unbound(kDom0), "alloc_unbound");
    if (args_.primary) {
      // The domain builder's part (xc_dom/libxl): dom0 writes the frame and the port.
      PVHOST_TRY(xen::transact(*dom0_, [&](xen::Transaction t) -> Result<void> {
        PVHOST_TRY(dom0_->write(t, fe_path_ + "/ring-ref", std::to_string(page_.gfn.value())));
        PVHOST_TRY(dom0_->write(t, fe_path_ + "/port", std::to_string(port_.value())));
        return {};
      }));
    } else {
      ref_ = PVHOST_TRY_CTX(guest_->grant_access(kDom0, page_.gfn, xenemu::ReadOnly::no), "grant");
      // hvc_xen's xencons_connect_backend: ring-ref and port in one transaction.
      PVHOST_TRY(xen::transact(*xs_, [&](xen::Transaction t) -> Result<void> {
        PVHOST_TRY(xs_->write(t, fe_path_ + "/ring-ref", std::to_string(ref_->value())));
        PVHOST_TRY(xs_->write(t, fe_path_ + "/port", std::to_string(port_.value())));
        return {};
      }));
      PVHOST_TRY(write_state("3"));
    }
    PVHOST_TRY(wait_backend("4"));
    PVHOST_TRY(write_state("4"));
    return {};
  }

  Result<void> close_and_reinit() {
    PVHOST_TRY(write_state("5"));
    PVHOST_TRY(wait_backend("5"));
    PVHOST_TRY(write_state("6"));
    PVHOST_TRY(wait_backend("6"));
    // The backend unmapped the ring: the grant can be ended and the page freed.
    if (ref_) PVHOST_TRY_CTX(guest_->end_access(*ref_), "end_access");
    ref_.reset();
    PVHOST_TRY(guest_->close_port(port_));
    PVHOST_TRY(guest_->free_pages(page_));
    PVHOST_TRY(write_state("1"));
    PVHOST_TRY(wait_backend("2"));
    say("reinitialised");
    return {};
  }

  // One round: move bytes, notify, sleep on the port when nothing moved.
  Result<bool> step(bool may_send) {
    bool moved = false;
    std::byte* p = page_.data;
    if (args_.echo || !may_send) {
      if (args_.read_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(args_.read_delay_ms));
      std::vector<std::byte> buf(console::kInSize);
      auto n = PVHOST_TRY(console::guest_read_in(p, buf));
      if (n > 0) {
        moved = true;
        if (args_.echo) echo_.insert(echo_.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(n));
      }
    }
    while (!echo_.empty()) {
      std::vector<std::byte> tmp(echo_.begin(), echo_.begin() + static_cast<std::ptrdiff_t>(std::min<size_t>(echo_.size(), console::kOutSize)));
      auto w = PVHOST_TRY(console::guest_write_out(p, tmp));
      if (w == 0) break;
      echo_.erase(echo_.begin(), echo_.begin() + static_cast<std::ptrdiff_t>(w));
      moved = true;
    }
    if (may_send && sent_ < target_) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(args_.chunk, target_ - sent_));
      std::vector<std::byte> tmp(n);
      for (size_t i = 0; i < n; ++i) tmp[i] = test::pattern_byte(sent_ + i);
      auto w = PVHOST_TRY(console::guest_write_out(p, tmp));
      sent_ += w;
      moved = moved || w > 0;
    }
    if (moved) {
      PVHOST_TRY(guest_->notify(port_));
      return true;
    }
    auto ev = PVHOST_TRY(guest_->wait_event(20ms));
    if (ev) PVHOST_TRY(guest_->unmask(*ev));
    return false;
  }

  Result<void> send_pattern() {
    target_ += args_.send;
    while (sent_ < target_) {
      PVHOST_TRY(step(/*may_send=*/true));
      if (backend_closing()) return fail(EPIPE, "backend closed while sending");
    }
    say(fmt::format("sent {}", sent_));
    return {};
  }

  Result<void> wait_drained() {
    for (int i = 0; i < 5000; ++i) {
      auto pending = PVHOST_TRY(console::guest_write_out(page_.data, {}));  // validates indices
      (void)pending;
      auto idx = console::load_indices(page_.data);
      if (idx.out_cons == idx.out_prod && echo_.empty()) {
        say("drained");
        return {};
      }
      PVHOST_TRY(step(false));
    }
    return fail(ETIMEDOUT, "backend never drained out");
  }

  Result<int> hostile() {
    auto idx = console::load_indices(page_.data);
    if (args_.hostile == "out-prod") idx.out_prod = idx.out_cons + 5000;
    else if (args_.hostile == "in-cons") idx.in_cons = idx.in_prod + 10;
    else return fail(EINVAL, "--hostile out-prod|in-cons");
    console::store_indices(page_.data, idx);
    PVHOST_TRY(guest_->notify(port_));
    say("hostile");
    for (int i = 0; i < 2000; ++i) {
      const std::string s = backend_state();
      if (s == "5" || s == "6") break;
      std::this_thread::sleep_for(5ms);
    }
    PVHOST_TRY(write_state("6"));
    say("closed");
    return 0;
  }

  Args args_;
  std::unique_ptr<xenemu::Guest> guest_;
  std::unique_ptr<xen::XsClient> xs_;
  std::unique_ptr<xen::XsClient> dom0_;
  std::string fe_path_, be_path_;
  xenemu::GuestPages page_;
  Port port_;
  std::optional<GrantRef> ref_;
  std::deque<std::byte> echo_;
  uint64_t sent_ = 0;
  uint64_t target_ = 0;
  uint64_t poll_ = 0;
};

Result<int> run(int argc, char** argv) {
  Args a = PVHOST_TRY(parse(argc, argv));
  auto guest = PVHOST_TRY_CTX(xenemu::Guest::connect(a.rundir, a.domid), "guest");
  auto xs = PVHOST_TRY_CTX(xen::XsClient::open(fmt::format("{}/domain-{}.sock", a.rundir, a.domid)), "xenstore");
  std::unique_ptr<xen::XsClient> dom0;
  if (a.primary) dom0 = PVHOST_TRY_CTX(xen::XsClient::open(a.rundir + "/socket"), "xenstore as dom0");
  Frontend f(std::move(a), std::move(guest), std::move(xs), std::move(dom0));
  return f.run();
}

}  // namespace

int main(int argc, char** argv) {
  ::signal(SIGPIPE, SIG_IGN);
  auto r = run(argc, argv);
  if (!r) {
    std::fprintf(stderr, "consfront: %s\n", r.error().describe().c_str());
    return 1;
  }
  return *r;
}
