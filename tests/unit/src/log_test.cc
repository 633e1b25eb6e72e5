#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "src/log.h"

using namespace pvhost;

namespace {
std::vector<std::string> g_lines;
void tap(log::Level, std::string_view line) { g_lines.emplace_back(line); }
}  // namespace

TEST_CASE("guest-triggered messages are rate limited per call site with a dropped count") {
  g_lines.clear();
  log::set_tap(tap);
  auto prev = log::level();
  log::set_level(log::Level::warn);
  auto noisy = [] { PVHOST_LOG_RATELIMITED(log::Level::warn, "bad request {}", 1); };
  for (int i = 0; i < 100; ++i) noisy();
  log::set_tap(nullptr);
  log::set_level(prev);
  // 10 in the burst; the rest fall within the same second and are dropped.
  CHECK(g_lines.size() >= 10);
  CHECK(g_lines.size() < 20);
}

TEST_CASE("log level names parse and unknown ones are refused") {
  CHECK(*log::parse_level("debug") == log::Level::debug);
  CHECK(*log::parse_level("warning") == log::Level::warn);
  auto bad = log::parse_level("loud");
  REQUIRE_FALSE(bad);
  CHECK(bad.error().describe().find("loud") != std::string::npos);
}
