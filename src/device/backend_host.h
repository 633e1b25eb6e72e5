// The BackendHost: for one guest, watches /local/domain/<self>/backend/<type>/<guest> for
// each backend type this process serves, creates a XenDevice when the toolstack has
// written a device (online=1, state=Initialising), and destroys it when it is unplugged,
// removed, or its domain goes away (@releaseDomain).
//
// Split processes (ARCHITECTURE.md "Process model"): each process claims its types under
// /local/domain/<self>/device-model/<guest>/backends/<type> (value: its pid). A type
// already claimed by another live pvhost is refused, so two processes never serve one
// device. The primary process writes device-model/<guest>/state; peers announce their QMP
// socket under device-model/<guest>/peers/<name>.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "src/device/registry.h"

namespace pvhost {

struct BackendHostOptions {
  DomId guest;
  std::vector<std::string> types;  // served types (already checked against the registry)
  bool primary = true;
  std::string peer_name;           // for peers: the name under device-model/<guest>/peers
  std::string peer_qmp_socket;     // for peers: their QMP socket path
};

class BackendHost {
 public:
  [[nodiscard]] static Result<std::unique_ptr<BackendHost>> create(xen::Xen& xen, EventLoop& loop,
                                                                   const Registry& registry,
                                                                   BackendHostOptions options);
  ~BackendHost();

  // Claims the types, writes device-model nodes, starts watching. `running` false (-S)
  // leaves device-model/<guest>/state unwritten until set_running().
  [[nodiscard]] Result<void> start(bool running);
  [[nodiscard]] Result<void> set_running();
  // Graceful shutdown: every device disconnected (drained) and Closed; our nodes removed.
  void shutdown();

  [[nodiscard]] DomId backend_domid() const { return self_; }
  [[nodiscard]] DomId guest() const { return opts_.guest; }
  // Every device, for QMP (query-xen-backends, stop/cont, device_del).
  [[nodiscard]] std::vector<XenDevice*> devices() const;
  // Finds a device by type and devid.
  [[nodiscard]] XenDevice* find(std::string_view type, std::string_view devid) const;
  // Unplugs a device the way the toolstack does (online=0, state=Closing); once it is
  // Closed its backend and frontend directories are removed, as libxl would, and
  // on_device_removed fires.
  [[nodiscard]] Result<void> unplug(XenDevice& dev);
  // Fired when the guest domain is gone (the process should exit).
  std::function<void()> on_guest_gone;
  // Fired after a device has been destroyed (unplugged, removed, or torn down).
  std::function<void(const DeviceContext&)> on_device_removed;

 private:
  BackendHost(xen::Xen& xen, EventLoop& loop, const Registry& registry, BackendHostOptions options)
      : xen_(xen), loop_(loop), registry_(registry), opts_(std::move(options)) {}
  [[nodiscard]] Result<void> claim_types();
  void scan(const BackendType& type);
  void maybe_create(const BackendType& type, const std::string& devid);
  void destroy(const std::string& type, const std::string& devid);
  void check_domains();
  [[nodiscard]] std::string dm_path() const;

  xen::Xen& xen_;
  EventLoop& loop_;
  const Registry& registry_;
  BackendHostOptions opts_;
  DomId self_{0};
  std::vector<xen::XenStore::Watch> type_watches_;
  xen::XenStore::Watch release_watch_;
  // (type, devid) -> device
  std::map<std::pair<std::string, std::string>, std::unique_ptr<XenDevice>> devices_;
  // Devices that failed to start, so a rescan does not retry them until they change.
  std::set<std::pair<std::string, std::string>> failed_;
  std::vector<std::string> claimed_;
  std::set<std::pair<std::string, std::string>> unplug_requested_;
  bool shut_down_ = false;
};

}  // namespace pvhost
