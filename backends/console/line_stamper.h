// Timestamps a byte stream line by line, for the console log (output `log:PATH` or the
// backend `log` key): every line starts with "[YYYY-MM-DD hh:mm:ss.mmm] " (UTC, the time
// its first byte was drained from the ring). '\r' is dropped so "\r\n" line ends from a
// guest's tty layer come out as one newline. Pure: the clock is passed in.
#pragma once

#include <chrono>
#include <cstddef>
#include <span>
#include <string>

namespace pvhost::console {

class LineStamper {
 public:
  // Returns the text to append to the log for `bytes` received at `now`.
  [[nodiscard]] std::string feed(std::span<const std::byte> bytes, std::chrono::system_clock::time_point now);
  [[nodiscard]] static std::string stamp(std::chrono::system_clock::time_point now);

 private:
  bool at_line_start_ = true;
};

}  // namespace pvhost::console
