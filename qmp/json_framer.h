// Incremental framing of a QMP input stream into complete top-level JSON values.
//
// QMP (docs/interop/qmp-spec.rst, "Protocol Specification") is a stream of JSON texts with
// no delimiter; QEMU finds message boundaries with its own lexer and streamer
// (qobject/json-lexer.c, json-streamer.c): a value ends when the brace and bracket counts
// return to zero. This framer does the same with a small state machine over bytes: it
// tracks strings (and escapes inside them), the nesting stack and the message size, and
// hands each complete top-level value to the caller as text, which the caller parses
// (nlohmann::json::parse with exceptions off). It is a pure function of its input and is
// fuzzed directly (tests/fuzz/qmp/qmp_json_fuzz.cc).
//
// Error handling and resynchronisation (qmp-spec.rst, "Forcing the JSON parser into
// known-good state"; json-lexer.c IN_RECOVERY):
//  * A byte that cannot start a token at top level, a mismatched or stray closing bracket,
//    a control character inside a string, or the impossible UTF-8 bytes 0xFE/0xFF anywhere
//    produce one error and drop the partial message. The framer then discards input up to
//    the next structural character ({ } [ ] , :) or ASCII control character (e.g. newline),
//    as QEMU's lexer does, and starts afresh. A client may send 0xFF to force a reset.
//  * A message larger than `max_message_bytes` or nested deeper than `max_depth` produces
//    one error; the rest of that value is skipped (still tracking strings and nesting, not
//    stored) so the stream stays in step and the next request is answered normally.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace pvhost::qmp {

struct FramerLimits {
  // QEMU allows 64 MiB tokens; libxl's largest message is well under 1 KiB. 4 MiB leaves
  // room for big human-monitor-command lines while bounding per-client memory.
  size_t max_message_bytes = 4u << 20;
  // QEMU's json-streamer MAX_NESTING (brace + bracket count).
  size_t max_depth = 1024;
};

class JsonFramer {
 public:
  // Exactly one of the two is set per call: a complete top-level value, or an error text
  // meant for the QMP "desc" (GenericError).
  struct Frame {
    std::string_view message;
    std::string_view error;
  };
  using Sink = std::function<void(const Frame&)>;

  explicit JsonFramer(FramerLimits limits = {}) : limits_(limits) {}

  // Feeds bytes; calls `sink` for every complete value or error, in stream order.
  void feed(std::string_view bytes, const Sink& sink);
  // True while a value has started but not finished (for tests and diagnostics).
  [[nodiscard]] bool in_message() const { return state_ != State::top; }
  [[nodiscard]] size_t buffered() const { return buf_.size(); }

 private:
  enum class State : uint8_t {
    top,        // between values
    structure,  // inside { } or [ ], outside a string
    string,     // inside a string (nested or top-level)
    escape,     // after a backslash inside a string
    scalar,     // a top-level number or keyword
    recovery,   // after an error: discard to a resynchronisation point
  };
  void error(const Sink& sink, std::string text);
  void overflow(const Sink& sink, std::string text);
  void finish(const Sink& sink);
  void append(char c, const Sink& sink);

  FramerLimits limits_;
  State state_ = State::top;
  std::string buf_;
  std::vector<char> stack_;  // expected closers: '}' or ']'; at most max_depth entries
  size_t extra_depth_ = 0;   // nesting beyond max_depth while skipping (counted only)
  bool skipping_ = false;    // over a limit: track the value but do not store it
  bool top_string_ = false;  // the current value is a top-level string
};

}  // namespace pvhost::qmp
