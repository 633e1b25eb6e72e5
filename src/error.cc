#include "src/error.h"

#include <cstring>
#include <string.h>

namespace pvhost {

std::string errno_name(int code) {
  if (const char* name = strerrorname_np(code)) return name;
  return "E" + std::to_string(code);
}

int errno_from_name(std::string_view name) {
  // errno values on Linux are small; a linear scan of the table is plenty for the few
  // places that parse names (xenstore error replies).
  for (int code = 1; code < 256; ++code) {
    const char* n = strerrorname_np(code);
    if (n != nullptr && name == n) return code;
  }
  return 0;
}

std::string Error::what() const {
  std::string out;
  for (auto it = context_.rbegin(); it != context_.rend(); ++it) {
    out += *it;
    out += ": ";
  }
  out += message_;
  return out;
}

std::string Error::describe() const {
  std::string out = what();
  if (code_ != 0) {
    out += ": ";
    out += errno_name(code_);
  }
  return out;
}

}  // namespace pvhost
