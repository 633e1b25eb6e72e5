#include "qmp/json_framer.h"

#include <fmt/format.h>

namespace pvhost::qmp {
namespace {

bool is_space(unsigned char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }
bool is_structural(unsigned char c) {
  return c == '{' || c == '}' || c == '[' || c == ']' || c == ',' || c == ':';
}
// json-lexer.c IN_RECOVERY: structural characters, control characters other than tab and
// the impossible UTF-8 bytes end the skipping.
bool is_resync_point(unsigned char c) {
  return is_structural(c) || (c < 0x20 && c != '\t') || c >= 0xFE;
}
bool is_scalar_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         c == '-' || c == '+' || c == '.';
}
std::string printable(unsigned char c) {
  if (c >= 0x20 && c < 0x7F) return std::string(1, static_cast<char>(c));
  return fmt::format("\\x{:02X}", c);
}

}  // namespace

void JsonFramer::error(const Sink& sink, std::string text) {
  if (!skipping_) sink(Frame{{}, text});
  buf_.clear();
  stack_.clear();
  extra_depth_ = 0;
  skipping_ = false;
  top_string_ = false;
  state_ = State::recovery;
}

void JsonFramer::overflow(const Sink& sink, std::string text) {
  if (!skipping_) sink(Frame{{}, text});
  skipping_ = true;
  buf_.clear();
  buf_.shrink_to_fit();
}

void JsonFramer::finish(const Sink& sink) {
  if (!skipping_) sink(Frame{buf_, {}});
  buf_.clear();
  stack_.clear();
  extra_depth_ = 0;
  skipping_ = false;
  top_string_ = false;
  state_ = State::top;
}

void JsonFramer::append(char c, const Sink& sink) {
  if (skipping_) return;
  if (buf_.size() >= limits_.max_message_bytes) {
    overflow(sink, fmt::format("JSON message size limit exceeded ({} bytes)", limits_.max_message_bytes));
    return;
  }
  buf_.push_back(c);
}

void JsonFramer::feed(std::string_view bytes, const Sink& sink) {
  size_t i = 0;
  while (i < bytes.size()) {
    const char ch = bytes[i];
    const auto c = static_cast<unsigned char>(ch);
    // The impossible UTF-8 bytes are errors everywhere, even inside strings
    // (qmp-spec.rst: a client sends 0xFF to force the parser into a known state).
    if (c >= 0xFE && state_ != State::recovery) {
      error(sink, fmt::format("JSON parse error, stray '{}'", printable(c)));
      ++i;
      continue;
    }
    switch (state_) {
      case State::recovery:
        if (is_resync_point(c)) {
          state_ = State::top;
          if (c >= 0xFE) {  // resynchronised, but the byte itself is still an error
            error(sink, fmt::format("JSON parse error, stray '{}'", printable(c)));
            ++i;
          }
          continue;  // look at this byte again from the top
        }
        ++i;
        continue;
      case State::top:
        ++i;
        if (is_space(c)) continue;
        if (c == '{' || c == '[') {
          buf_.assign(1, ch);
          stack_.assign(1, c == '{' ? '}' : ']');
          state_ = State::structure;
        } else if (c == '"') {
          buf_.assign(1, ch);
          top_string_ = true;
          state_ = State::string;
        } else if (is_scalar_char(c)) {
          buf_.assign(1, ch);
          state_ = State::scalar;
        } else if (c == '}' || c == ']') {
          error(sink, "JSON parse error, expecting value");
        } else {
          error(sink, fmt::format("JSON parse error, stray '{}'", printable(c)));
        }
        continue;
      case State::scalar:
        if (is_scalar_char(c)) {
          append(ch, sink);
          ++i;
          continue;
        }
        finish(sink);  // the delimiter is looked at again from the top
        continue;
      case State::structure:
        ++i;
        if (c == '"') {
          append(ch, sink);
          state_ = State::string;
        } else if (c == '{' || c == '[') {
          if (stack_.size() + extra_depth_ >= limits_.max_depth) {
            overflow(sink, "JSON nesting depth limit exceeded");
            ++extra_depth_;
          } else if (extra_depth_ > 0) {
            ++extra_depth_;
          } else {
            stack_.push_back(c == '{' ? '}' : ']');
          }
          append(ch, sink);
        } else if (c == '}' || c == ']') {
          if (extra_depth_ > 0) {
            --extra_depth_;  // beyond the depth limit only the count is kept
            continue;
          }
          if (stack_.back() != ch) {
            error(sink, fmt::format("JSON parse error, unexpected '{}'", printable(c)));
            continue;
          }
          stack_.pop_back();
          append(ch, sink);
          if (stack_.empty()) finish(sink);
        } else if (c < 0x20 && !is_space(c)) {
          error(sink, fmt::format("JSON parse error, stray '{}'", printable(c)));
        } else {
          append(ch, sink);
        }
        continue;
      case State::string:
        ++i;
        if (c < 0x20) {
          error(sink, fmt::format("JSON parse error, control character '{}' in string", printable(c)));
          continue;
        }
        append(ch, sink);
        if (c == '\\') {
          state_ = State::escape;
        } else if (c == '"') {
          if (top_string_) finish(sink);
          else state_ = State::structure;
        }
        continue;
      case State::escape:
        ++i;
        if (c < 0x20) {
          error(sink, fmt::format("JSON parse error, control character '{}' in string", printable(c)));
          continue;
        }
        append(ch, sink);
        state_ = State::string;
        continue;
    }
  }
}

}  // namespace pvhost::qmp
