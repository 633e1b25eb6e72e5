#include "src/app/block_jobs.h"

#include <sys/stat.h>

#include <fmt/format.h>

#include "backends/block/qdisk.h"
#include "src/app/block_glue.h"
#include "src/log.h"

namespace pvhost {
namespace {

// Whether two names reach the same file (a `base` may be given relative, absolute, or
// through a symlink).
bool same_file(const std::string& a, const std::string& b) {
  if (a == b) return true;
  struct stat sa {}, sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

}  // namespace

std::string_view to_string(BlockJobs::Status s) {
  switch (s) {
    case BlockJobs::Status::created: return "created";
    case BlockJobs::Status::running: return "running";
    case BlockJobs::Status::paused: return "paused";
    case BlockJobs::Status::ready: return "ready";
    case BlockJobs::Status::standby: return "standby";
    case BlockJobs::Status::waiting: return "waiting";
    case BlockJobs::Status::pending: return "pending";
    case BlockJobs::Status::aborting: return "aborting";
    case BlockJobs::Status::concluded: return "concluded";
    case BlockJobs::Status::null: return "null";
  }
  return "?";
}

Result<std::unique_ptr<BlockJobs>> BlockJobs::install(qmp::Server& server, BackendHost& host) {
  std::unique_ptr<BlockJobs> jobs(new BlockJobs(server, host));
  PVHOST_TRY(jobs->add_commands());
  return jobs;
}

BlockJobs::~BlockJobs() = default;  // the devices own the running engines and stop them

bool BlockJobs::vm_running() const { return server_.run_state().status() == qmp::RunStatus::running; }

void BlockJobs::set_status(Job& job, Status s) {
  job.status = s;
  server_.emit_event("JOB_STATUS_CHANGE", {{"id", job.id}, {"status", std::string(to_string(s))}});
}

void BlockJobs::refresh(Job& job) {
  auto* d = dynamic_cast<blkif::QdiskDevice*>(host_.find(job.type, job.devid));
  if (d == nullptr) return;
  if (auto p = d->commit_progress()) {
    job.offset = p->offset;
    job.len = p->len;
  }
}

nlohmann::json BlockJobs::event_data(const Job& job) const {
  return {{"type", "commit"}, {"device", job.id}, {"len", job.len}, {"offset", job.offset}, {"speed", job.speed}};
}

nlohmann::json BlockJobs::block_job_info(Job& job) {
  refresh(job);
  nlohmann::json j = {
      {"type", "commit"},
      {"device", job.id},
      {"len", job.len},
      {"offset", job.offset},
      {"busy", job.status == Status::running && !job.user_paused},
      {"paused", job.user_paused},
      {"speed", job.speed},
      {"io-status", "ok"},
      {"ready", job.status == Status::ready || job.status == Status::standby},
      {"status", std::string(to_string(job.status))},
      {"auto-finalize", true},
      {"auto-dismiss", job.auto_dismiss},
  };
  if (job.error) j["error"] = *job.error;
  return j;
}

BlockJobs::Job* BlockJobs::find(const std::string& id, qmp::Responder* r) {
  auto it = jobs_.find(id);
  if (it != jobs_.end()) return &it->second;
  if (r != nullptr) r->fail(fmt::format("Job '{}' not found", id), qmp::ErrorClass::device_not_active);
  return nullptr;
}

void BlockJobs::user_pause(Job& job, bool pause) {
  auto* d = dynamic_cast<blkif::QdiskDevice*>(host_.find(job.type, job.devid));
  job.user_paused = pause;
  if (d != nullptr) {
    if (pause) d->commit_pause();
    else d->commit_resume();
  }
  if (pause) set_status(job, job.status == Status::ready ? Status::standby : Status::paused);
  else set_status(job, job.status == Status::standby ? Status::ready : Status::running);
}

// Ends a job whose device is still there: quiesce it, let the device switch (complete) or
// stop tracking (cancel, failure), resume it, then the events.
void BlockJobs::stop_job(const std::string& id, End how, std::optional<std::string> error) {
  Job* job = find(id, nullptr);
  if (job == nullptr || job->ending) return;
  job->ending = true;
  refresh(*job);
  if (how == End::cancelled || how == End::failed) set_status(*job, Status::aborting);
  auto* d = dynamic_cast<blkif::QdiskDevice*>(host_.find(job->type, job->devid));
  if (d == nullptr) return finish(id, how, std::move(error));
  const std::string type = job->type, devid = job->devid;
  d->quiesce([this, alive = std::weak_ptr<bool>(alive_), id, type, devid, how, error] {
    if (!alive.lock()) return;
    auto* dev = dynamic_cast<blkif::QdiskDevice*>(host_.find(type, devid));
    if (dev == nullptr) return finish(id, End::cancelled, error);  // on_removed has been told too
    if (how != End::completed) {
      auto r = dev->abandon_commit();
      if (vm_running()) dev->resume();
      if (!r) log::error("block job {}: {}", id, r.error().describe());
      return finish(id, how, error);
    }
    dev->complete_commit([this, alive, id, type, devid](Result<void> r) {
      if (!alive.lock()) return;
      if (auto* dv = dynamic_cast<blkif::QdiskDevice*>(host_.find(type, devid)); dv != nullptr && vm_running()) dv->resume();
      if (!r) {
        log::error("block job {}: {}", id, r.error().describe());
        return finish(id, End::failed, r.error().what());
      }
      finish(id, End::completed, std::nullopt);
    });
  });
}

// qapi/job.json: ... -> waiting -> pending -> concluded -> null (auto-dismiss), with
// BLOCK_JOB_COMPLETED / BLOCK_JOB_CANCELLED between pending and concluded, as QEMU orders them.
void BlockJobs::finish(const std::string& id, End how, std::optional<std::string> error) {
  Job* job = find(id, nullptr);
  if (job == nullptr) return;
  if (how == End::completed || how == End::completed_no_switch) {
    if (how == End::completed) job->offset = job->len;  // everything was copied in the final pass
    set_status(*job, Status::waiting);
    set_status(*job, Status::pending);
  }
  job->error = std::move(error);
  nlohmann::json data = event_data(*job);
  if (how == End::cancelled) {
    server_.emit_event("BLOCK_JOB_CANCELLED", data);
  } else {
    if (job->error) data["error"] = *job->error;
    server_.emit_event("BLOCK_JOB_COMPLETED", data);
  }
  set_status(*job, Status::concluded);
  if (job->auto_dismiss) {
    set_status(*job, Status::null);
    jobs_.erase(id);
  }
}

Result<void> BlockJobs::add_commands() {
  // qapi/block-core.json block-commit; only the active layer (`top` unset or naming it).
  PVHOST_TRY(server_.add_command(
      {.name = "block-commit",
       .args = {{"job-id", qmp::ArgType::string, true},
                {"device", qmp::ArgType::string},
                {"base-node", qmp::ArgType::string, true},
                {"base", qmp::ArgType::string, true},
                {"top-node", qmp::ArgType::string, true},
                {"top", qmp::ArgType::string, true},
                {"backing-file", qmp::ArgType::string, true},
                {"backing-mask-protocol", qmp::ArgType::boolean, true},
                {"speed", qmp::ArgType::integer, true},
                {"on-error", qmp::ArgType::string, true},
                {"filter-node-name", qmp::ArgType::string, true},
                {"auto-finalize", qmp::ArgType::boolean, true},
                {"auto-dismiss", qmp::ArgType::boolean, true}},
       .returns = qmp::Returns::empty(),
       .handler = [this](const nlohmann::json& args, qmp::Responder r) {
         const std::string device = args.at("device").get<std::string>();
         blkif::QdiskDevice* d = find_disk(host_, {{"device", device}, {"node-name", device}});
         if (d == nullptr)
           return r.fail(fmt::format("Cannot find device='{}' nor node-name='{}'", device, device),
                         qmp::ErrorClass::device_not_found);
         const std::string id = args.value("job-id", device);
         if (jobs_.count(id) != 0) return r.fail(fmt::format("Job ID '{}' already in use", id));
         if (d->committing())
           return r.fail(fmt::format("Node '{}' is busy: block device is in use by block job: commit", d->node_name()));
         if (args.contains("speed") && args["speed"].get<int64_t>() < 0)
           return r.fail("Parameter 'speed' expects a non-negative value");
         if (args.contains("on-error") && args["on-error"] != "report")
           return r.fail(fmt::format("on-error '{}' is not supported (report)", args["on-error"].get<std::string>()));
         if (args.value("auto-finalize", true) == false)
           return r.fail("auto-finalize=false is not supported: the switch to the base happens at block-job-complete");
         if (args.contains("top-node") && args["top-node"] != d->node_name())
           return r.fail(fmt::format("Committing the layer '{}' is not supported: only the active layer ('{}')",
                                     args["top-node"].get<std::string>(), d->node_name()));
         if (args.contains("top") && !same_file(args["top"].get<std::string>(), d->config().path))
           return r.fail(fmt::format("Committing '{}' is not supported: only the active layer ('{}')",
                                     args["top"].get<std::string>(), d->config().path));
         if (args.contains("backing-file")) return r.fail("'backing-file' specified, but 'top' is the active layer");
         if (args.contains("base") && args.contains("base-node"))
           return r.fail("'base' and 'base-node' cannot be specified at the same time");
         const auto chain = d->backing_chain();
         std::optional<blkif::QdiskDevice::Layer> base;
         if (args.contains("base-node")) {
           // Backing layers are named in query-blockstats (blockstats_json): names()[i + 1]
           // is chain[i]. Texts of qmp_block_commit / bdrv_lookup_bs.
           const std::string want = args["base-node"].get<std::string>();
           const auto names = d->node_names();
           for (size_t i = 0; i < chain.size() && i + 1 < names.size(); ++i)
             if (names[i + 1] == want) base = chain[i];
           if (!base) {
             bool elsewhere = false;
             for (XenDevice* other : host_.devices())
               if (auto* q = dynamic_cast<blkif::QdiskDevice*>(other)) elsewhere = elsewhere || q->has_node(want);
             if (!elsewhere) return r.fail(fmt::format("Cannot find device='' nor node-name='{}'", want));
             return r.fail(fmt::format("Node '{}' is not a backing image of '{}'", want, d->node_name()));
           }
         }
         if (chain.empty()) return r.fail(fmt::format("Top image '{}' has no backing file: nothing to commit", d->config().path));
         if (args.contains("base")) {
           const std::string want = args["base"].get<std::string>();
           for (const auto& l : chain)
             if (same_file(want, l.path)) base = l;
           if (!base) return r.fail(fmt::format("Can't find '{}' in the backing chain", want));
         } else if (!base) {
           base = chain.back();  // QEMU's default: the deepest backing image
         }
         Job job;
         job.id = id;
         job.type = d->context().type;
         job.devid = d->context().devid;
         job.auto_dismiss = args.value("auto-dismiss", true);
         job.speed = args.contains("speed") ? args["speed"].get<uint64_t>() : 0;
         const std::string type = job.type, devid = job.devid;
         const uint64_t speed = job.speed;
         auto shared = std::make_shared<qmp::Responder>(std::move(r));
         d->quiesce([this, alive = std::weak_ptr<bool>(alive_), job, type, devid, speed, base = *base, shared]() mutable {
           if (!alive.lock()) return;
           auto* dev = dynamic_cast<blkif::QdiskDevice*>(host_.find(type, devid));
           if (dev == nullptr) return shared->fail("the device went away before the commit started");
           const std::string job_id = job.id;
           blkif::QdiskDevice::CommitHooks hooks;
           // The hooks may outlive this object at shutdown (devices go after the QMP glue).
           hooks.on_ready = [this, alive, job_id] {
             if (!alive.lock()) return;
             Job* j = find(job_id, nullptr);
             if (j == nullptr || j->ending) return;
             refresh(*j);
             set_status(*j, j->user_paused ? Status::standby : Status::ready);
             server_.emit_event("BLOCK_JOB_READY", event_data(*j));
           };
           hooks.on_failed = [this, alive, job_id](const Error& e) {
             if (alive.lock()) stop_job(job_id, End::failed, e.what());
           };
           hooks.on_removed = [this, alive, job_id] {
             if (!alive.lock()) return;
             if (Job* j = find(job_id, nullptr); j != nullptr && !j->ending) {
               j->ending = true;
               set_status(*j, Status::aborting);
               finish(job_id, End::cancelled, std::nullopt);
             }
           };
           if (jobs_.count(job_id) != 0) {
             if (vm_running()) dev->resume();
             return shared->fail(fmt::format("Job ID '{}' already in use", job_id));
           }
           auto started = dev->start_commit(base, speed, std::move(hooks));
           if (vm_running()) dev->resume();
           if (!started) return shared->fail(started.error().what());
           Job& j = jobs_.emplace(job_id, std::move(job)).first->second;
           refresh(j);
           set_status(j, Status::created);
           set_status(j, Status::running);
           shared->ok();
         });
       }}));

  PVHOST_TRY(server_.add_command(qmp::CommandSpec::sync(
      "query-block-jobs", {},
      qmp::Returns::array_of({{"type"}, {"device"}, {"len", qmp::ArgType::integer}, {"offset", qmp::ArgType::integer},
                              {"busy", qmp::ArgType::boolean}, {"paused", qmp::ArgType::boolean},
                              {"speed", qmp::ArgType::integer}, {"io-status"}, {"ready", qmp::ArgType::boolean},
                              {"status"}, {"auto-finalize", qmp::ArgType::boolean},
                              {"auto-dismiss", qmp::ArgType::boolean}, {"error", qmp::ArgType::string, true}}),
      [this](const nlohmann::json&) -> qmp::CommandResult {
        nlohmann::json out = nlohmann::json::array();
        for (auto& [id, job] : jobs_) out.push_back(block_job_info(job));
        return out;
      })));
  PVHOST_TRY(server_.add_command(qmp::CommandSpec::sync(
      "query-jobs", {},
      qmp::Returns::array_of({{"id"}, {"type"}, {"status"}, {"current-progress", qmp::ArgType::integer},
                              {"total-progress", qmp::ArgType::integer}, {"error", qmp::ArgType::string, true}}),
      [this](const nlohmann::json&) -> qmp::CommandResult {
        nlohmann::json out = nlohmann::json::array();
        for (auto& [id, job] : jobs_) {
          refresh(job);
          nlohmann::json j = {{"id", id}, {"type", "commit"}, {"status", std::string(to_string(job.status))},
                              {"current-progress", job.offset}, {"total-progress", job.len}};
          if (job.error) j["error"] = *job.error;
          out.push_back(j);
        }
        return out;
      })));

  // The verbs, under their block-job-* names (`device` = job id) and job-* names (`id`).
  auto verb = [this](const std::string& name, const std::string& key, std::vector<qmp::ArgSpec> extra,
                     std::function<void(Job&, const nlohmann::json&, qmp::Responder&)> fn) -> Result<void> {
    std::vector<qmp::ArgSpec> args = {{key, qmp::ArgType::string}};
    args.insert(args.end(), extra.begin(), extra.end());
    return server_.add_command({.name = name,
                                .args = std::move(args),
                                .returns = qmp::Returns::empty(),
                                .handler = [this, key, fn](const nlohmann::json& a, qmp::Responder r) {
                                  Job* job = find(a.at(key).get<std::string>(), &r);
                                  if (job == nullptr) return;
                                  fn(*job, a, r);
                                  if (!r.answered()) r.ok();
                                }});
  };
  auto cannot = [](const Job& job, std::string_view what, qmp::Responder& r) {
    r.fail(fmt::format("Job '{}' in state '{}' cannot accept command verb '{}'", job.id, to_string(job.status), what));
  };
  auto complete = [this, cannot](Job& job, const nlohmann::json&, qmp::Responder& r) {
    if (job.ending || (job.status != Status::ready && job.status != Status::standby)) return cannot(job, "complete", r);
    stop_job(job.id, End::completed);
  };
  auto cancel = [this, cannot](Job& job, const nlohmann::json& a, qmp::Responder& r) {
    if (job.ending || job.status == Status::concluded) return cannot(job, "cancel", r);
    // After READY, a cancel without force ends the job as completed, without the switch
    // (QEMU's mirror: the base is a consistent copy at that point).
    const bool soft = (job.status == Status::ready || job.status == Status::standby) && !a.value("force", false);
    stop_job(job.id, soft ? End::completed_no_switch : End::cancelled);
  };
  PVHOST_TRY(verb("block-job-complete", "device", {}, complete));
  PVHOST_TRY(verb("job-complete", "id", {}, complete));
  PVHOST_TRY(verb("block-job-cancel", "device", {{"force", qmp::ArgType::boolean, true}}, cancel));
  PVHOST_TRY(verb("job-cancel", "id", {}, cancel));
  auto pause = [this, cannot](Job& job, const nlohmann::json&, qmp::Responder& r) {
    if (job.ending || job.status == Status::concluded) return cannot(job, "pause", r);
    if (!job.user_paused) user_pause(job, true);
  };
  auto resume = [this, cannot](Job& job, const nlohmann::json&, qmp::Responder& r) {
    if (!job.user_paused) return r.fail(fmt::format("Job '{}' is not paused", job.id));
    if (job.ending) return cannot(job, "resume", r);
    user_pause(job, false);
  };
  PVHOST_TRY(verb("block-job-pause", "device", {}, pause));
  PVHOST_TRY(verb("job-pause", "id", {}, pause));
  PVHOST_TRY(verb("block-job-resume", "device", {}, resume));
  PVHOST_TRY(verb("job-resume", "id", {}, resume));
  PVHOST_TRY(verb("block-job-set-speed", "device", {{"speed", qmp::ArgType::integer}},
                  [this](Job& job, const nlohmann::json& a, qmp::Responder& r) {
                    const int64_t speed = a.at("speed").get<int64_t>();
                    if (speed < 0) return r.fail("Parameter 'speed' expects a non-negative value");
                    job.speed = static_cast<uint64_t>(speed);
                    if (auto* d = dynamic_cast<blkif::QdiskDevice*>(host_.find(job.type, job.devid)))
                      d->commit_set_speed(job.speed);
                  }));
  PVHOST_TRY(verb("job-dismiss", "id", {}, [this, cannot](Job& job, const nlohmann::json&, qmp::Responder& r) {
    if (job.status != Status::concluded) return cannot(job, "dismiss", r);
    const std::string id = job.id;
    set_status(job, Status::null);
    jobs_.erase(id);
  }));
  PVHOST_TRY(verb("job-finalize", "id", {}, [cannot](Job& job, const nlohmann::json&, qmp::Responder& r) {
    cannot(job, "finalize", r);  // every job here finalizes itself (auto-finalize)
  }));
  return {};
}

}  // namespace pvhost
