#include "tests/integration/block/block_env.h"

#include <fcntl.h>
#include <unistd.h>

#include <sstream>
#include <stdexcept>

#include <fmt/format.h>

namespace pvhost::test {

nlohmann::json last_json(const std::string& out) {
  std::istringstream in(out);
  std::string line, last;
  while (std::getline(in, line))
    if (!line.empty() && line[0] == '{') last = line;
  if (last.empty()) return {{"ok", false}, {"error", "no JSON output"}};
  auto j = nlohmann::json::parse(last, nullptr, false);
  if (j.is_discarded()) return {{"ok", false}, {"error", "bad JSON: " + last}};
  return j;
}

BlockEnv::BlockEnv() : GuestEnv({.name = "block-guest", .memory_mib = 256, .max_grant_frames = 64}, "qdisk") {}

std::string BlockEnv::make_image(uint64_t bytes) {
  std::string path = fmt::format("{}/disk{}.img", images_.path(), next_image_++);
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(bytes)) != 0) throw std::runtime_error("image " + path);
  ::close(fd);
  return path;
}

toolstack::DeviceAddress BlockEnv::add_disk(const std::string& image, const std::string& vdev,
                                            std::map<std::string, std::string> settings) {
  settings.try_emplace("target", image);
  settings["vdev"] = vdev;
  return add_device(std::move(settings));
}

Process BlockEnv::start_blkfront(const std::string& devid, const std::vector<std::string>& args) {
  std::vector<std::string> argv{"--devid", devid};
  argv.insert(argv.end(), args.begin(), args.end());
  return start_frontend("blkfront", argv, Stdout::own_file);
}

nlohmann::json BlockEnv::blkfront(const std::string& devid, const std::vector<std::string>& args,
                                  std::chrono::milliseconds timeout) {
  Process c = start_blkfront(devid, args);
  auto st = c.wait(timeout);
  if (!st) {
    c.kill_now();
    return {{"ok", false}, {"error", "blkfront timed out"}, {"stdout", c.out()}};
  }
  auto j = last_json(c.out());
  j["exit"] = *st;
  return j;
}

}  // namespace pvhost::test
