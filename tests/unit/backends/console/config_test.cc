// Console configuration: output kinds, the guest-writable trust rule, chardev:ID, limit.
#include <catch2/catch.hpp>

#include <vector>

#include "backends/console/config.h"

using namespace pvhost;
using namespace pvhost::console;

TEST_CASE("output kinds parse from a trusted node") {
  CHECK(*parse_output("pty", Trusted::yes, nullptr) == OutputSpec{PtyOutput{}});
  CHECK(*parse_output("", Trusted::yes, nullptr) == OutputSpec{PtyOutput{}});
  CHECK(*parse_output("null", Trusted::yes, nullptr) == OutputSpec{NullOutput{}});
  CHECK(*parse_output("file:/tmp/c.log", Trusted::yes, nullptr) == OutputSpec{FileOutput{"/tmp/c.log"}});
  CHECK(*parse_output("log:/tmp/c.log", Trusted::yes, nullptr) == OutputSpec{LogOutput{"/tmp/c.log"}});
  CHECK(*parse_output("unix:/tmp/c.sock,server", Trusted::yes, nullptr) == OutputSpec{SocketOutput{"/tmp/c.sock"}});
  CHECK(*parse_output("unix:/tmp/c.sock", Trusted::yes, nullptr) == OutputSpec{SocketOutput{"/tmp/c.sock"}});
  CHECK_FALSE(parse_output("tcp:1.2.3.4:5", Trusted::yes, nullptr));
  CHECK_FALSE(parse_output("file:", Trusted::yes, nullptr));
  CHECK_FALSE(parse_output("unix:/a,b,server", Trusted::yes, nullptr));
}

TEST_CASE("a guest-writable output may only say pty or null") {
  CHECK(parse_output("pty", Trusted::no, nullptr));
  CHECK(parse_output("null", Trusted::no, nullptr));
  auto r = parse_output("file:/etc/passwd", Trusted::no, nullptr);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == EPERM);
  CHECK_FALSE(parse_output("unix:/tmp/x", Trusted::no, nullptr));
  CHECK_FALSE(parse_output("chardev:libxl-channel0", Trusted::no, nullptr));
}

TEST_CASE("chardev:ID resolves a -chardev from the command line") {
  std::vector<ChardevOptions> list(3);
  list[0].id = "libxl-channel0";
  list[0].backend = "pty";
  list[1].id = "sock";
  list[1].backend = "socket";
  list[1].path = "/run/c.sock";
  list[1].server = true;
  list[2].id = "client";
  list[2].backend = "socket";
  list[2].path = "/run/d.sock";
  std::span<const ChardevOptions> span(list);
  CHECK(*parse_output("chardev:libxl-channel0", Trusted::yes, &span) == OutputSpec{PtyOutput{}});
  CHECK(*parse_output("chardev:sock", Trusted::yes, &span) == OutputSpec{SocketOutput{"/run/c.sock"}});
  CHECK_FALSE(parse_output("chardev:client", Trusted::yes, &span));  // not a server
  auto missing = parse_output("chardev:nope", Trusted::yes, &span);
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code() == ENOENT);
  CHECK_FALSE(parse_output("chardev:libxl-channel0", Trusted::yes, nullptr));
}

TEST_CASE("limit: default, zero, clamp, garbage") {
  CHECK(*parse_limit(std::nullopt) == kDefaultLimit);
  CHECK(*parse_limit("0") == kDefaultLimit);
  CHECK(*parse_limit("4096") == 4096u);
  CHECK(*parse_limit("99999999999999") == kMaxLimit);
  CHECK_FALSE(parse_limit("12k"));
  CHECK_FALSE(parse_limit("-1"));
}
