// End-to-end test harness: a pvhost-xenemu daemon in a temp rundir (strict mode), domains
// created through it, pvhost processes started against it, and xenstore access as dom0 or
// as a domain (through the real libxenstore, as every client does).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hw/xen/xs_client.h"
#include "src/types.h"

namespace pvhost::test {

// Built binaries, relative to the build directory.
inline constexpr const char* kXenemuBinary = "hw/xen/emu/broker/pvhost-xenemu";
inline constexpr const char* kXlBinary = "hw/xen/emu/broker/pvhost-xl";

// A child process with its stderr captured to a file; killed (SIGKILL) if still running
// when destroyed.
class Process {
 public:
  [[nodiscard]] static Process spawn(const std::vector<std::string>& argv, const std::string& log_path,
                                     const std::vector<std::string>& env = {});
  Process() = default;
  Process(Process&& o) noexcept;
  Process& operator=(Process&& o) noexcept;
  ~Process();
  [[nodiscard]] pid_t pid() const { return pid_; }
  void signal(int sig) const;
  // Exit status (WEXITSTATUS, or 128+signal), or nullopt on timeout.
  [[nodiscard]] std::optional<int> wait(std::chrono::milliseconds timeout);
  [[nodiscard]] bool running();
  [[nodiscard]] std::string log() const;

 private:
  pid_t pid_ = -1;
  std::string log_path_;
};

// Runs a command to completion; returns exit status and stdout+stderr.
struct CommandResult {
  int status;
  std::string output;
};
[[nodiscard]] CommandResult run_command(const std::string& cmd);

// Polls `cond` until true or timeout (xenstore changes are asynchronous).
[[nodiscard]] bool wait_until(const std::function<bool()>& cond,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));

// Paths of built binaries (from PVHOST_BUILD_DIR / PVHOST_BIN).
[[nodiscard]] std::string build_path(const std::string& relative);

class EmuHost {
 public:
  // Starts pvhost-xenemu --strict in a fresh temp rundir.
  [[nodiscard]] static std::unique_ptr<EmuHost> start();
  ~EmuHost();
  [[nodiscard]] const std::string& rundir() const { return rundir_; }
  [[nodiscard]] xen::XsClient& xs() { return *xs_; }  // dom0
  // A domain as the toolstack creates it (broker domain + /local/domain/N nodes).
  [[nodiscard]] DomId create_domain(const std::string& name, unsigned memory_mib = 64);
  void destroy_domain(DomId d);
  // xenstore as domain N (RUNDIR/domain-N.sock).
  [[nodiscard]] std::unique_ptr<xen::XsClient> domain_xs(DomId d);
  // A pvhost (or pvhost-test) process for `guest` with extra args; logs to the rundir.
  [[nodiscard]] Process start_pvhost(DomId guest, const std::vector<std::string>& args,
                                     const std::string& binary = "");
  // Reads a node; "" if absent.
  [[nodiscard]] std::string read(const std::string& path);
  // Waits until `path` reads `value`.
  [[nodiscard]] bool wait_for(const std::string& path, const std::string& value,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));

 private:
  EmuHost() = default;
  std::string rundir_;
  Process daemon_;
  std::unique_ptr<xen::XsClient> xs_;
  int next_log_ = 0;
};

}  // namespace pvhost::test
