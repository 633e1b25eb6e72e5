#include "backends/console/console_device.h"

#include <array>

#include "backends/console/ring.h"
#include "src/log.h"

namespace pvhost::console {

namespace {
bool is_primary(const DeviceContext& ctx) {
  return ctx.frontend_path == fmt::format("/local/domain/{}/console", ctx.frontend_domid);
}
}  // namespace

ConsoleDevice::ConsoleDevice(DeviceContext ctx, ConsoleHost& host)
    : XenDevice(std::move(ctx)), host_(host), primary_(is_primary(context())) {}

ConsoleDevice::~ConsoleDevice() = default;

Result<OutputSpec> ConsoleDevice::resolve_output() {
  std::span<const ChardevOptions> list(host_.chardevs());
  const std::span<const ChardevOptions>* chardevs = host_.has_chardevs() ? &list : nullptr;
  // The backend directory is the toolstack's: any kind of output is allowed from there.
  if (auto be = backend_key("output"))
    return with_context(parse_output(*be, Trusted::yes, chardevs), "backend output");
  auto fe = PVHOST_TRY_CTX(read_frontend_optional("output"), "reading output");
  if (!fe) return PtyOutput{};
  // The frontend `output` is trusted only when the guest cannot have written it: its owner
  // (first permission entry, xenstore.txt) is the backend domain, as for the primary
  // console's directory, which the domain builder creates as dom0.
  Trusted trusted = Trusted::no;
  auto perms = store().get_permissions(xen::kNoTransaction, context().frontend_path + "/output");
  if (perms && !perms->empty() && perms->front().domid == context().backend_domid) trusted = Trusted::yes;
  return with_context(parse_output(*fe, trusted, chardevs), "frontend output");
}

Result<void> ConsoleDevice::realize() {
  if (auto proto = backend_key("protocol"); proto && *proto != "vt100")
    return fail(EINVAL, fmt::format("protocol '{}' is not vt100", *proto));
  const OutputSpec spec = PVHOST_TRY(resolve_output());
  auto limit_text = PVHOST_TRY_CTX(read_frontend_optional("limit"), "reading limit");
  buffer_.set_limit(PVHOST_TRY(parse_limit(limit_text ? std::optional<std::string_view>(*limit_text) : std::nullopt)));
  auto fe_name = PVHOST_TRY_CTX(read_frontend_optional("name"), "reading name");
  label_ = fe_name && !fe_name->empty() ? *fe_name : fmt::format("xen-console-{}", context().devid);

  std::weak_ptr<int> alive = alive_;
  HostEnd::Events events{
      [this] { pump(); },
      [this] { pump(); },
      // A client change can be reported from inside a read or write of pump(): run later.
      [this] { defer_pump(); },
  };
  end_ = PVHOST_TRY_CTX(open_host_end(spec, loop(), std::move(events)), "output");
  if (auto log_path = backend_key("log"); log_path && !log_path->empty())
    log_end_ = PVHOST_TRY_CTX(open_host_end(LogOutput{*log_path}, loop(), {}), "log");
  if (auto tty = end_->tty_path())
    PVHOST_TRY_CTX(store().write(xen::kNoTransaction, context().frontend_path + "/tty", *tty), "writing tty");
  log::info("{}: output {}{}", name(), end_->filename(), primary_ ? " (primary console)" : "");

  chardev_ = host_.add(
      label_, [this] { return end_ ? end_->filename() : std::string("null"); },
      // QEMU's frontend-open: the device side (our guest frontend) has the chardev open.
      [this] { return live_.has_value(); });

  again_ = PVHOST_TRY(loop().make_timer([this, alive] {
    if (alive.lock()) pump();
  }));

  if (primary_) {
    // No xenbus state on the primary console: connect when the domain builder's keys exist.
    auto cb = [this, alive](std::string_view) {
      if (alive.lock()) try_connect_primary();
    };
    ring_ref_watch_ = PVHOST_TRY(store().watch(context().frontend_path + "/ring-ref", cb));
    port_watch_ = PVHOST_TRY(store().watch(context().frontend_path + "/port", cb));
  }
  return {};
}

void ConsoleDevice::frontend_changed(XenbusState state) {
  // The primary console has no frontend state node (the base reports it as Unknown); its
  // connection follows ring-ref and port instead (try_connect_primary).
  if (primary_) return;
  default_frontend_changed(state);
}

void ConsoleDevice::try_connect_primary() {
  if (connected() || !online()) return;
  switch (backend_state()) {
    case XenbusState::init_wait:
    case XenbusState::initialising:
    case XenbusState::initialised:
      break;
    case XenbusState::connected:
    case XenbusState::closing:
    case XenbusState::closed:
    case XenbusState::unknown:
    case XenbusState::reconfiguring:
    case XenbusState::reconfigured:
      return;
  }
  auto ring = read_frontend_optional("ring-ref");
  auto port = read_frontend_optional("port");
  if (!ring || !port || !*ring || !*port) return;  // not written yet: the watch fires again
  // Connected is what the standard switch acts on: connect(), then our state -> Connected.
  default_frontend_changed(XenbusState::connected);
}

Result<void> ConsoleDevice::connect() {
  const uint64_t ring_ref = PVHOST_TRY_CTX(read_frontend_uint("ring-ref"), "reading ring-ref");
  const uint64_t port = PVHOST_TRY_CTX(read_frontend_uint("port"), "reading port");
  if (port > UINT32_MAX) return fail(EINVAL, fmt::format("port {} is out of range", port));
  const DomId fe = context().frontend_domid;
  Live live;
  if (primary_) {
    const Gfn gfn(ring_ref);
    live.ring = PVHOST_TRY_CTX(xen().foreign().map(fe, std::span(&gfn, 1), xen::Access::read_write),
                               fmt::format("mapping ring frame {:#x}", ring_ref));
  } else {
    if (ring_ref > UINT32_MAX) return fail(EINVAL, fmt::format("ring-ref {} is out of range", ring_ref));
    const GrantRef ref(static_cast<uint32_t>(ring_ref));
    live.ring = PVHOST_TRY_CTX(xen().grants().map_refs(fe, std::span(&ref, 1), xen::Access::read_write),
                               fmt::format("mapping ring grant {}", ring_ref));
  }
  // Indices the guest left behind must already make sense.
  PVHOST_TRY_CTX(out_pending(live.ring.data()), "ring");
  PVHOST_TRY_CTX(in_space(live.ring.data()), "ring");
  live.evtchn = PVHOST_TRY_CTX(xen().open_event_channels(), "event channels");
  const Port local = PVHOST_TRY_CTX(live.evtchn->bind_interdomain(fe, Port(static_cast<uint32_t>(port))),
                                    fmt::format("binding port {}", port));
  live.port = xen::PortBinding(live.evtchn.get(), local);
  live.watch = PVHOST_TRY(loop().watch_fd(live.evtchn->fd(), EPOLLIN, [this](uint32_t) { on_event(); }));
  live_ = std::move(live);
  in_pending_.clear();
  ++counters_.connects;
  log::debug("{}: ring {} port {} (local {})", name(), ring_ref, port, local);
  // What the guest wrote before we were here, and host input waiting for it.
  defer_pump();
  return {};
}

void ConsoleDevice::disconnect() {
  live_.reset();
  // Nowhere to put host input now; it waits in the host end until the next connection.
  if (end_) end_->want_read(false);
}

void ConsoleDevice::unrealize() {
  ring_ref_watch_.reset();
  port_watch_.reset();
  again_ = EventLoop::Timer();
  chardev_.reset();
  log_end_.reset();
  end_.reset();
}

void ConsoleDevice::quiesce(std::function<void()> done) {
  // `stop`: the rings are left alone until `cont`; nothing is in flight in between.
  quiesced_ = true;
  if (end_) end_->want_read(false);
  done();
}

void ConsoleDevice::resume() {
  quiesced_ = false;
  defer_pump();
}

void ConsoleDevice::defer_pump() {
  std::weak_ptr<int> alive = alive_;
  loop().defer([this, alive] {
    if (alive.lock()) pump();
  });
}

void ConsoleDevice::on_event() {
  if (!live_) return;
  // Every pending port of this handle is ours; unmask before looking at the ring, so a
  // notification that arrives while we work is not lost (it stays pending and fires again).
  for (;;) {
    auto p = live_->evtchn->pending();
    if (!p) {
      log::warn("{}: event channel: {}", name(), p.error().describe());
      break;
    }
    if (!*p) break;
    if (auto r = live_->evtchn->unmask(**p); !r) log::warn("{}: unmask: {}", name(), r.error().describe());
  }
  pump();
}

void ConsoleDevice::protocol_violation(Error e) {
  ++counters_.protocol_errors;
  PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: {}", name(), e.describe());
  fail_device(e.add_context("protocol violation"));  // disconnects: live_ is gone after this
}

void ConsoleDevice::flush_output() {
  if (!end_) return;
  while (!buffer_.empty()) {
    const size_t n = end_->write(buffer_.front());
    if (n == 0) {
      end_->want_write(true);
      return;
    }
    buffer_.consume(n);
  }
  end_->want_write(false);
}

void ConsoleDevice::pump() {
  if (!live_ || quiesced_) {
    flush_output();
    return;
  }
  std::byte* page = live_->ring.data();
  bool notify = false;

  // Guest -> host: always drain `out` (the guest never waits for the host; `limit` bounds
  // what we hold).
  // A guest that keeps producing while we copy cannot hold the loop: after kMaxRounds rings
  // the rest waits for the next round of the loop (fairness to other devices).
  constexpr int kMaxRounds = 32;
  bool more = false;
  std::array<std::byte, kOutSize> out{};
  for (int round = 0;; ++round) {
    if (round == kMaxRounds) {
      more = true;
      break;
    }
    auto n = read_out(page, out);
    if (!n) return protocol_violation(std::move(n).error());
    if (*n == 0) break;
    notify = true;
    counters_.bytes_out += *n;
    const std::span<const std::byte> got(out.data(), *n);
    if (log_end_) (void)log_end_->write(got);  // a log file takes everything (FileEnd)
    buffer_.append(got);
  }
  flush_output();

  // Host -> guest: read only what `in` can take, so nothing read is ever dropped.
  if (end_) {
    for (int round = 0;; ++round) {
      if (round == kMaxRounds) {
        more = true;
        break;
      }
      if (in_pending_.empty()) {
        auto space = in_space(page);
        if (!space) return protocol_violation(std::move(space).error());
        if (*space == 0) {
          end_->want_read(false);  // resumed by the guest's notification after it reads
          break;
        }
        in_pending_.resize(*space);
        const size_t got = end_->read(in_pending_);
        in_pending_.resize(got);
        if (got == 0) {
          end_->want_read(true);
          break;
        }
      }
      auto w = write_in(page, in_pending_);
      if (!w) return protocol_violation(std::move(w).error());
      counters_.bytes_in += *w;
      notify = notify || *w > 0;
      in_pending_.erase(in_pending_.begin(), in_pending_.begin() + static_cast<std::ptrdiff_t>(*w));
      if (!in_pending_.empty()) {
        end_->want_read(false);  // the guest moved in_cons back: wait for it
        break;
      }
    }
  }
  if (notify) {
    if (auto r = live_->port.notify(); !r) log::warn("{}: notify: {}", name(), r.error().describe());
  }
  if (more) {
    // Through epoll (a timer), not defer(): deferred calls run until quiet, so a busy guest
    // would still hold the loop.
    if (auto r = again_.arm(std::chrono::microseconds(1)); !r) log::warn("{}: timer: {}", name(), r.error().describe());
  }
}

nlohmann::json ConsoleDevice::describe() const {
  nlohmann::json j = XenDevice::describe();
  j["console"] = {
      {"primary", primary_},
      {"label", label_},
      {"output", end_ ? end_->filename() : std::string()},
      {"tty", end_ && end_->tty_path() ? *end_->tty_path() : std::string()},
      {"limit", buffer_.limit()},
      {"buffered", buffer_.size()},
      {"bytes-out", counters_.bytes_out},
      {"bytes-in", counters_.bytes_in},
      {"dropped", buffer_.dropped()},
      {"reconnects", end_ ? end_->reconnects() : 0},
      {"client-connected", end_ ? end_->peer_connected() : false},
      {"connects", counters_.connects},
      {"protocol-errors", counters_.protocol_errors},
  };
  return j;
}

}  // namespace pvhost::console
