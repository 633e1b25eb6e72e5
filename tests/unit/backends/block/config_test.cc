// The qdisk configuration parsers (backends/block/config.h): backend keys as libxl writes
// them, bad values rejected naming the key, and the frontend's ring keys.
#include <catch2/catch.hpp>

#include <map>

#include "backends/block/config.h"

using namespace pvhost;
using namespace pvhost::blkif;

namespace {
std::map<std::string, std::string> libxl_keys() {
  // reference/libxl-4.17-pv/xenstore-1-running.txt, the qdisk device.
  return {{"frontend", "/local/domain/1/device/vbd/51744"}, {"params", "aio:/scratch/q1.img"},
          {"frontend-id", "1"}, {"online", "1"}, {"removable", "0"}, {"bootable", "1"}, {"state", "1"},
          {"dev", "xvdc"}, {"type", "qdisk"}, {"mode", "w"}, {"device-type", "disk"}, {"discard-enable", "1"},
          {"specification", "xen"}};
}
FrontendConfig::Reader reader(std::map<std::string, std::string> m) {
  return [m = std::move(m)](std::string_view k) -> Result<std::optional<std::string>> {
    auto it = m.find(std::string(k));
    if (it == m.end()) return std::optional<std::string>();
    return std::optional<std::string>(it->second);
  };
}
}  // namespace

TEST_CASE("libxl's qdisk keys parse: aio: means raw", "[blkif][config]") {
  auto c = BlockConfig::parse(libxl_keys());
  REQUIRE(c);
  CHECK(c->format == block::Format::raw);
  CHECK(c->path == "/scratch/q1.img");
  CHECK(c->read_only == block::ReadOnly::no);
  CHECK(c->device_type == DeviceType::disk);
  CHECK(c->dev == "xvdc");
  CHECK(c->bootable);
  CHECK_FALSE(c->removable);
  CHECK(c->discard_enable);
  CHECK(c->node_name("51744") == "xvdc-raw");
}

TEST_CASE("params: raw:, no prefix, colons in paths", "[blkif][config]") {
  CHECK(parse_params("raw:/a/b")->path == "/a/b");
  CHECK(parse_params("/a/b")->path == "/a/b");
  CHECK(parse_params("/a:b/c")->path == "/a:b/c");
  CHECK_FALSE(parse_params(""));
  CHECK_FALSE(parse_params("raw:"));
}

TEST_CASE("params formats map as libxl writes them; unknown ones are refused with a clear message", "[blkif][config]") {
  CHECK(parse_params("qcow2:/x.qcow2")->format == pvhost::block::Format::qcow2);
  CHECK(parse_params("vhd:/x.vhd")->format == pvhost::block::Format::vpc);
  CHECK(parse_params("nbd:unix:/run/n.sock:exportname=d")->path == "nbd:unix:/run/n.sock:exportname=d");
  CHECK(parse_params("nbd://127.0.0.1:10809/d")->path == "nbd://127.0.0.1:10809/d");
  auto p = parse_params("vmdk:/x.vmdk");
  REQUIRE_FALSE(p);
  CHECK(p.error().what().find("format 'vmdk' is not supported (raw, qcow2, vhd, nbd)") != std::string::npos);
}

TEST_CASE("bad backend values are rejected naming the key", "[blkif][config]") {
  auto bad = [](std::string key, std::string value) {
    auto k = libxl_keys();
    k[key] = value;
    auto c = BlockConfig::parse(k);
    REQUIRE_FALSE(c);
    CHECK(c.error().what().find(key) != std::string::npos);
  };
  bad("mode", "x");
  bad("device-type", "floppy");
  bad("removable", "yes");
  bad("bootable", "2");
  bad("discard-enable", "");
  bad("direct-io-safe", "true");
  auto k = libxl_keys();
  k.erase("params");
  CHECK_FALSE(BlockConfig::parse(k));
  k = libxl_keys();
  k["mode"] = "r";
  k["device-type"] = "cdrom";
  auto c = BlockConfig::parse(k);
  REQUIRE(c);
  CHECK(c->read_only == block::ReadOnly::yes);
  CHECK(c->device_type == DeviceType::cdrom);
}

TEST_CASE("frontend: single ring, order 0 with plain ring-ref", "[blkif][config]") {
  auto f = FrontendConfig::parse(reader({{"ring-ref", "8"}, {"event-channel", "5"}, {"protocol", "x86_32-abi"}}), 2);
  REQUIRE(f);
  CHECK(f->abi == Abi::x86_32);
  REQUIRE(f->queues.size() == 1);
  CHECK(f->queues[0].ring_refs == std::vector<GrantRef>{GrantRef(8)});
  CHECK(f->queues[0].event_channel == Port(5));
  CHECK_FALSE(f->persistent);
}

TEST_CASE("frontend: multi-queue with ring-page-order under queue-N/", "[blkif][config]") {
  auto f = FrontendConfig::parse(reader({{"multi-queue-num-queues", "2"}, {"ring-page-order", "1"},
                                         {"queue-0/ring-ref0", "10"}, {"queue-0/ring-ref1", "11"},
                                         {"queue-0/event-channel", "3"}, {"queue-1/ring-ref0", "12"},
                                         {"queue-1/ring-ref1", "13"}, {"queue-1/event-channel", "4"},
                                         {"feature-persistent", "1"}}),
                                 2);
  REQUIRE(f);
  CHECK(f->persistent);
  CHECK(f->ring_page_order == 1);
  REQUIRE(f->queues.size() == 2);
  CHECK(f->queues[1].ring_refs == std::vector<GrantRef>{GrantRef(12), GrantRef(13)});
  CHECK(f->queues[1].event_channel == Port(4));
}

TEST_CASE("frontend: bad ring keys fail the connect with the key named", "[blkif][config]") {
  auto err = [](std::map<std::string, std::string> m, std::string what) {
    auto f = FrontendConfig::parse(reader(std::move(m)), 2);
    REQUIRE_FALSE(f);
    CHECK(f.error().what().find(what) != std::string::npos);
  };
  err({{"event-channel", "5"}}, "ring-ref");
  err({{"ring-ref", "x"}, {"event-channel", "5"}}, "ring-ref");
  err({{"ring-ref", "1"}}, "event-channel");
  err({{"ring-ref0", "1"}, {"event-channel", "5"}, {"ring-page-order", "5"}}, "ring-page-order");
  err({{"ring-ref", "1"}, {"event-channel", "5"}, {"multi-queue-num-queues", "3"}}, "multi-queue-num-queues");
  err({{"ring-ref", "1"}, {"event-channel", "5"}, {"multi-queue-num-queues", "0"}}, "multi-queue-num-queues");
  err({{"ring-ref", "1"}, {"event-channel", "5"}, {"protocol", "arm-abi"}}, "protocol");
  err({{"ring-ref", "99999999999"}, {"event-channel", "5"}}, "ring-ref");
  err({{"ring-page-order", "2"}, {"ring-ref0", "1"}, {"ring-ref1", "1"}, {"event-channel", "5"}}, "ring-ref2");
}
