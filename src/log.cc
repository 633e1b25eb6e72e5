#include "src/log.h"

#include <fcntl.h>
#include <sys/time.h>
#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <mutex>

#include "src/fd.h"

namespace pvhost::log {
namespace {

std::atomic<Level> g_level{Level::info};
std::atomic<int> g_fd{STDERR_FILENO};
std::atomic<Tap> g_tap{nullptr};
UniqueFd g_file;  // owned sink, when -D is given

constexpr std::string_view level_name(Level l) {
  switch (l) {
    case Level::trace: return "trace";
    case Level::debug: return "debug";
    case Level::info: return "info";
    case Level::warn: return "warning";
    case Level::error: return "error";
    case Level::off: return "off";
  }
  return "?";
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

Result<Level> parse_level(std::string_view name) {
  for (Level l : {Level::trace, Level::debug, Level::info, Level::warn, Level::error, Level::off})
    if (name == level_name(l)) return l;
  if (name == "warn") return Level::warn;
  return fail(EINVAL, fmt::format("unknown log level '{}' (trace, debug, info, warning, error, off)", name));
}

void set_level(Level level) { g_level = level; }
Level level() { return g_level.load(std::memory_order_relaxed); }

Result<void> set_file(const std::string& path) {
  if (path.empty()) {
    g_fd = STDERR_FILENO;
    g_file.reset();
    return {};
  }
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return fail_errno(fmt::format("open log file {}", path));
  g_file.reset(fd);
  g_fd = fd;
  return {};
}

void set_tap(Tap tap) { g_tap = tap; }

void write(Level l, std::string_view message) {
  struct timeval tv;
  ::gettimeofday(&tv, nullptr);
  struct tm tm;
  ::localtime_r(&tv.tv_sec, &tm);
  std::string line = fmt::format("{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} pvhost[{}] {}: {}",
                                 tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                                 tm.tm_min, tm.tm_sec, tv.tv_usec / 1000, ::getpid(),
                                 level_name(l), message);
  if (Tap tap = g_tap.load()) tap(l, line);
  line += '\n';
  // One write() per line keeps lines whole between threads and processes (O_APPEND).
  // A failed log write has nowhere to be reported; ignored deliberately.
  (void)::write(g_fd.load(), line.data(), line.size());
}

bool RateLimit::admit(uint64_t& suppressed) {
  const int64_t now = now_ms();
  int64_t tokens = tokens_x1000_.load(std::memory_order_relaxed);
  if (tokens < 0) tokens = int64_t{burst_} * 1000;
  const int64_t last = last_ms_.exchange(now, std::memory_order_relaxed);
  if (last != 0 && interval_ms_ > 0)
    tokens = std::min<int64_t>(int64_t{burst_} * 1000, tokens + (now - last) * 1000 / interval_ms_);
  // Races between threads only make the limit a little loose; it is a log throttle.
  if (tokens < 1000) {
    tokens_x1000_.store(tokens, std::memory_order_relaxed);
    dropped_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  tokens_x1000_.store(tokens - 1000, std::memory_order_relaxed);
  suppressed = dropped_.exchange(0, std::memory_order_relaxed);
  return true;
}

}  // namespace pvhost::log
