#include <catch2/catch.hpp>

#include <fmt/format.h>

#include "src/types.h"

using namespace pvhost;

TEST_CASE("ring index distance wraps at 2^32 (ring.h RING_IDX)") {
  RingIndex cons(0xFFFFFFF0u);
  RingIndex prod = cons + 0x20;
  CHECK(prod.value() == 0x10u);
  CHECK(prod.since(cons) == 0x20u);
  // A producer behind the consumer looks like a huge distance: callers treat anything
  // over the ring size as a protocol violation.
  CHECK(cons.since(prod) == 0xFFFFFFE0u);
}

TEST_CASE("ring slot masks with the ring size") {
  RingIndex i(0xFFFFFFFFu);
  CHECK(i.slot(32) == 31u);
  ++i;
  CHECK(i.value() == 0u);
  CHECK(i.slot(32) == 0u);
}

TEST_CASE("strong ids compare and format as their value") {
  DomId a(1), b(2);
  CHECK(a < b);
  CHECK(a != b);
  CHECK(fmt::format("dom{}", a) == "dom1");
  CHECK(fmt::format("{}", Port(7)) == "7");
  static_assert(!std::is_convertible_v<DomId, Port>);
  static_assert(!std::is_convertible_v<uint16_t, DomId>);
}
