// Xenbus device states (xen/io/xenbus.h enum xenbus_state) and their parsing.
#pragma once

#include <string_view>

#include "src/error.h"

namespace pvhost {

enum class XenbusState : int {
  unknown = 0,
  initialising = 1,
  init_wait = 2,
  initialised = 3,
  connected = 4,
  closing = 5,
  closed = 6,
  reconfiguring = 7,
  reconfigured = 8,
};

[[nodiscard]] std::string_view to_string(XenbusState s);
// Parses a `state` node ("4"); anything not a known state number is an error naming it.
[[nodiscard]] Result<XenbusState> parse_xenbus_state(std::string_view text);
// The frontend is using (or setting up) the shared ring: the states in which a backend must
// not tear its side down without the frontend's cooperation.
[[nodiscard]] bool frontend_is_active(XenbusState s);

}  // namespace pvhost
