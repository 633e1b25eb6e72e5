#include <catch2/catch.hpp>

#include "src/error.h"

using namespace pvhost;

namespace {
Result<int> inner() { return fail(ENOENT, "reading ring-ref3"); }
Result<int> middle() { return PVHOST_TRY_CTX(inner(), "connect") + 1; }
Result<int> outer() {
  int v = PVHOST_TRY(with_context(middle(), "device 51712"));
  return v;
}
Result<int> ok_chain() { return PVHOST_TRY(Result<int>(41)) + 1; }
}  // namespace

TEST_CASE("error context is added per layer, outermost first") {
  auto r = outer();
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == ENOENT);
  CHECK(r.error().describe() == "device 51712: connect: reading ring-ref3: ENOENT");
}

TEST_CASE("PVHOST_TRY passes values through") {
  auto r = ok_chain();
  REQUIRE(r);
  CHECK(*r == 42);
}

TEST_CASE("errno names round-trip, as xenstore errors travel") {
  CHECK(errno_name(EAGAIN) == "EAGAIN");
  CHECK(errno_name(EACCES) == "EACCES");
  CHECK(errno_from_name("ENOSPC") == ENOSPC);
  CHECK(errno_from_name("E2BIG") == E2BIG);
  CHECK(errno_from_name("NOT-AN-ERRNO") == 0);
}

TEST_CASE("an error without a code has no errno suffix") {
  Error e(0, "plain");
  CHECK(e.describe() == "plain");
}
