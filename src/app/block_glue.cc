#include "src/app/block_glue.h"

#include "backends/block/qdisk.h"
#include "src/app/block_jobs.h"
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

blkif::QdiskDevice* find_disk(const BackendHost& host, const nlohmann::json& args) {
  for (auto* d : disks(host)) {
    if (args.contains("node-name") && args["node-name"] == d->node_name()) return d;
    if (args.contains("device")) {
      const std::string& id = args["device"].get_ref<const std::string&>();
      if (id == d->qmp_device() || id == d->config().dev || id == "qdisk-" + d->qmp_device()) return d;
    }
  }
  return nullptr;
}

BlockCommands::BlockCommands(qmp::Server& server, BackendHost& host) : server_(server), host_(host) {}
BlockCommands::~BlockCommands() = default;

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
      [self](const nlohmann::json& args) -> qmp::CommandResult {
        nlohmann::json out = nlohmann::json::array();
        // qmp_query_blockstats: query-nodes lists every node flat, without `device`.
        const bool nodes = args.contains("query-nodes") && args["query-nodes"].get<bool>();
        for (auto* d : disks(self->host_)) {
          if (!nodes) {
            out.push_back(d->blockstats_json());
            continue;
          }
          for (auto& n : d->blockstats_nodes_json()) out.push_back(std::move(n));
        }
        return out;
      })));
  // qapi/block-core.json blockdev-snapshot-sync: quiesce that disk, create the overlay, switch
  // to it, resume. The guest sees no error; in-flight I/O is drained first, not lost.
  PVHOST_TRY(server.add_command(
      {.name = "blockdev-snapshot-sync",
       .args = {{"device", qmp::ArgType::string, true},
                {"node-name", qmp::ArgType::string, true},
                {"snapshot-file", qmp::ArgType::string},
                {"snapshot-node-name", qmp::ArgType::string, true},
                {"format", qmp::ArgType::string, true},
                {"mode", qmp::ArgType::string, true}},
       .returns = qmp::Returns::empty(),
       .handler = [self](const nlohmann::json& args, qmp::Responder r) {
         if (!args.contains("device") && !args.contains("node-name"))
           return r.fail("Cannot find device= nor node_name=");
         blkif::QdiskDevice* d = find_disk(self->host_, args);
         if (d == nullptr) {
           const std::string which = args.contains("device") ? args["device"].get<std::string>()
                                                              : args["node-name"].get<std::string>();
           return r.fail(fmt::format("Cannot find device='{}' nor node-name='{}'", which, which),
                         qmp::ErrorClass::device_not_found);
         }
         if (args.contains("format") && args["format"] != "qcow2")
           return r.fail(fmt::format("snapshot format '{}' is not supported (qcow2)", args["format"].get<std::string>()));
         blkif::QdiskDevice::SnapshotMode mode = blkif::QdiskDevice::SnapshotMode::create;
         if (args.contains("mode")) {
           if (args["mode"] == "existing") mode = blkif::QdiskDevice::SnapshotMode::existing;
           else if (args["mode"] != "absolute-paths")
             return r.fail(fmt::format("Parameter 'mode' does not accept value '{}'", args["mode"].get<std::string>()));
         }
         const std::string file = args["snapshot-file"].get<std::string>();
         std::string node_name;
         if (args.contains("snapshot-node-name")) {
           // block.c bdrv_assign_node_name's checks and texts.
           node_name = args["snapshot-node-name"].get<std::string>();
           if (!block::node_name_wellformed(node_name))
             return r.fail(fmt::format("Invalid node-name: '{}'", node_name));
           for (auto* other : disks(self->host_)) {
             if (node_name == other->qmp_device() || node_name == other->config().dev)
               return r.fail(fmt::format("node-name={} is conflicting with a device id", node_name));
             if (other->has_node(node_name))
               return r.fail(fmt::format("Duplicate nodes with node-name='{}'", node_name));
           }
           if (node_name.size() > block::kMaxNodeNameLength) return r.fail("Node name too long");
         }
         const std::string devid = d->qmp_device();
         auto shared = std::make_shared<qmp::Responder>(std::move(r));
         d->quiesce([self, devid, file, mode, node_name, shared] {
           // Runs on the main loop once the disk is drained; the device may have gone meanwhile.
           auto* dev = dynamic_cast<blkif::QdiskDevice*>(self->host_.find("qdisk", devid));
           if (dev == nullptr) return shared->fail("the device went away during the snapshot");
           auto res = dev->snapshot(file, mode, node_name);
           // Resume unless the whole VM is stopped (then cont resumes it).
           if (self->server_.run_state().status() == qmp::RunStatus::running) dev->resume();
           if (!res) return shared->fail(res.error().what());
           shared->ok();
         });
       }}));
  bc->jobs_ = PVHOST_TRY(BlockJobs::install(server, host));
  return bc;
}

}  // namespace pvhost
