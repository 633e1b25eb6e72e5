// The QMP commands that belong to the device framework rather than to one backend:
// query-xen-backends, device_del (with DEVICE_DELETED), and stop/cont reaching every
// device (quiesce: no new ring requests, in-flight I/O drained).
#pragma once

#include <vector>

#include "qmp/server.h"
#include "src/device/backend_host.h"

namespace pvhost {

class FrameworkCommands {
 public:
  [[nodiscard]] static Result<std::unique_ptr<FrameworkCommands>> install(qmp::Server& server, BackendHost& host);

 private:
  FrameworkCommands(qmp::Server& server, BackendHost& host) : server_(server), host_(host) {}
  qmp::Server& server_;
  BackendHost& host_;
  std::vector<qmp::Registration> registrations_;
  // device_del ids waiting for their DEVICE_DELETED event, by (type, devid).
  std::map<std::pair<std::string, std::string>, std::string> pending_deletes_;
};

// A device id as QMP names it: "<type>-<devid>" ("qdisk-51712"); for disks also the vdev
// ("xvda"). Returns (type, devid) or nullopt.
[[nodiscard]] std::optional<std::pair<std::string, std::string>> parse_device_id(const BackendHost& host,
                                                                                 const std::string& id);

}  // namespace pvhost
