// QMP commands for the qdisk backend: query-block and query-blockstats (QEMU's shapes;
// libxenstat reads query-blockstats with `device` = the qdisk devid), and
// blockdev-snapshot-sync. Present when the qdisk backend is built in.
#pragma once

#include <memory>
#include <vector>

#include "qmp/server.h"
#include "src/device/backend_host.h"

namespace pvhost {

class BlockCommands {
 public:
  [[nodiscard]] static Result<std::unique_ptr<BlockCommands>> install(qmp::Server& server, BackendHost& host);

 private:
  BlockCommands(qmp::Server& server, BackendHost& host) : server_(server), host_(host) {}
  qmp::Server& server_;
  BackendHost& host_;
};

}  // namespace pvhost
