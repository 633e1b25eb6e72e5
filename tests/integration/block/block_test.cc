// The qdisk backend end to end: pvhost-xenemu --strict, pvhost (-backends qdisk) and our
// blkfront as separate processes. Verified workloads with every feature on and each off;
// configuration errors; the hostile-frontend suite (pvhost answers or closes the device and
// never crashes); unplug with I/O in flight.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include "backends/block/blkif_abi.h"
#include "tests/integration/block/block_env.h"

using namespace pvhost;
using namespace pvhost::test;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kImageBytes = 64ull << 20;

struct Disk {
  BlockEnv env;
  std::string image;
  toolstack::DeviceAddress dev;
  explicit Disk(std::map<std::string, std::string> settings = {}) {
    image = env.make_image(kImageBytes);
    dev = env.add_disk(image, "xvda", std::move(settings));
    env.start_pvhost();
    if (!env.wait_for(dev.backend_path + "/state", "2")) throw std::runtime_error("no InitWait: " + env.logs());
  }
  nlohmann::json run(std::vector<std::string> args) {
    auto j = env.blkfront(dev.devid, args);
    INFO(j.dump());
    INFO(env.logs());
    CHECK(env.pvhost().running());
    return j;
  }
};

void check_verified(const nlohmann::json& j) {
  INFO(j.dump());
  CHECK(j.value("ok", false));
  CHECK(j.value("exit", -1) == 0);
  CHECK(j.value("errors", 1) == 0);
  CHECK(j.value("verify_failures", 1) == 0);
  CHECK(j.value("ops", 0) > 0);
  CHECK(j.value("closed", false));
  CHECK(j.value("close_end_access_failures", 1) == 0);
}

}  // namespace

TEST_CASE("qdisk advertises the blkif features next to libxl's keys", "[block][it]") {
  Disk d;
  auto be = [&](const std::string& k) { return d.env.read(d.dev.backend_path + "/" + k); };
  CHECK(be("feature-flush-cache") == "1");
  CHECK(be("feature-barrier") == "1");
  CHECK(be("feature-discard") == "1");
  CHECK(be("discard-granularity") == "512");
  CHECK(be("discard-alignment") == "0");
  CHECK(be("feature-persistent") == "1");
  CHECK(be("feature-max-indirect-segments") == "256");
  CHECK(be("max-ring-page-order") == "4");
  CHECK(be("multi-queue-max-queues") == std::to_string(std::max(1u, std::thread::hardware_concurrency())));
  CHECK(be("sectors") == std::to_string(kImageBytes / 512));
  CHECK(be("sector-size") == "512");
  CHECK(be("physical-sector-size") == "512");
  CHECK(be("info") == "0");
  CHECK(be("hotplug-status") == "connected");
}

TEST_CASE("verified workload with every feature on, then flush, barrier and discard", "[block][it]") {
  Disk d;
  auto j = d.run({"--rw", "verify", "--bs", "65536", "--qd", "16", "--queues", "2", "--span", "8388608",
                  "--ops", "400", "--extras", "--image", d.image});
  check_verified(j);
  CHECK(j.value("persistent", false));
  CHECK(j.value("indirect_segments", 0) == 256);
  CHECK(j.value("ring_order", 0) == 4);
  CHECK(j.value("image_mismatches", 1) == 0);
  auto x = j["extras"];
  CHECK(x.value("flush", -9) == 0);
  CHECK(x.value("barrier_empty", -9) == 0);
  CHECK(x.value("barrier_write", -9) == 0);
  CHECK(x.value("barrier_readback", -9) == 0);
  CHECK(x.value("barrier_data_ok", false));
  CHECK(x.value("discard", -9) == 0);
  CHECK(x.value("discard_zeroes", false));
}

TEST_CASE("verified workloads with each feature switched off", "[block][it]") {
  Disk d;
  const std::vector<std::string> base = {"--rw", "verify", "--qd", "8", "--span", "4194304", "--ops", "300",
                                         "--image", d.image};
  auto with = [&](std::vector<std::string> extra) {
    auto args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    return d.run(args);
  };
  SECTION("no persistent grants (batched grant copy)") {
    auto j = with({"--no-persistent", "--bs", "16384"});
    check_verified(j);
    CHECK_FALSE(j.value("persistent", true));
    CHECK(j.value("image_mismatches", 1) == 0);
  }
  SECTION("no indirect descriptors: large blocks split into 11-segment requests") {
    auto j = with({"--no-indirect", "--bs", "131072"});
    check_verified(j);
    CHECK(j.value("indirect_segments", 1) == 0);
  }
  SECTION("no multi-queue") {
    auto j = with({"--no-multi-queue", "--bs", "4096"});
    check_verified(j);
    CHECK(j.value("queues", 0) == 1);
  }
  SECTION("single-page ring (order 0, plain ring-ref)") {
    auto j = with({"--ring-order", "0", "--bs", "4096", "--qd", "32"});
    check_verified(j);
    CHECK(j.value("ring_size", 0) == 32);
  }
  SECTION("x86_32 ABI (108-byte requests)") {
    auto j = with({"--abi", "x86_32", "--bs", "65536"});
    check_verified(j);
    CHECK(j.value("abi", "") == "x86_32-abi");
  }
  SECTION("x86_64 ABI written explicitly") {
    auto j = with({"--abi", "x86_64", "--bs", "8192"});
    check_verified(j);
    CHECK(j.value("abi", "") == "x86_64-abi");
  }
  SECTION("everything off at once, 512-byte blocks") {
    auto j = with({"--no-persistent", "--no-indirect", "--no-multi-queue", "--ring-order", "0", "--bs", "512"});
    check_verified(j);
  }
  SECTION("1 MiB blocks through indirect descriptors, QD 4, reconnecting between runs") {
    auto j = with({"--bs", "1048576", "--qd", "4", "--span", "16777216", "--ops", "40"});
    check_verified(j);
    auto again = with({"--bs", "1048576", "--qd", "4", "--span", "16777216", "--ops", "40", "--no-persistent"});
    check_verified(again);
  }
}

TEST_CASE("random mixed workload at QD 128 over several queues", "[block][it]") {
  Disk d;
  auto j = d.run({"--rw", "randrw", "--bs", "4096", "--qd", "128", "--queues", "4", "--ops", "6000", "--span",
                  "16777216", "--image", d.image});
  check_verified(j);
  CHECK(j.value("image_mismatches", 1) == 0);
}

TEST_CASE("a read-only disk serves reads and answers writes with an error", "[block][it]") {
  Disk d(std::map<std::string, std::string>{{"mode", "r"}});
  CHECK(d.env.read(d.dev.backend_path + "/info") == "4");  // VDISK_READONLY
  CHECK(d.env.read(d.dev.backend_path + "/feature-discard") == "0");
  auto r = d.run({"--rw", "randread", "--bs", "4096", "--ops", "100"});
  CHECK(r.value("errors", 1) == 0);
  auto w = d.run({"--rw", "randwrite", "--bs", "4096", "--ops", "20", "--no-verify"});
  CHECK(w.value("errors", 0) == 20);
}

TEST_CASE("an unsupported format, a format that does not match the file, or a missing image closes the device with an error node", "[block][it]") {
  BlockEnv env;
  std::string img = env.make_image(1 << 20);
  auto q = env.add_disk(img, "xvdb", {{"format", "qcow2"}});
  auto m = env.add_disk("/nonexistent/disk.img", "xvdc");
  auto u = env.add_disk(img, "xvdd", {{"format", "vmdk"}});
  env.start_pvhost();
  CHECK(env.wait_for(q.backend_path + "/state", "5"));
  CHECK(env.read(q.backend_path + "/error").find("not a qcow2 image") != std::string::npos);
  CHECK(env.wait_for(u.backend_path + "/state", "5"));
  CHECK(env.read(u.backend_path + "/error").find("format 'vmdk' is not supported") != std::string::npos);
  CHECK(env.wait_for(m.backend_path + "/state", "5"));
  CHECK(env.read(m.backend_path + "/error").find("/nonexistent/disk.img") != std::string::npos);
  CHECK(env.pvhost().running());
}

TEST_CASE("hostile frontend: every invalid field is answered, the device keeps working", "[block][it][hostile]") {
  for (std::string abi : {"native", "x86_32"}) {
    Disk d;
    auto j = d.run({"--hostile", "fields", "--abi", abi});
    CHECK(j["unknown_op"] == BLKIF_RSP_EOPNOTSUPP);
    CHECK(j["reserved_op"] == BLKIF_RSP_EOPNOTSUPP);
    CHECK(j["nseg_0"] == BLKIF_RSP_ERROR);
    CHECK(j["nseg_12"] == BLKIF_RSP_ERROR);
    CHECK(j["first_gt_last"] == BLKIF_RSP_ERROR);
    CHECK(j["last_8"] == BLKIF_RSP_ERROR);
    CHECK(j["beyond_end"] == BLKIF_RSP_ERROR);
    CHECK(j["sector_overflow"] == BLKIF_RSP_ERROR);
    CHECK(j["indirect_bad_op"] == BLKIF_RSP_ERROR);
    CHECK(j["good_read_after"] == BLKIF_RSP_OKAY);
    CHECK(j["backend_state_end"] == "4");
  }
}

TEST_CASE("hostile frontend: grants not granted, read-only, or for another domain", "[block][it][hostile]") {
  for (bool persistent : {true, false}) {
    Disk d;
    std::vector<std::string> args = {"--hostile", "grants"};
    if (!persistent) args.push_back("--no-persistent");
    auto j = d.run(args);
    CHECK(j["ungranted"] == BLKIF_RSP_ERROR);
    CHECK(j["read_into_readonly"] == BLKIF_RSP_ERROR);
    CHECK(j["wrong_domid"] == BLKIF_RSP_ERROR);
    CHECK(j["good_read_after"] == BLKIF_RSP_OKAY);
    CHECK(j["backend_state_end"] == "4");
  }
}

TEST_CASE("hostile frontend: indirect segment counts, pages and descriptors", "[block][it][hostile]") {
  Disk d;
  auto j = d.run({"--hostile", "indirect"});
  CHECK(j["nseg_0"] == BLKIF_RSP_ERROR);
  CHECK(j["nseg_257"] == BLKIF_RSP_ERROR);
  CHECK(j["ungranted_page"] == BLKIF_RSP_ERROR);
  CHECK(j["bad_descriptor"] == BLKIF_RSP_ERROR);
  CHECK(j["good_read_after"] == BLKIF_RSP_OKAY);
}

TEST_CASE("hostile frontend: a flood of good and bad requests is all answered", "[block][it][hostile]") {
  Disk d;
  auto j = d.run({"--hostile", "flood", "--ring-order", "0", "--qd", "32"});
  CHECK(j.value("sent", 0) > 0);
  CHECK(j.value("sent", 0) == j.value("answered", 1));
  CHECK(j.value("status_0", 0) > 0);
  CHECK(j.value("status_-1", 0) > 0);
  CHECK(j.value("status_-2", 0) > 0);
  CHECK(j["backend_state_end"] == "4");
}

TEST_CASE("hostile frontend: a producer index more than a ring ahead closes the device", "[block][it][hostile]") {
  Disk d;
  auto j = d.run({"--hostile", "ring-overflow"});
  CHECK(j.value("backend_closed", false));
  CHECK(j.value("error", "").find("more than a ring") != std::string::npos);
  CHECK(d.env.pvhost().running());
  // The device recovers when the frontend reconnects.
  auto again = d.run({"--rw", "verify", "--bs", "4096", "--ops", "64", "--span", "1048576"});
  check_verified(again);
}

TEST_CASE("hostile frontend: requests after Closed are never answered", "[block][it][hostile]") {
  Disk d;
  auto j = d.run({"--hostile", "after-closing"});
  CHECK(j.value("responses_after_closed", 99) == 0);
  CHECK(j.value("backend_state", "") == "6");
  CHECK(d.env.pvhost().running());
}

TEST_CASE("unplug with I/O in flight drains and the process lives on", "[block][it]") {
  Disk d;
  std::vector<std::string> args = {"--rw", "randrw", "--bs", "65536", "--qd", "32", "--seconds", "30", "--no-verify"};
  SECTION("the frontend finishes its requests, then closes (blkfront)") {}
  SECTION("the frontend writes Closed with requests in flight (a dying guest)") { args.push_back("--abandon"); }
  Process fe = d.env.start_blkfront(d.dev.devid, args);
  REQUIRE(poll_until([&] { return d.env.read(d.dev.frontend_path + "/state") == "4"; }));
  std::this_thread::sleep_for(300ms);
  auto del = toolstack::device_del(d.env.xs(), d.dev, 10s);
  INFO(d.env.logs());
  CHECK(del);
  CHECK(fe.wait(15s).has_value());
  CHECK(d.env.pvhost().running());
  CHECK(d.env.read(d.dev.backend_path + "/state").empty());
}
