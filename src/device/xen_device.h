// The XenDevice base: owns one backend device's xenbus lifecycle (STYLE.md rule 2).
//
// The framework creates the backend's nodes' state, watches the frontend `state` and the
// backend `state`/`online`, publishes `hotplug-status`, drives the states of
// xen/io/xenbus.h (Initialising -> InitWait -> Connected -> Closing -> Closed, and
// reconnect: frontend back to Initialising while we are Closed -> InitWait), and undoes
// partial setup. A backend fills in five hooks:
//
//   realize()           config is parsed, resources opened, feature keys written (before InitWait)
//   frontend_changed()  one flat switch; the default is the standard one below
//   connect()           frontend is Initialised/Connected: read its keys, map rings, bind ports
//   disconnect()        drain in-flight work, unbind, unmap (idempotent)
//   unrealize()         release what realize() opened
//
// A device that cannot connect writes an `error` node with the reason and goes to Closing;
// the process and other devices are unaffected.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "hw/xen/xen.h"
#include "src/event_loop.h"
#include "src/xenbus.h"

namespace pvhost {

// What a backend is created from (one context struct, STYLE.md rule 3).
struct DeviceContext {
  xen::Xen* xen = nullptr;
  EventLoop* loop = nullptr;  // the main loop; control plane runs here
  std::string type;           // backend type, e.g. "qdisk"
  DomId backend_domid;
  DomId frontend_domid;
  std::string devid;          // "51712"
  std::string backend_path;   // /local/domain/<be>/backend/<type>/<fe>/<devid>
  std::string frontend_path;  // from the backend's `frontend` key
  // Every backend key, read in one transaction when the device was found.
  std::map<std::string, std::string> backend_keys;
};

class XenDevice {
 public:
  explicit XenDevice(DeviceContext ctx);
  virtual ~XenDevice();
  XenDevice(const XenDevice&) = delete;
  XenDevice& operator=(const XenDevice&) = delete;

  // --- driven by the BackendHost ---
  // realize(), hotplug-status, watches, InitWait. On failure the device is left Closing
  // with an `error` node and the error is returned.
  [[nodiscard]] Result<void> start();
  // Disconnects (draining) and unrealizes; writes Closed unless `store_gone` (the domain or
  // the backend directory no longer exists). Idempotent.
  void stop(bool store_gone);
  // Called (deferred, on the loop) when the device should be destroyed: unplugged
  // (online=0 and Closed) or torn down.
  std::function<void()> on_finished;

  [[nodiscard]] const DeviceContext& context() const { return ctx_; }
  [[nodiscard]] XenbusState backend_state() const { return backend_state_; }
  [[nodiscard]] XenbusState frontend_state() const { return frontend_state_; }
  [[nodiscard]] bool online() const { return online_; }
  [[nodiscard]] const std::string& last_error() const { return last_error_; }

  // QMP: `stop` quiesces (no new ring requests, in-flight drained, then `done`), `cont` resumes.
  virtual void quiesce(std::function<void()> done) { done(); }
  virtual void resume() {}
  // Counters and ring info for query-xen-backends; backends add their own fields.
  [[nodiscard]] virtual nlohmann::json describe() const;

 protected:
  // --- the hooks ---
  [[nodiscard]] virtual Result<void> realize() = 0;
  virtual void frontend_changed(XenbusState state);
  [[nodiscard]] virtual Result<void> connect() = 0;
  virtual void disconnect() = 0;
  virtual void unrealize() {}

  // --- helpers for backends ---
  [[nodiscard]] xen::Xen& xen() const { return *ctx_.xen; }
  [[nodiscard]] xen::XenStore& store() const { return ctx_.xen->store(); }
  [[nodiscard]] EventLoop& loop() const { return *ctx_.loop; }
  [[nodiscard]] std::optional<std::string> backend_key(std::string_view key) const;
  [[nodiscard]] Result<std::string> read_frontend(std::string_view key) const;
  [[nodiscard]] Result<std::optional<std::string>> read_frontend_optional(std::string_view key) const;
  [[nodiscard]] Result<uint64_t> read_frontend_uint(std::string_view key) const;
  [[nodiscard]] Result<void> write_backend(std::string_view key, std::string_view value) const;
  [[nodiscard]] Result<void> set_backend_state(XenbusState s);
  // Logs, writes the `error` nodes, disconnects and moves the device to Closing.
  void fail_device(const Error& e);
  // The standard frontend_changed switch, for overrides that add to it.
  void default_frontend_changed(XenbusState state);
  [[nodiscard]] bool connected() const { return connected_; }
  [[nodiscard]] std::string name() const;  // "qdisk dom1/51712"

 private:
  void on_frontend_state();
  void on_backend_state();
  void do_disconnect();
  void finish();

  DeviceContext ctx_;
  XenbusState backend_state_ = XenbusState::initialising;
  XenbusState frontend_state_ = XenbusState::unknown;
  bool online_ = true;
  bool realized_ = false;
  bool connected_ = false;
  bool finished_ = false;
  std::string last_error_;
  xen::XenStore::Watch frontend_watch_;
  xen::XenStore::Watch state_watch_;
  xen::XenStore::Watch online_watch_;
};

}  // namespace pvhost
