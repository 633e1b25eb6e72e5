// The console suite's environment: a guest on its own pvhost-xenemu --strict
// (tests/integration/harness.h), served by pvhost -backends console, with consfront
// (tests/frontends/consfront) as a separate process; and the byte-exact exchange over the
// host side of a console (a pty or a unix socket).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "tests/integration/harness.h"

namespace pvhost::test {

class ConsoleEnv : public GuestEnv {
 public:
  ConsoleEnv();
  // toolstack::device_add of a console (devid 0 = primary) with extra settings.
  [[nodiscard]] toolstack::DeviceAddress add_console(const std::string& devid,
                                                     std::map<std::string, std::string> settings = {});
  [[nodiscard]] Process start_consfront(const std::vector<std::string>& args) {
    return start_frontend("consfront", args);
  }
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
