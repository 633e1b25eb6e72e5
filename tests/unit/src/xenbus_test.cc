#include <catch2/catch.hpp>

#include "src/xenbus.h"

using namespace pvhost;

TEST_CASE("xenbus states parse from their node values (xenbus.h numbering)") {
  CHECK(*parse_xenbus_state("1") == XenbusState::initialising);
  CHECK(*parse_xenbus_state("4") == XenbusState::connected);
  CHECK(*parse_xenbus_state("6") == XenbusState::closed);
  CHECK(to_string(XenbusState::init_wait) == "InitWait");
}

TEST_CASE("a state node that is not a xenbus state is refused, naming the value") {
  for (const char* bad : {"", "9", "-1", "4x", " 4", "connected"}) {
    auto r = parse_xenbus_state(bad);
    REQUIRE_FALSE(r);
    CHECK(r.error().what().find("is not a xenbus state") != std::string::npos);
  }
}

TEST_CASE("frontend activity: states in which the ring may be in use") {
  CHECK(frontend_is_active(XenbusState::connected));
  CHECK(frontend_is_active(XenbusState::closing));
  CHECK_FALSE(frontend_is_active(XenbusState::initialising));
  CHECK_FALSE(frontend_is_active(XenbusState::closed));
}
