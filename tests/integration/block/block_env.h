// The qdisk suite's environment: a guest on its own pvhost-xenemu --strict
// (tests/integration/harness.h), served by pvhost -backends qdisk, with images on a real
// file system and our blkfront (tests/frontends/blkfront) as a separate process.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/integration/harness.h"

namespace pvhost::test {

class BlockEnv : public GuestEnv {
 public:
  BlockEnv();

  // A sparse image file of `bytes` in a directory on a disk-backed file system (O_DIRECT).
  [[nodiscard]] std::string make_image(uint64_t bytes);
  // toolstack::device_add of a qdisk (target=image vdev=xvdX ...).
  [[nodiscard]] toolstack::DeviceAddress add_disk(const std::string& image, const std::string& vdev,
                                                  std::map<std::string, std::string> settings = {});
  // Runs blkfront to completion; its JSON summary (or {"ok":false,"error":...}).
  [[nodiscard]] nlohmann::json blkfront(const std::string& devid, const std::vector<std::string>& args,
                                        std::chrono::milliseconds timeout = std::chrono::seconds(120));
  // blkfront, its stdout (the JSON summary) apart from its log.
  [[nodiscard]] Process start_blkfront(const std::string& devid, const std::vector<std::string>& args);

 private:
  // Not /tmp, which may be tmpfs (no O_DIRECT).
  TempDir images_{"/var/tmp/pvhost-blkimg-XXXXXX"};
  int next_image_ = 0;
};

// Parses the last JSON line of `out`.
[[nodiscard]] nlohmann::json last_json(const std::string& out);

}  // namespace pvhost::test
