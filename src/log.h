// Logging: levels, a stderr or file sink (-D FILE), per-call-site rate limiting for
// messages a guest can trigger, and structured trace points for lifecycle events.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "src/error.h"

namespace pvhost::log {

enum class Level { trace = 0, debug, info, warn, error, off };

[[nodiscard]] Result<Level> parse_level(std::string_view name);

// Process-wide sink configuration; set once at start-up before threads exist.
void set_level(Level level);
[[nodiscard]] Level level();
// Appends to `path` instead of stderr. An empty path goes back to stderr.
[[nodiscard]] Result<void> set_file(const std::string& path);
// Where every line also goes, for tests: called with each formatted line (without "\n").
using Tap = void (*)(Level, std::string_view line);
void set_tap(Tap tap);

void write(Level level, std::string_view message);

[[nodiscard]] inline bool enabled(Level l) { return l >= level(); }

template <class... Args>
void emit(Level l, fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(l)) write(l, fmt::format(f, std::forward<Args>(args)...));
}
template <class... Args>
void trace(fmt::format_string<Args...> f, Args&&... args) { emit(Level::trace, f, std::forward<Args>(args)...); }
template <class... Args>
void debug(fmt::format_string<Args...> f, Args&&... args) { emit(Level::debug, f, std::forward<Args>(args)...); }
template <class... Args>
void info(fmt::format_string<Args...> f, Args&&... args) { emit(Level::info, f, std::forward<Args>(args)...); }
template <class... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) { emit(Level::warn, f, std::forward<Args>(args)...); }
template <class... Args>
void error(fmt::format_string<Args...> f, Args&&... args) { emit(Level::error, f, std::forward<Args>(args)...); }

// A token bucket per call site: at most `burst` messages, refilled at one per `interval`.
// When messages were dropped, the next one that passes says how many.
class RateLimit {
 public:
  constexpr RateLimit(uint32_t burst, std::chrono::milliseconds interval)
      : burst_(burst), interval_ms_(interval.count()) {}
  // True when a message may be written; `suppressed` gets the count dropped since the last.
  bool admit(uint64_t& suppressed);

 private:
  uint32_t burst_;
  int64_t interval_ms_;
  std::atomic<int64_t> tokens_x1000_{-1};  // -1: not yet initialised (full bucket)
  std::atomic<int64_t> last_ms_{0};
  std::atomic<uint64_t> dropped_{0};
};

// Structured trace point: "trace: <event> key=value ..." at debug level, one line, so tests
// and operators can grep lifecycle transitions.
template <class... Args>
void trace_point(std::string_view event, fmt::format_string<Args...> f, Args&&... args) {
  if (enabled(Level::debug))
    write(Level::debug, fmt::format("trace: {} {}", event, fmt::format(f, std::forward<Args>(args)...)));
}

}  // namespace pvhost::log

// Rate-limited log for messages a guest can cause (STYLE.md rule 7): 10 per call site,
// then one a second, with a count of what was dropped.
#define PVHOST_LOG_RATELIMITED(level_, ...)                                              \
  do {                                                                                   \
    static ::pvhost::log::RateLimit pvhost_rl_{10, std::chrono::milliseconds(1000)};     \
    uint64_t pvhost_suppressed_ = 0;                                                     \
    if (::pvhost::log::enabled(level_) && pvhost_rl_.admit(pvhost_suppressed_)) {        \
      std::string pvhost_m_ = fmt::format(__VA_ARGS__);                                  \
      if (pvhost_suppressed_ != 0)                                                       \
        pvhost_m_ += fmt::format(" ({} similar messages suppressed)", pvhost_suppressed_); \
      ::pvhost::log::write(level_, pvhost_m_);                                           \
    }                                                                                    \
  } while (0)
