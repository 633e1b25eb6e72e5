#include "qmp/json_writer.h"

#include <cstdint>

#include <fmt/format.h>

namespace pvhost::qmp {
namespace {

// Decodes one UTF-8 sequence at s[i]; returns the code point (U+FFFD for invalid input)
// and advances i past what was consumed.
uint32_t decode_utf8(std::string_view s, size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  size_t len = 0;
  uint32_t cp = 0;
  uint32_t min = 0;
  if ((b0 & 0xE0) == 0xC0) { len = 2; cp = b0 & 0x1Fu; min = 0x80; }
  else if ((b0 & 0xF0) == 0xE0) { len = 3; cp = b0 & 0x0Fu; min = 0x800; }
  else if ((b0 & 0xF8) == 0xF0) { len = 4; cp = b0 & 0x07u; min = 0x10000; }
  else { ++i; return 0xFFFD; }
  if (i + len > s.size()) { ++i; return 0xFFFD; }
  for (size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[i + k]);
    if ((b & 0xC0) != 0x80) { ++i; return 0xFFFD; }
    cp = (cp << 6) | (b & 0x3Fu);
  }
  i += len;
  if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0xFFFD;
  return cp;
}

}  // namespace

void write_json_string(std::string& out, std::string_view s) {
  out.push_back('"');
  size_t i = 0;
  while (i < s.size()) {
    const uint32_t cp = decode_utf8(s, i);
    switch (cp) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (cp >= 0x20 && cp < 0x7F) {
          out.push_back(static_cast<char>(cp));
        } else if (cp >= 0x10000) {
          const uint32_t v = cp - 0x10000;
          fmt::format_to(std::back_inserter(out), "\\u{:04X}\\u{:04X}", 0xD800 + (v >> 10),
                         0xDC00 + (v & 0x3FF));
        } else {
          fmt::format_to(std::back_inserter(out), "\\u{:04X}", cp);
        }
    }
  }
  out.push_back('"');
}

void write_json(std::string& out, const nlohmann::json& value) {
  using T = nlohmann::json::value_t;
  switch (value.type()) {
    case T::object: {
      out.push_back('{');
      bool first = true;
      for (const auto& [k, v] : value.items()) {
        if (!first) out += ", ";
        first = false;
        write_json_string(out, k);
        out += ": ";
        write_json(out, v);
      }
      out.push_back('}');
      return;
    }
    case T::array: {
      out.push_back('[');
      bool first = true;
      for (const auto& v : value) {
        if (!first) out += ", ";
        first = false;
        write_json(out, v);
      }
      out.push_back(']');
      return;
    }
    case T::string:
      write_json_string(out, value.get_ref<const std::string&>());
      return;
    case T::null:
    case T::boolean:
    case T::number_integer:
    case T::number_unsigned:
    case T::number_float:
      // Scalars have one spelling; nlohmann's dump() of a scalar cannot throw.
      out += value.dump();
      return;
    case T::binary:
    case T::discarded:
      out += "null";
      return;
  }
}

std::string to_json(const nlohmann::json& value) {
  std::string out;
  write_json(out, value);
  return out;
}

}  // namespace pvhost::qmp
