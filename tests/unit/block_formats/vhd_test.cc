// VHD driver tests; qemu-img's vpc driver is the oracle for fixed and dynamic disks
// (QEMU cannot create or follow differencing disks, so those are checked against our
// own model and the on-disk structures).
#include <cstring>
#include <random>

#include "src/block/vhd/vhd_format.h"
#include "src/block/vhd/vhd_image.h"
#include "tests/unit/block_formats/test_util.h"

namespace pvhost::block::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;

uint64_t qemu_virtual_size(const std::string& fmt, const std::string& path) {
  const RunResult r = run("qemu-img info --output=json -f " + fmt + " " + path);
  REQUIRE(r.status == 0);
  return nlohmann::json::parse(r.output)["virtual-size"].get<uint64_t>();
}

void random_io(Image& img, std::vector<std::byte>& model, uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const uint64_t len = 1 + rng() % (300 * 1024);
    const uint64_t off = rng() % model.size();
    const uint64_t l = std::min(len, model.size() - off);
    auto data = pattern(l, rng());
    auto r = img.write_at(off, data);
    INFO((r ? "" : r.error().describe()));
    REQUIRE(r);
    std::memcpy(model.data() + off, data.data(), l);
  }
}

TEST_CASE("vhd: fixed and dynamic images made by qemu-img read as qemu-img converts them", "[vhd]") {
  TempDir d;
  const auto raw = pattern(9 * kMiB, 31, 1 << 20);
  write_file(d.file("src.raw"), raw);
  for (const char* sub : {"dynamic", "fixed"}) {
    SECTION(sub) {
      run_ok(std::string("qemu-img convert -f raw -O vpc -o subformat=") + sub + " " + d.file("src.raw") + " " + d.file("a.vhd"));
      const auto expected = qemu_img_raw("vpc", d.file("a.vhd"), d.file("out.raw"));
      auto img = must_open("", d.file("a.vhd"), ReadOnly::yes);
      CHECK(img->info().size_bytes == qemu_virtual_size("vpc", d.file("a.vhd")));
      CHECK(read_all(*img) == expected);
      CHECK(image_info_json(*img)["format"] == "vpc");
    }
  }
}

TEST_CASE("vhd: writes read back and qemu-img compare agrees", "[vhd]") {
  TempDir d;
  for (const char* sub : {"dynamic", "fixed"}) {
    SECTION(sub) {
      run_ok(std::string("qemu-img create -q -f vpc -o subformat=") + sub + " " + d.file("w.vhd") + " 20M");
      std::vector<std::byte> model;
      {
        auto img = must_open("vpc", d.file("w.vhd"));
        model.assign(img->info().size_bytes, std::byte{0});
        random_io(*img, model, 3, 40);
        REQUIRE(img->flush_all());
        CHECK(read_all(*img) == model);
      }
      write_file(d.file("expected.raw"), model);
      run_ok("qemu-img compare -f vpc -F raw " + d.file("w.vhd") + " " + d.file("expected.raw"));
      // The footer at the end and its copy at the start agree and check out.
      const auto bytes = read_file(d.file("w.vhd"));
      auto tail = vhd::parse_footer(std::span(bytes).last(512));
      REQUIRE(tail);
      if (std::string(sub) == "dynamic") {
        auto head = vhd::parse_footer(std::span(bytes).first(512));
        REQUIRE(head);
        CHECK(std::memcmp(bytes.data(), bytes.data() + bytes.size() - 512, 512) == 0);
      }
      auto img = must_open("vpc", d.file("w.vhd"));
      CHECK(read_all(*img) == model);
    }
  }
}

TEST_CASE("vhd: differencing disks read the parent where their bitmap says so", "[vhd]") {
  TempDir d;
  const auto base = pattern(10 * kMiB, 8);
  write_file(d.file("base.raw"), base);
  run_ok("qemu-img convert -f raw -O vpc " + d.file("base.raw") + " " + d.file("parent.vhd"));
  const auto parent_content = qemu_img_raw("vpc", d.file("parent.vhd"), d.file("p.raw"));
  auto r = create_vhd_differencing(d.file("child.vhd"), d.file("parent.vhd"));
  INFO((r ? "" : r.error().describe()));
  REQUIRE(r);
  std::vector<std::byte> model = parent_content;
  {
    auto img = must_open("", d.file("child.vhd"));
    REQUIRE(img->backing() != nullptr);
    CHECK(img->info().size_bytes == parent_content.size());
    CHECK(read_all(*img) == parent_content);
    random_io(*img, model, 12, 30);
    CHECK(read_all(*img) == model);
    const auto j = image_info_json(*img);
    CHECK(j["backing-image"]["format"] == "vpc");
  }
  {
    auto img = must_open("vpc", d.file("child.vhd"));
    CHECK(read_all(*img) == model);
  }
  // The parent is untouched.
  CHECK(qemu_img_raw("vpc", d.file("parent.vhd"), d.file("p2.raw")) == parent_content);
  // Through the relative locator after moving both files together.
  run_ok("mkdir " + d.file("moved") + " && mv " + d.file("child.vhd") + " " + d.file("parent.vhd") + " " + d.file("moved/"));
  {
    auto img = must_open("vpc", d.file("moved/child.vhd"), ReadOnly::yes);
    CHECK(read_all(*img) == model);
  }
  // A replaced parent (another unique id) is refused.
  run_ok("qemu-img convert -f raw -O vpc " + d.file("base.raw") + " " + d.file("moved/parent.vhd"));
  const std::string err = open_error("vpc", d.file("moved/child.vhd"), ReadOnly::yes);
  INFO(err);
  CHECK(err.find("unique id") != std::string::npos);
}

TEST_CASE("vhd: parent locators are UTF-16LE W2ku/W2ru paths", "[vhd]") {
  TempDir d;
  run_ok("qemu-img create -q -f vpc " + d.file("pärent.vhd") + " 4M");
  REQUIRE(create_vhd_differencing(d.file("c.vhd"), d.file("pärent.vhd")));
  const auto bytes = read_file(d.file("c.vhd"));
  auto h = vhd::parse_dynamic_header(std::span(bytes).subspan(512, 1024), bytes.size(), 4 * kMiB);
  REQUIRE(h);
  CHECK(h->parent_name == "pärent.vhd");
  bool ku = false, ru = false;
  for (const auto& l : h->locators) {
    if (l.platform_code == 0) continue;
    const std::string p = vhd::utf16_to_utf8(std::span(bytes).subspan(l.data_offset, l.data_length), false);
    if (l.platform_code == vhd::kPlatformW2ru) {
      ru = true;
      CHECK(p == ".\\pärent.vhd");
    }
    if (l.platform_code == vhd::kPlatformW2ku) {
      ku = true;
      CHECK(p.ends_with("\\pärent.vhd"));
    }
  }
  CHECK(ku);
  CHECK(ru);
}

TEST_CASE("vhd: hostile footers, headers and BATs give clear errors", "[vhd][hostile]") {
  TempDir d;
  run_ok("qemu-img create -q -f vpc " + d.file("good.vhd") + " 8M");
  const auto good = read_file(d.file("good.vhd"));
  const uint64_t end = good.size() - 512;
  auto refooter = [](std::vector<std::byte>& b, uint64_t at) {
    store_be32(b.data() + at + 64, vhd::checksum(std::span(b).subspan(at, 512), 64));
  };
  auto reheader = [](std::vector<std::byte>& b) {
    store_be32(b.data() + 512 + 36, vhd::checksum(std::span(b).subspan(512, 1024), 36));
  };
  struct Case {
    const char* name;
    std::function<void(std::vector<std::byte>&)> corrupt;
    const char* expect;
  };
  const std::vector<Case> cases = {
      {"bad checksum (both copies)", [&](auto& b) { b[end + 100] = std::byte{1}; b[100] = std::byte{1}; }, "checksum"},
      {"disk type 7", [&](auto& b) { store_be32(b.data() + end + 60, 7); refooter(b, end); store_be32(b.data() + 60, 7); refooter(b, 0); }, "disk type"},
      {"huge size", [&](auto& b) { for (uint64_t at : {uint64_t{0}, end}) { std::memcpy(b.data() + at + 28, "win ", 4); store_be64(b.data() + at + 48, 1ULL << 60); refooter(b, at); } }, "2040"},
      {"header offset past the end", [&](auto& b) { for (uint64_t at : {uint64_t{0}, end}) { store_be64(b.data() + at + 16, 1ULL << 40); refooter(b, at); } }, "outside the file"},
      {"bad header cookie", [&](auto& b) { b[512] = std::byte{'x'}; }, "cxsparse"},
      {"block size 3", [&](auto& b) { store_be32(b.data() + 512 + 32, 3); reheader(b); }, "block size"},
      {"BAT past the end", [&](auto& b) { store_be64(b.data() + 512 + 16, 1ULL << 40); reheader(b); }, "past the end"},
      {"BAT too small", [&](auto& b) { store_be32(b.data() + 512 + 28, 1); reheader(b); }, "too small"},
      {"huge BAT", [&](auto& b) { store_be32(b.data() + 512 + 28, 0xfffffff0); reheader(b); }, "past the end"},
      {"BAT entry past the end", [&](auto& b) { store_be32(b.data() + 1536, 0x7fffff00); }, "past the end"},
      {"BAT entry on the headers", [&](auto& b) { store_be32(b.data() + 1536, 1); }, "overlaps"},
      {"truncated", [&](auto& b) { b.resize(300); }, "too short"},
  };
  for (const auto& c : cases) {
    SECTION(c.name) {
      auto b = good;
      c.corrupt(b);
      write_file(d.file("bad.vhd"), b);
      const std::string err = open_error("vpc", d.file("bad.vhd"));
      INFO(c.name << ": " << err);
      REQUIRE(!err.empty());
      CHECK(err.find(c.expect) != std::string::npos);
    }
  }
  SECTION("differencing disk whose parent is itself") {
    REQUIRE(create_vhd_differencing(d.file("self.vhd"), d.file("good.vhd")));
    // Point the child's parent id at its own id and its locators at itself.
    auto b = read_file(d.file("self.vhd"));
    std::memcpy(b.data() + 512 + 40, b.data() + 68, 16);
    reheader(b);
    write_file(d.file("self.vhd"), b);
    run_ok("mv " + d.file("good.vhd") + " " + d.file("gone.vhd") + " && ln -s self.vhd " + d.file("good.vhd"));
    const std::string err = open_error("vpc", d.file("self.vhd"), ReadOnly::yes);
    INFO(err);
    CHECK(err.find("loops") != std::string::npos);
  }
}

TEST_CASE("vhd: allocation() follows the BAT and, for differencing disks, the sector bitmap", "[vhd]") {
  TempDir d;
  run_ok("qemu-img create -q -f vpc -o subformat=dynamic " + d.file("parent.vhd") + " 8M");
  REQUIRE(create_vhd_differencing(d.file("child.vhd"), d.file("parent.vhd")));
  auto img = must_open("vpc", d.file("child.vhd"));
  const uint64_t size = img->info().size_bytes;
  auto all = img->allocation(0, size);
  REQUIRE(all);
  CHECK((!all->allocated && all->bytes == size));
  const auto data = pattern(1536, 4);
  REQUIRE(img->write_at(2 * 512, data));  // sectors 2, 3, 4
  auto a = img->allocation(0, size);
  REQUIRE(a);
  CHECK((!a->allocated && a->bytes == 1024));
  a = img->allocation(1024, size - 1024);
  REQUIRE(a);
  CHECK((a->allocated && a->bytes == 1536));
  a = img->allocation(2560, size - 2560);
  REQUIRE(a);
  CHECK((!a->allocated && a->bytes == size - 2560));
  // A dynamic disk owns whole allocated blocks; unallocated ones read as zeroes.
  auto parent = must_open("vpc", d.file("parent.vhd"));
  a = parent->allocation(0, size);
  REQUIRE(a);
  CHECK(!a->allocated);
  REQUIRE(parent->write_at(0, data));
  a = parent->allocation(0, size);
  REQUIRE(a);
  CHECK(a->allocated);
  CHECK(a->bytes < size);
}

}  // namespace
}  // namespace pvhost::block::test
