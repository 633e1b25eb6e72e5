// JsonFramer and the QEMU-style writer as pure functions over buffers.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "qmp/json_framer.h"
#include "qmp/json_writer.h"

using pvhost::qmp::FramerLimits;
using pvhost::qmp::JsonFramer;

namespace {
struct Collected {
  std::vector<std::string> messages;
  std::vector<std::string> errors;
  std::vector<char> order;  // 'm' / 'e'
};
Collected feed(JsonFramer& f, std::string_view bytes) {
  Collected c;
  f.feed(bytes, [&](const JsonFramer::Frame& fr) {
    if (!fr.error.empty()) {
      c.errors.emplace_back(fr.error);
      c.order.push_back('e');
    } else {
      c.messages.emplace_back(fr.message);
      c.order.push_back('m');
    }
  });
  return c;
}
}  // namespace

TEST_CASE("framer: back-to-back values without separators are split") {
  JsonFramer f;
  auto c = feed(f, R"({"a": "}{"}[1,[2]]"s" 12 true{"b":{}} 7)");
  CHECK(c.messages == std::vector<std::string>{R"({"a": "}{"})", "[1,[2]]", "\"s\"", "12", "true", R"({"b":{}})"});
  CHECK(f.in_message());  // a scalar ends only at a delimiter
  auto d = feed(f, "\n");
  CHECK(d.messages == std::vector<std::string>{"7"});
  CHECK(!f.in_message());
}

TEST_CASE("framer: escaped quotes and backslashes inside strings do not end them") {
  JsonFramer f;
  auto c = feed(f, R"({"a": "x\"}\\"})");
  CHECK(c.messages == std::vector<std::string>{R"({"a": "x\"}\\"})"});
}

TEST_CASE("framer: every split point gives the same messages") {
  const std::string stream = R"({"execute": "x", "id": "a\"b{"} [ {"k": [1, 2]} ] "str" 42 )";
  JsonFramer whole;
  auto ref = feed(whole, stream);
  for (size_t cut = 0; cut <= stream.size(); ++cut) {
    JsonFramer f;
    auto a = feed(f, stream.substr(0, cut));
    auto b = feed(f, stream.substr(cut));
    a.messages.insert(a.messages.end(), b.messages.begin(), b.messages.end());
    CHECK(a.messages == ref.messages);
  }
}

TEST_CASE("framer: errors resynchronise at the next structural or control character") {
  JsonFramer f;
  auto c = feed(f, "@junk junk\n{\"a\":1}");
  CHECK(c.order == std::vector<char>{'e', 'm'});
  CHECK(c.errors[0] == "JSON parse error, stray '@'");
  auto d = feed(f, "{\"a\": \"x\ny\"} {\"b\":2}");
  CHECK(d.order == std::vector<char>{'e', 'e', 'm'});  // control char in string; then stray '}'
  CHECK(d.messages == std::vector<std::string>{"{\"b\":2}"});
  auto e = feed(f, "[}{\"c\":3}");
  CHECK(e.order == std::vector<char>{'e', 'm'});
}

TEST_CASE("framer: 0xFF resets even inside a string") {
  JsonFramer f;
  auto c = feed(f, "{\"a\": \"abc\xff{\"b\": 1}");
  CHECK(c.order == std::vector<char>{'e', 'm'});
  CHECK(c.messages[0] == "{\"b\": 1}");
}

TEST_CASE("framer: size and depth bounds give one error and skip the rest of the value") {
  JsonFramer f(FramerLimits{64, 4});
  auto c = feed(f, "{\"a\": \"" + std::string(200, 'x') + "\"} {\"ok\":1} [[[[[[1]]]]]] [[1]]");
  CHECK(c.order == std::vector<char>{'e', 'm', 'e', 'm'});
  CHECK(c.errors[0] == "JSON message size limit exceeded (64 bytes)");
  CHECK(c.errors[1] == "JSON nesting depth limit exceeded");
  CHECK(c.messages == std::vector<std::string>{"{\"ok\":1}", "[[1]]"});
}

TEST_CASE("writer: QEMU's spacing and ASCII-only strings") {
  using pvhost::qmp::to_json;
  CHECK(to_json(nlohmann::json::parse(R"({"a": [1, true, null], "b": {}})")) == R"({"a": [1, true, null], "b": {}})");
  CHECK(to_json(nlohmann::json("é\u2028😀\x01\r\n\"\\")) == R"("\u00E9\u2028\uD83D\uDE00\u0001\r\n\"\\")");
  CHECK(to_json(nlohmann::json(std::string("bad\xff"))) == R"("bad\uFFFD")");
}
