// QMP commands for the qdisk backend: query-block and query-blockstats (QEMU's shapes;
// libxenstat reads query-blockstats with `device` = the qdisk devid), and
// blockdev-snapshot-sync. Present when the qdisk backend is built in.
#pragma once

#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "qmp/server.h"
#include "src/device/backend_host.h"

namespace pvhost {
namespace blkif {
class QdiskDevice;
}

// A disk by QMP `device` (the devid "51712", the vdev "xvda", or "qdisk-51712") or by
// `node-name` ("xvda-qcow2"); null when none matches.
[[nodiscard]] blkif::QdiskDevice* find_disk(const BackendHost& host, const nlohmann::json& args);
class BlockJobs;

class BlockCommands {
 public:
  [[nodiscard]] static Result<std::unique_ptr<BlockCommands>> install(qmp::Server& server, BackendHost& host);

 private:
  BlockCommands(qmp::Server& server, BackendHost& host);
  qmp::Server& server_;
  BackendHost& host_;
  std::unique_ptr<BlockJobs> jobs_;

 public:
  ~BlockCommands();
};

}  // namespace pvhost
