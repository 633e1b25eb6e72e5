#include "src/xenbus.h"

#include <charconv>

#include <fmt/format.h>

namespace pvhost {

std::string_view to_string(XenbusState s) {
  switch (s) {
    case XenbusState::unknown: return "Unknown";
    case XenbusState::initialising: return "Initialising";
    case XenbusState::init_wait: return "InitWait";
    case XenbusState::initialised: return "Initialised";
    case XenbusState::connected: return "Connected";
    case XenbusState::closing: return "Closing";
    case XenbusState::closed: return "Closed";
    case XenbusState::reconfiguring: return "Reconfiguring";
    case XenbusState::reconfigured: return "Reconfigured";
  }
  return "?";
}

Result<XenbusState> parse_xenbus_state(std::string_view text) {
  int v = -1;
  auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (text.empty() || ec != std::errc() || p != text.data() + text.size() || v < 0 || v > 8)
    return fail(EINVAL, fmt::format("'{}' is not a xenbus state", text));
  return static_cast<XenbusState>(v);
}

bool frontend_is_active(XenbusState s) {
  switch (s) {
    case XenbusState::init_wait:
    case XenbusState::initialised:
    case XenbusState::connected:
    case XenbusState::closing:
      return true;
    case XenbusState::unknown:
    case XenbusState::initialising:
    case XenbusState::closed:
    case XenbusState::reconfiguring:
    case XenbusState::reconfigured:
      return false;
  }
  return false;
}

}  // namespace pvhost
