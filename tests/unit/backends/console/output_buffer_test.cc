// The host-side output buffer: `limit` and QEMU/xenconsoled's drop-middle rule.
#include <catch2/catch.hpp>

#include <string>

#include "backends/console/output_buffer.h"

using namespace pvhost::console;

namespace {
std::span<const std::byte> bytes(const std::string& s) { return std::as_bytes(std::span(s)); }
std::string text(std::span<const std::byte> b) { return {reinterpret_cast<const char*>(b.data()), b.size()}; }
}  // namespace

TEST_CASE("under the limit nothing is dropped and order is kept") {
  OutputBuffer b(16);
  b.append(bytes("hello "));
  b.append(bytes("world"));
  CHECK(text(b.front()) == "hello world");
  CHECK(b.dropped() == 0);
  b.consume(6);
  CHECK(text(b.front()) == "world");
  b.consume(5);
  CHECK(b.empty());
}

TEST_CASE("past the limit the middle goes: oldest limit-over bytes and newest over bytes stay") {
  // QEMU: over = size - max; memmove(data + max - over, data + max, over).
  OutputBuffer b(10);
  b.append(bytes("0123456789"));  // exactly the limit
  CHECK(b.dropped() == 0);
  b.append(bytes("abc"));  // over = 3: drop "789", keep "0123456" + "abc"
  CHECK(text(b.front()) == "0123456abc");
  CHECK(b.size() == 10);
  CHECK(b.dropped() == 3);
}

TEST_CASE("the limit counts unsent bytes only") {
  OutputBuffer b(8);
  b.append(bytes("ABCDEFGH"));
  b.consume(5);                 // "FGH" unsent
  b.append(bytes("12345"));     // 8 unsent: at the limit, nothing dropped
  CHECK(text(b.front()) == "FGH12345");
  CHECK(b.dropped() == 0);
  b.append(bytes("xy"));        // over = 2: drop "45"
  CHECK(text(b.front()) == "FGH123xy");
  CHECK(b.dropped() == 2);
}

TEST_CASE("an append of more than the limit keeps only the newest limit bytes") {
  OutputBuffer b(4);
  b.append(bytes("ab"));
  b.append(bytes("0123456789"));  // 12 unsent, over = 8 >= limit
  CHECK(text(b.front()) == "6789");
  CHECK(b.dropped() == 8);
}

TEST_CASE("a burst far beyond the limit keeps size bounded and counts every dropped byte") {
  OutputBuffer b(1000);
  std::string chunk(2048, 'x');
  for (int i = 0; i < 100; ++i) b.append(bytes(chunk));
  CHECK(b.size() == 1000);
  CHECK(b.dropped() == 100u * 2048u - 1000u);
}

TEST_CASE("lowering the limit applies the rule at once") {
  OutputBuffer b(100);
  b.append(bytes("0123456789"));
  b.set_limit(6);  // over = 4: drop "2345"
  CHECK(text(b.front()) == "016789");
  CHECK(b.dropped() == 4);
}
