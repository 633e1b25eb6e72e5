#include "src/device/xen_device.h"

#include "src/log.h"

namespace pvhost {

XenDevice::XenDevice(DeviceContext ctx) : ctx_(std::move(ctx)) {}

XenDevice::~XenDevice() = default;

std::string XenDevice::name() const {
  return fmt::format("{} dom{}/{}", ctx_.type, ctx_.frontend_domid, ctx_.devid);
}

std::optional<std::string> XenDevice::backend_key(std::string_view key) const {
  auto it = ctx_.backend_keys.find(std::string(key));
  if (it == ctx_.backend_keys.end()) return std::nullopt;
  return it->second;
}

Result<std::string> XenDevice::read_frontend(std::string_view key) const {
  return store().read(xen::kNoTransaction, ctx_.frontend_path + "/" + std::string(key));
}

Result<std::optional<std::string>> XenDevice::read_frontend_optional(std::string_view key) const {
  return xen::read_optional(store(), xen::kNoTransaction, ctx_.frontend_path + "/" + std::string(key));
}

Result<uint64_t> XenDevice::read_frontend_uint(std::string_view key) const {
  return xen::read_uint(store(), xen::kNoTransaction, ctx_.frontend_path + "/" + std::string(key));
}

Result<void> XenDevice::write_backend(std::string_view key, std::string_view value) const {
  return store().write(xen::kNoTransaction, ctx_.backend_path + "/" + std::string(key), value);
}

Result<void> XenDevice::set_backend_state(XenbusState s) {
  if (s == backend_state_) return {};
  log::trace_point("xenbus.backend", "device={} from={} to={}", name(), to_string(backend_state_), to_string(s));
  backend_state_ = s;
  return write_backend("state", std::to_string(static_cast<int>(s)));
}

Result<void> XenDevice::start() {
  log::info("{}: creating (frontend {})", name(), ctx_.frontend_path);
  if (auto r = realize(); !r) {
    Error e = std::move(r).error().add_context("realize");
    fail_device(e);
    return std::unexpected(std::move(e));
  }
  realized_ = true;
  // hotplug-status tells libxl the backend is set up (libxl waits for it on attach).
  PVHOST_TRY_CTX(write_backend("hotplug-status", "connected"), "start");
  PVHOST_TRY_CTX(set_backend_state(XenbusState::init_wait), "start");
  auto& xs = store();
  state_watch_ = PVHOST_TRY_CTX(xs.watch(ctx_.backend_path + "/state", [this](std::string_view) { on_backend_state(); }),
                                "start");
  online_watch_ = PVHOST_TRY_CTX(xs.watch(ctx_.backend_path + "/online", [this](std::string_view) { on_backend_state(); }),
                                 "start");
  frontend_watch_ = PVHOST_TRY_CTX(
      xs.watch(ctx_.frontend_path + "/state", [this](std::string_view) { on_frontend_state(); }), "start");
  return {};
}

void XenDevice::on_frontend_state() {
  if (finished_) return;
  XenbusState s = XenbusState::unknown;
  auto v = read_frontend_optional("state");
  if (v && *v) {
    auto parsed = parse_xenbus_state(**v);
    if (!parsed) {
      // A frontend writing garbage into its state node is a protocol violation.
      PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: frontend state: {}", name(), parsed.error().what());
      fail_device(Error(EPROTO, fmt::format("frontend state: {}", parsed.error().what())));
      return;
    }
    s = *parsed;
  }
  if (s == frontend_state_ && s != XenbusState::unknown) return;
  log::trace_point("xenbus.frontend", "device={} from={} to={}", name(), to_string(frontend_state_), to_string(s));
  frontend_state_ = s;
  // Reconnect: the frontend re-initialises while we are Closed (xenbus.h state diagram).
  if (s == XenbusState::initialising && backend_state_ == XenbusState::closed && online_) {
    if (auto r = set_backend_state(XenbusState::init_wait); !r) log::warn("{}: {}", name(), r.error().describe());
    return;
  }
  frontend_changed(s);
}

void XenDevice::frontend_changed(XenbusState state) { default_frontend_changed(state); }

void XenDevice::default_frontend_changed(XenbusState state) {
  switch (state) {
    case XenbusState::initialised:
    case XenbusState::connected: {
      if (backend_state_ == XenbusState::connected) break;
      if (backend_state_ == XenbusState::closing || !online_) break;  // being unplugged
      do_disconnect();  // a frontend may connect again without going through Closed
      if (auto r = connect(); !r) {
        fail_device(std::move(r).error().add_context("connect"));
        break;
      }
      connected_ = true;
      last_error_.clear();
      if (auto r = set_backend_state(XenbusState::connected); !r) log::warn("{}: {}", name(), r.error().describe());
      log::info("{}: connected", name());
      break;
    }
    case XenbusState::closing:
      if (auto r = set_backend_state(XenbusState::closing); !r) log::warn("{}: {}", name(), r.error().describe());
      break;
    case XenbusState::closed:
    case XenbusState::unknown:
      do_disconnect();
      if (auto r = set_backend_state(XenbusState::closed); !r) log::warn("{}: {}", name(), r.error().describe());
      if (!online_) finish();
      break;
    case XenbusState::initialising:
    case XenbusState::init_wait:
    case XenbusState::reconfiguring:
    case XenbusState::reconfigured:
      break;
  }
}

void XenDevice::on_backend_state() {
  if (finished_) return;
  auto& xs = store();
  auto state_text = xen::read_optional(xs, xen::kNoTransaction, ctx_.backend_path + "/state");
  auto online_text = xen::read_optional(xs, xen::kNoTransaction, ctx_.backend_path + "/online");
  if (!state_text || !online_text) return;  // xenstore trouble; the next event retries
  if (!*state_text) {
    // The toolstack removed the backend directory: the device is gone.
    log::info("{}: backend directory removed", name());
    stop(/*store_gone=*/true);  // writing state now would recreate the removed directory
    finish();
    return;
  }
  XenbusState s = parse_xenbus_state(**state_text).value_or(XenbusState::unknown);
  online_ = online_text->value_or("0") == "1";
  // Someone else (the toolstack) wrote our state: that is an unplug request (online=0,
  // state=Closing). Without an active frontend nobody will complete the handshake, so
  // close at once.
  if (s != backend_state_) {
    log::trace_point("xenbus.backend.external", "device={} state={} online={}", name(), to_string(s), online_);
    backend_state_ = s;
    if (s == XenbusState::closing && !frontend_is_active(frontend_state_)) {
      do_disconnect();
      if (auto r = set_backend_state(XenbusState::closed); !r) log::warn("{}: {}", name(), r.error().describe());
    }
  }
  if (!online_) {
    switch (backend_state_) {
      case XenbusState::closed:
      case XenbusState::initialising:
      case XenbusState::init_wait:
      case XenbusState::unknown:
        finish();
        break;
      case XenbusState::initialised:
      case XenbusState::connected:
      case XenbusState::closing:
      case XenbusState::reconfiguring:
      case XenbusState::reconfigured:
        break;  // wait for the frontend to close
    }
  }
}

void XenDevice::do_disconnect() {
  if (!connected_) {
    disconnect();  // hooks are idempotent; undoes a partial connect
    return;
  }
  connected_ = false;
  disconnect();
  log::info("{}: disconnected", name());
}

void XenDevice::fail_device(const Error& e) {
  last_error_ = e.what();
  log::error("{}: {}", name(), e.describe());
  // As Linux xenbus_dev_fatal: error/<nodename>/error under the backend domain's home,
  // and, for toolstacks that look in the device directory, an `error` key there too.
  std::string nodename = ctx_.backend_path;
  const std::string home = fmt::format("/local/domain/{}/", ctx_.backend_domid);
  if (nodename.starts_with(home)) nodename.erase(0, home.size());
  auto& xs = store();
  if (auto r = xs.write(xen::kNoTransaction, fmt::format("{}error/{}/error", home, nodename), last_error_); !r)
    log::warn("{}: writing error node: {}", name(), r.error().describe());
  if (auto r = write_backend("error", last_error_); !r)
    log::warn("{}: writing error key: {}", name(), r.error().describe());
  do_disconnect();
  if (auto r = set_backend_state(XenbusState::closing); !r) log::warn("{}: {}", name(), r.error().describe());
}

void XenDevice::stop(bool store_gone) {
  frontend_watch_.reset();
  state_watch_.reset();
  online_watch_.reset();
  do_disconnect();
  if (realized_) {
    unrealize();
    realized_ = false;
  }
  if (!store_gone && backend_state_ != XenbusState::closed) {
    // Best effort: the directory may already be gone.
    (void)set_backend_state(XenbusState::closed);
  }
}

void XenDevice::finish() {
  if (finished_) return;
  finished_ = true;
  log::info("{}: unplugged", name());
  if (on_finished) loop().defer(on_finished);
}

nlohmann::json XenDevice::describe() const {
  return {
      {"type", ctx_.type},
      {"frontend-domid", ctx_.frontend_domid.value()},
      {"devid", ctx_.devid},
      {"backend-path", ctx_.backend_path},
      {"frontend-path", ctx_.frontend_path},
      {"backend-state", std::string(to_string(backend_state_))},
      {"frontend-state", std::string(to_string(frontend_state_))},
      {"online", online_},
      {"error", last_error_},
  };
}

}  // namespace pvhost
