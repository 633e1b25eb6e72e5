#include "src/app/block_glue.h"

#include "backends/block/qdisk.h"
#include "src/app/qmp_glue.h"

namespace pvhost {
namespace {

std::vector<blkif::QdiskDevice*> disks(const BackendHost& host) {
  std::vector<blkif::QdiskDevice*> out;
  for (XenDevice* d : host.devices())
    if (auto* q = dynamic_cast<blkif::QdiskDevice*>(d)) out.push_back(q);
  return out;
}

}  // namespace

Result<std::unique_ptr<BlockCommands>> BlockCommands::install(qmp::Server& server, BackendHost& host) {
  std::unique_ptr<BlockCommands> bc(new BlockCommands(server, host));
  BlockCommands* self = bc.get();
  PVHOST_TRY(server.add_command(qmp::CommandSpec::sync(
      "query-block", {},
      qmp::Returns::array_of({{"device"}, {"qdev"}, {"locked", qmp::ArgType::boolean},
                              {"removable", qmp::ArgType::boolean}, {"inserted", qmp::ArgType::object, true},
                              {"type"}}),
      [self](const nlohmann::json&) -> qmp::CommandResult {
        nlohmann::json out = nlohmann::json::array();
        for (auto* d : disks(self->host_)) out.push_back(d->query_block_json());
        return out;
      })));
  PVHOST_TRY(server.add_command(qmp::CommandSpec::sync(
      "query-blockstats", {{"query-nodes", qmp::ArgType::boolean, true}},
      qmp::Returns::array_of({{"device"}, {"node-name"}, {"qdev"}, {"stats", qmp::ArgType::object}}),
      [self](const nlohmann::json&) -> qmp::CommandResult {
        nlohmann::json out = nlohmann::json::array();
        for (auto* d : disks(self->host_)) out.push_back(d->blockstats_json());
        return out;
      })));
  return bc;
}

}  // namespace pvhost
