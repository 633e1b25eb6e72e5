#include "backends/console/line_stamper.h"

#include <ctime>

#include <fmt/format.h>

namespace pvhost::console {

std::string LineStamper::stamp(std::chrono::system_clock::time_point now) {
  const auto secs = std::chrono::time_point_cast<std::chrono::seconds>(now);
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now - secs).count();
  const std::time_t t = std::chrono::system_clock::to_time_t(secs);
  std::tm tm{};
  gmtime_r(&t, &tm);
  return fmt::format("[{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03}] ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
                     tm.tm_hour, tm.tm_min, tm.tm_sec, ms);
}

std::string LineStamper::feed(std::span<const std::byte> bytes, std::chrono::system_clock::time_point now) {
  std::string out;
  out.reserve(bytes.size() + 32);
  std::string prefix;
  for (std::byte b : bytes) {
    const char c = static_cast<char>(b);
    if (c == '\r') continue;
    if (at_line_start_) {
      if (prefix.empty()) prefix = stamp(now);
      out += prefix;
      at_line_start_ = false;
    }
    out += c;
    if (c == '\n') at_line_start_ = true;
  }
  return out;
}

}  // namespace pvhost::console
