// The qdisk suite's environment: pvhost-xenemu --strict in a temp rundir, one guest domain
// created through the emulator's toolstack library, pvhost (-backends qdisk) and blkfront
// as separate processes, xenstore as dom0 through the real libxenstore.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/toolstack/devices.h"
#include "hw/xen/xs_client.h"

namespace pvhost::blktest {

// A child with stdout and stderr in files; SIGKILLed when destroyed if still running.
class Child {
 public:
  Child() = default;
  Child(const std::vector<std::string>& argv, std::string out_path, std::string err_path);
  Child(Child&& o) noexcept;
  Child& operator=(Child&& o) noexcept;
  ~Child();
  [[nodiscard]] bool running();
  [[nodiscard]] std::optional<int> wait(std::chrono::milliseconds timeout);
  [[nodiscard]] std::string out() const;
  [[nodiscard]] std::string err() const;
  void kill_now();

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
  std::string out_path_, err_path_;
};

[[nodiscard]] bool poll_until(const std::function<bool()>& cond,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));

class BlockEnv {
 public:
  explicit BlockEnv(uint32_t memory_mib = 256);
  ~BlockEnv();
  BlockEnv(const BlockEnv&) = delete;
  BlockEnv& operator=(const BlockEnv&) = delete;

  [[nodiscard]] const std::string& rundir() const { return rundir_; }
  [[nodiscard]] DomId domid() const { return domid_; }
  [[nodiscard]] xen::XsClient& xs() { return *xs_; }

  // A sparse image file of `bytes` in the rundir's sibling on a real file system (O_DIRECT).
  [[nodiscard]] std::string make_image(uint64_t bytes);
  // toolstack::device_add of a qdisk (target=image vdev=xvdX ...).
  [[nodiscard]] toolstack::DeviceAddress add_disk(const std::string& image, const std::string& vdev,
                                                  std::map<std::string, std::string> settings = {});
  void start_pvhost(const std::vector<std::string>& extra = {});
  [[nodiscard]] bool pvhost_running() { return pvhost_.running(); }
  // Runs blkfront to completion; its JSON summary (or {"ok":false,"error":...}).
  [[nodiscard]] nlohmann::json blkfront(const std::string& devid, const std::vector<std::string>& args,
                                        std::chrono::milliseconds timeout = std::chrono::seconds(120));
  [[nodiscard]] Child start_blkfront(const std::string& devid, const std::vector<std::string>& args);
  [[nodiscard]] std::string read(const std::string& path);
  [[nodiscard]] bool wait_for(const std::string& path, const std::string& value,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // The tail of every log, for failure messages.
  [[nodiscard]] std::string logs();

 private:
  std::string rundir_;
  std::string imgdir_;
  Child xenemu_;
  Child pvhost_;
  std::unique_ptr<xen::XsClient> xs_;
  std::unique_ptr<xenemu::Toolstack> ts_;
  DomId domid_;
  int next_ = 0;
  std::vector<std::string> log_files_;
};

// Parses the last JSON line of `out`.
[[nodiscard]] nlohmann::json last_json(const std::string& out);

}  // namespace pvhost::blktest
