#include "src/app/qmp_glue.h"

#include <atomic>

#include "hw/xen/toolstack/devices.h"
#include "src/log.h"

namespace pvhost {

std::optional<std::pair<std::string, std::string>> parse_device_id(const BackendHost& host, const std::string& id) {
  // "<type>-<devid>", e.g. "qdisk-51712" or "console-1".
  if (auto dash = id.rfind('-'); dash != std::string::npos && dash > 0) {
    std::string type = id.substr(0, dash), devid = id.substr(dash + 1);
    if (host.find(type, devid) != nullptr) return std::pair{type, devid};
  }
  // A disk by its vdev name ("xvda") or number.
  if (auto n = toolstack::vbd_number(id)) {
    for (const char* type : {"qdisk", "vbd"})
      if (host.find(type, std::to_string(*n)) != nullptr) return std::pair{std::string(type), std::to_string(*n)};
  }
  return std::nullopt;
}

Result<std::unique_ptr<FrameworkCommands>> FrameworkCommands::install(qmp::Server& server, BackendHost& host) {
  std::unique_ptr<FrameworkCommands> fc(new FrameworkCommands(server, host));
  FrameworkCommands* self = fc.get();

  PVHOST_TRY(server.add_command(qmp::CommandSpec::sync(
      "query-xen-backends", {},
      qmp::Returns::array_of({{"type"}, {"frontend-domid", qmp::ArgType::integer}, {"devid"},
                              {"backend-state"}, {"frontend-state"}}),
      [self](const nlohmann::json&) -> qmp::CommandResult {
        nlohmann::json out = nlohmann::json::array();
        for (XenDevice* d : self->host_.devices()) out.push_back(d->describe());
        return out;
      })));

  PVHOST_TRY(server.add_command(
      {.name = "device_del",
       .args = {{"id", qmp::ArgType::string}},
       .returns = qmp::Returns::empty(),
       .handler = [self](const nlohmann::json& args, qmp::Responder r) {
         const std::string& id = args.at("id").get_ref<const std::string&>();
         auto key = parse_device_id(self->host_, id);
         if (!key) return r.fail(fmt::format("Device '{}' not found", id), qmp::ErrorClass::device_not_found);
         XenDevice* dev = self->host_.find(key->first, key->second);
         self->pending_deletes_[*key] = id;
         if (auto u = self->host_.unplug(*dev); !u) {
           self->pending_deletes_.erase(*key);
           return r.fail(u.error().what());
         }
         // As QEMU: the reply comes at once; DEVICE_DELETED when the guest has let go.
         r.ok();
       }}));

  self->host_.on_device_removed = [self](const DeviceContext& c) {
    auto it = self->pending_deletes_.find({c.type, c.devid});
    if (it == self->pending_deletes_.end()) return;
    self->server_.emit_event("DEVICE_DELETED", {{"device", it->second}, {"path", "/machine/peripheral/" + it->second}});
    self->pending_deletes_.erase(it);
  };

  // stop: every device stops consuming its rings and drains in-flight I/O; `done` once all have.
  self->registrations_.push_back(server.run_state().add_quiesce_hook([self](std::function<void()> done) {
    auto devices = self->host_.devices();
    if (devices.empty()) return done();
    auto remaining = std::make_shared<std::atomic<size_t>>(devices.size());
    auto finish = std::make_shared<std::function<void()>>(std::move(done));
    for (XenDevice* d : devices)
      d->quiesce([remaining, finish] {
        if (remaining->fetch_sub(1) == 1) (*finish)();
      });
  }));
  self->registrations_.push_back(server.run_state().add_resume_hook([self](std::function<void()> done) {
    for (XenDevice* d : self->host_.devices()) d->resume();
    done();
  }));
  // device-model/<domid>/state follows the run state, as QEMU writes "running" on cont.
  self->registrations_.push_back(server.run_state().add_listener([self](qmp::RunStatus s) {
    if (s == qmp::RunStatus::running) {
      if (auto r = self->host_.set_running(); !r) log::warn("device-model state: {}", r.error().describe());
    }
  }));
  return fc;
}

}  // namespace pvhost
