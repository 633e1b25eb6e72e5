// End-to-end test harness shared by the integration suites (lifecycle, block, console): a
// pvhost-xenemu daemon in a temp rundir (strict mode), domains created through the emulator's
// toolstack library (hw/xen/emu/toolstack/domain.h, as pvhost-xl does), devices added as libxl
// adds them (hw/xen/toolstack/devices.h), pvhost and frontends started against it as separate
// processes, and xenstore access as dom0 or as a domain (through the real libxenstore, as
// every client does).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/toolstack/devices.h"
#include "hw/xen/xs_client.h"
#include "src/types.h"

namespace pvhost::test {

// Built binaries, relative to the build directory.
inline constexpr const char* kXenemuBinary = "hw/xen/emu/broker/pvhost-xenemu";

// A child process with its output in files (stdin is /dev/null); killed (SIGKILL) and reaped
// if still running when destroyed.
class Process {
 public:
  // stderr goes to `log_path`, and so does stdout unless `out_path` names a file of its own.
  [[nodiscard]] static Process spawn(const std::vector<std::string>& argv, std::string log_path,
                                     std::string out_path = "");
  Process() = default;
  Process(Process&& o) noexcept;
  Process& operator=(Process&& o) noexcept;
  ~Process();
  [[nodiscard]] pid_t pid() const { return pid_; }
  // Sends `sig` while the process has not been reaped (never to a recycled pid).
  void signal(int sig) const;
  // SIGKILL and reap, if still running.
  void kill_now();
  [[nodiscard]] bool running();
  // Exit status (WEXITSTATUS, or 128+signal; kept once reaped), or nullopt on timeout.
  [[nodiscard]] std::optional<int> wait(std::chrono::milliseconds timeout);
  // What it wrote to its log (stderr, and stdout unless kept apart) and to `out_path`.
  [[nodiscard]] std::string log() const;
  [[nodiscard]] std::string out() const;

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
  std::string log_path_;
  std::string out_path_;
};

// Runs a command to completion; returns exit status and stdout+stderr.
struct CommandResult {
  int status;
  std::string output;
};
[[nodiscard]] CommandResult run_command(const std::string& cmd);

// Polls `cond` until true or timeout (xenstore changes and child processes are asynchronous).
[[nodiscard]] bool poll_until(const std::function<bool()>& cond,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));

// Paths of built binaries (from PVHOST_BUILD_DIR); pvhost itself is PVHOST_BIN when set.
[[nodiscard]] std::string build_path(const std::string& relative);
[[nodiscard]] std::string pvhost_binary();

// A fresh directory made from a mkdtemp(3) template, removed with its contents when
// destroyed; kept when PVHOST_KEEP_RUNDIR is set, to look at after a failure.
class TempDir {
 public:
  explicit TempDir(std::string path_template);
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  [[nodiscard]] const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Where a process started by EmuHost::spawn writes its stdout: into its log with stderr, or
// into a file of its own (a frontend whose stdout is its JSON result).
enum class Stdout { in_log, own_file };

class EmuHost {
 public:
  // Starts pvhost-xenemu --strict in a fresh temp rundir, connected as dom0 to its xenstored
  // and its broker.
  [[nodiscard]] static std::unique_ptr<EmuHost> start();
  ~EmuHost();
  EmuHost(const EmuHost&) = delete;
  EmuHost& operator=(const EmuHost&) = delete;
  [[nodiscard]] const std::string& rundir() const { return rundir_.path(); }
  [[nodiscard]] xen::XsClient& xs() { return *xs_; }  // dom0
  // A domain as the toolstack creates it (broker domain + /local/domain/N nodes).
  [[nodiscard]] DomId create_domain(const xenemu::DomainConfig& config);
  [[nodiscard]] DomId create_domain(const std::string& name, unsigned memory_mib = 64);
  void destroy_domain(DomId d);
  // xenstore as domain N (RUNDIR/domain-N.sock).
  [[nodiscard]] std::unique_ptr<xen::XsClient> domain_xs(DomId d);
  // A pvhost (or `binary`, e.g. pvhost-test) process for `guest` at log level debug, with
  // extra args.
  [[nodiscard]] Process start_pvhost(DomId guest, const std::vector<std::string>& args,
                                     const std::string& binary = "");
  // A process whose log is RUNDIR/NAME-N.log (stdout, with Stdout::own_file, RUNDIR/NAME-N.out).
  [[nodiscard]] Process spawn(const std::string& name, const std::vector<std::string>& argv,
                              Stdout out = Stdout::in_log);
  // Reads a node; "" if absent.
  [[nodiscard]] std::string read(const std::string& path);
  // Waits until `path` reads `value`.
  [[nodiscard]] bool wait_for(const std::string& path, const std::string& value,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));
  // The tail of every log written so far (the daemon's, then each spawned process's), for
  // failure messages.
  [[nodiscard]] std::string logs() const;

 protected:
  EmuHost();

 private:
  TempDir rundir_;  // first: removed after everything that runs in it has stopped
  std::vector<std::string> log_files_;
  Process daemon_;
  std::unique_ptr<xen::XsClient> xs_;
  std::unique_ptr<xenemu::Toolstack> ts_;
  int next_log_ = 0;
};

// One guest on a host of its own and the pvhost process serving one backend type for it:
// where a backend's suite starts (tests/integration/block, tests/integration/console).
class GuestEnv : public EmuHost {
 public:
  // `backend`: the device type (toolstack::DeviceRequest::type), which is also the name
  // pvhost serves it under (-backends).
  GuestEnv(const xenemu::DomainConfig& domain, std::string backend);
  [[nodiscard]] DomId domid() const { return domid_; }
  // toolstack::device_add of a `backend` device of the guest, served by dom0.
  [[nodiscard]] toolstack::DeviceAddress add_device(std::map<std::string, std::string> settings);
  // pvhost -backends BACKEND for the guest, with extra args (hides EmuHost::start_pvhost).
  void start_pvhost(const std::vector<std::string>& extra = {});
  [[nodiscard]] Process& pvhost() { return pvhost_; }
  // tests/frontends/NAME/NAME --rundir RUNDIR --domid N ARGS..., running as the guest.
  [[nodiscard]] Process start_frontend(const std::string& name, const std::vector<std::string>& args,
                                       Stdout out = Stdout::in_log);

 private:
  DomId domid_;
  std::string backend_;
  Process pvhost_;  // stopped before the host's daemon
};

}  // namespace pvhost::test
