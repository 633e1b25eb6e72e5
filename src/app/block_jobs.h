// Block jobs over QMP (qapi/block-core.json, qapi/job.json): block-commit of a disk's
// active layer, with QEMU's job state machine and events, so toolstacks and QMP libraries
// drive it as they drive QEMU:
//
//   block-commit            starts the job (JOB_STATUS_CHANGE created, running)
//   BLOCK_JOB_READY         the base holds the whole disk; the job keeps it so
//   block-job-complete      the switch: the guest writes to the base from then on
//                           (waiting, pending, BLOCK_JOB_COMPLETED, concluded, null)
//   block-job-cancel        before READY, or with force: BLOCK_JOB_CANCELLED; after READY
//                           without force: BLOCK_JOB_COMPLETED without the switch (as QEMU's
//                           mirror); the guest keeps the top either way
//   block-job-pause/resume, block-job-set-speed, job-pause/resume/cancel/complete/dismiss,
//   query-block-jobs, query-jobs
//
// The copying itself is src/block/commit.cc; the device's part (tracking, the switch,
// `params`) is backends/block/qdisk.cc.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "qmp/server.h"
#include "src/device/backend_host.h"

namespace pvhost {

class BlockJobs {
 public:
  [[nodiscard]] static Result<std::unique_ptr<BlockJobs>> install(qmp::Server& server, BackendHost& host);
  ~BlockJobs();

  // qapi/job.json JobStatus.
  enum class Status { created, running, paused, ready, standby, waiting, pending, aborting, concluded, null };

 private:
  struct Job {
    std::string id;     // job-id; QEMU's BlockJobInfo.device carries it too
    std::string type, devid;  // the disk ("qdisk" or "vbd", its devid)
    bool auto_dismiss = true;
    Status status = Status::created;
    bool user_paused = false;
    bool ending = false;  // complete/cancel under way: the device is being quiesced
    uint64_t speed = 0;
    uint64_t offset = 0, len = 0;  // kept from the last look, for the events after the end
    std::optional<std::string> error;
  };
  // completed: switched to the base; completed_no_switch: a cancel after READY (QEMU's
  // mirror reports it as completed); cancelled; failed (with an error).
  enum class End { completed, completed_no_switch, cancelled, failed };

  BlockJobs(qmp::Server& server, BackendHost& host) : server_(server), host_(host) {}
  [[nodiscard]] Result<void> add_commands();
  void set_status(Job& job, Status s);
  void refresh(Job& job);
  [[nodiscard]] nlohmann::json event_data(const Job& job) const;
  [[nodiscard]] nlohmann::json block_job_info(Job& job);
  // Finds a job by `device` / `id`, or answers the QMP error QEMU gives.
  [[nodiscard]] Job* find(const std::string& id, qmp::Responder* r);
  // The device stops the job (quiesced) and the job ends as `how`.
  void stop_job(const std::string& id, End how, std::optional<std::string> error = std::nullopt);
  void finish(const std::string& id, End how, std::optional<std::string> error);
  void user_pause(Job& job, bool pause);
  [[nodiscard]] bool vm_running() const;

  qmp::Server& server_;
  BackendHost& host_;
  std::map<std::string, Job> jobs_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

[[nodiscard]] std::string_view to_string(BlockJobs::Status s);

}  // namespace pvhost
