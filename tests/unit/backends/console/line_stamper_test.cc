// The console log's line stamps.
#include <catch2/catch.hpp>

#include <string>

#include "backends/console/line_stamper.h"

using namespace pvhost::console;

namespace {
std::span<const std::byte> bytes(const std::string& s) { return std::as_bytes(std::span(s)); }
}  // namespace

TEST_CASE("each line gets one UTC stamp at its first byte; CR is dropped") {
  const auto t = std::chrono::system_clock::time_point(std::chrono::milliseconds(1700000000123));
  LineStamper s;
  CHECK(LineStamper::stamp(t) == "[2023-11-14 22:13:20.123] ");
  std::string out = s.feed(bytes("boot\r\nsec"), t);
  CHECK(out == "[2023-11-14 22:13:20.123] boot\n[2023-11-14 22:13:20.123] sec");
  // A line continued in a later chunk is not stamped again.
  out = s.feed(bytes("ond\n"), t + std::chrono::seconds(1));
  CHECK(out == "ond\n");
  out = s.feed(bytes("x"), t + std::chrono::seconds(2));
  CHECK(out == "[2023-11-14 22:13:22.123] x");
}
