// A small end-to-end environment for the console suite: pvhost-xenemu --strict in a temp
// rundir, one guest domain created through the emulator's toolstack library, pvhost and
// consfront as separate processes, xenstore as dom0 through the real libxenstore.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "hw/xen/emu/guest/guest.h"
#include "hw/xen/toolstack/devices.h"
#include "hw/xen/xs_client.h"

namespace pvhost::test {

// A child with stdout+stderr in a file; SIGKILLed when destroyed if still running.
class Child {
 public:
  Child() = default;
  Child(const std::vector<std::string>& argv, std::string log_path);
  Child(Child&& o) noexcept;
  Child& operator=(Child&& o) noexcept;
  ~Child();
  [[nodiscard]] pid_t pid() const { return pid_; }
  [[nodiscard]] bool running();
  // Exit status (or 128+signal); nullopt on timeout.
  [[nodiscard]] std::optional<int> wait(std::chrono::milliseconds timeout);
  [[nodiscard]] std::string log() const;
  void kill_now();

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
  std::string log_path_;
};

[[nodiscard]] bool poll_until(const std::function<bool()>& cond,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));

class ConsoleEnv {
 public:
  ConsoleEnv();
  ~ConsoleEnv();
  ConsoleEnv(const ConsoleEnv&) = delete;
  ConsoleEnv& operator=(const ConsoleEnv&) = delete;

  [[nodiscard]] const std::string& rundir() const { return rundir_; }
  [[nodiscard]] DomId domid() const { return domid_; }
  [[nodiscard]] xen::XsClient& xs() { return *xs_; }

  // toolstack::device_add of a console (devid 0 = primary) with extra settings.
  [[nodiscard]] toolstack::DeviceAddress add_console(const std::string& devid,
                                                     std::map<std::string, std::string> settings = {});
  void start_pvhost(const std::vector<std::string>& extra = {});
  [[nodiscard]] Child start_consfront(const std::vector<std::string>& args);
  [[nodiscard]] std::string read(const std::string& path);
  [[nodiscard]] bool wait_for(const std::string& path, const std::string& value,
                              std::chrono::milliseconds timeout = std::chrono::seconds(10));
  [[nodiscard]] Child& pvhost() { return pvhost_; }
  // Everything logged so far, for failure messages.
  [[nodiscard]] std::string logs();

 private:
  std::string rundir_;
  Child xenemu_;
  Child pvhost_;
  std::unique_ptr<xen::XsClient> xs_;
  std::unique_ptr<xenemu::Toolstack> ts_;
  DomId domid_;
  int next_log_ = 0;
  std::vector<std::string> log_files_;
};

// Byte-exact exchange over a connected fd (socket or pty slave): writes `total` bytes of
// pattern_byte(offset + i) while reading back what comes, as fast as the fd allows; with
// `slow`, the reader pauses now and then (backpressure). Returns what was read.
[[nodiscard]] std::vector<std::byte> exchange(int fd, uint64_t offset, size_t total, bool slow,
                                              std::chrono::milliseconds timeout = std::chrono::seconds(30));
// Reads until `total` bytes arrived, or nothing for `quiet`, or `timeout`.
[[nodiscard]] std::vector<std::byte> read_bytes(int fd, size_t total, std::chrono::milliseconds quiet,
                                                std::chrono::milliseconds timeout = std::chrono::seconds(30));
[[nodiscard]] int connect_unix(const std::string& path);
// The first offset where `got` differs from the pattern starting at `offset`, or nullopt.
[[nodiscard]] std::optional<size_t> first_mismatch(const std::vector<std::byte>& got, uint64_t offset);

}  // namespace pvhost::test
