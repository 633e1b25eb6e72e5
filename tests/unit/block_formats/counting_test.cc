// Per-layer I/O accounting (src/block/counting_image.h): each layer of a chain opened by
// open_any counts what was read from and written to it, so query-blockstats can report
// the backing nodes (issue #7).
#include "src/block/counting_image.h"

#include <sys/stat.h>

#include <algorithm>

#include <catch2/catch.hpp>

#include "src/block/vhd/vhd_image.h"
#include "tests/unit/block_formats/test_util.h"

namespace pvhost::block::test {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;

std::unique_ptr<Image> open_rw(const std::string& format, const std::string& path) {
  OpenOptions o;
  o.path = path;
  o.read_only = ReadOnly::no;
  auto img = open_any(format, o);
  INFO((img ? "" : img.error().describe()));
  REQUIRE(img);
  return std::move(*img);
}

NodeIoStats stats_of(const Image* layer) {
  const CountingImage* c = as_counting(layer);
  REQUIRE(c != nullptr);
  return c->counters()->snapshot();
}

}  // namespace

TEST_CASE("counting: every layer open_any opens counts its own reads and writes", "[counting]") {
  TempDir d;
  write_file(d.file("base.raw"), pattern(2 * kMiB, 7));
  run_ok("qemu-img convert -f raw -O qcow2 " + d.file("base.raw") + " " + d.file("base.qcow2"));
  run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + d.file("top.qcow2"));
  auto top = open_rw("qcow2", d.file("top.qcow2"));
  REQUIRE(as_counting(top.get()) != nullptr);
  REQUIRE(top->backing() != nullptr);
  REQUIRE(as_counting(top->backing()) != nullptr);
  // The concrete driver is still reachable under the wrapper.
  CHECK(unwrap_counting(top.get()) != top.get());
  CHECK(as_counting(unwrap_counting(top.get())) == nullptr);

  // A read of data only the base holds falls through to it.
  std::vector<std::byte> buf(8192);
  REQUIRE(top->read_at(65536, buf));
  auto t = stats_of(top.get());
  auto b = stats_of(top->backing());
  CHECK(t.of(IoClass::rd).operations == 1);
  CHECK(t.of(IoClass::rd).bytes == 8192);
  CHECK(b.of(IoClass::rd).operations >= 1);
  CHECK(b.of(IoClass::rd).bytes >= 8192);
  CHECK(b.of(IoClass::wr).operations == 0);

  // A write lands in the top (its partial cluster is copied up from the base: a read there).
  const uint64_t base_reads = b.of(IoClass::rd).operations;
  REQUIRE(top->write_at(3 * 65536 + 512, std::span<const std::byte>(buf).first(4096)));
  REQUIRE(top->flush_all());
  REQUIRE(top->discard_at(kMiB, 65536));
  t = stats_of(top.get());
  b = stats_of(top->backing());
  CHECK(t.of(IoClass::wr).operations == 1);
  CHECK(t.of(IoClass::wr).bytes == 4096);
  CHECK(t.wr_highest_offset == 3 * 65536 + 512 + 4096);
  CHECK(t.of(IoClass::flush).operations == 1);
  CHECK(t.of(IoClass::unmap).operations == 1);
  CHECK(t.of(IoClass::unmap).bytes == 65536);
  CHECK(b.of(IoClass::rd).operations > base_reads);
  CHECK(b.of(IoClass::wr).operations == 0);
  CHECK(b.wr_highest_offset == 0);

  // Reading the written range again is served by the top alone.
  const uint64_t base_reads2 = b.of(IoClass::rd).operations;
  REQUIRE(top->read_at(3 * 65536, std::span<std::byte>(buf).first(4096)));
  CHECK(stats_of(top->backing()).of(IoClass::rd).operations == base_reads2);
  // A failed operation counts only as failed.
  CHECK_FALSE(top->read_at(2 * kMiB, buf));
  CHECK(stats_of(top.get()).of(IoClass::rd).operations == 2);
  CHECK(stats_of(top.get()).of(IoClass::rd).failed == 1);
}

TEST_CASE("counting: a differencing VHD's parent counts the reads that fall through to it",
          "[counting]") {
  TempDir d;
  run_ok("qemu-img create -q -f vpc -o subformat=dynamic " + d.file("parent.vhd") + " 4M");
  run_ok("qemu-io -f vpc -c 'write -P 0x5a 0 65536' " + d.file("parent.vhd") + " >/dev/null");
  REQUIRE(create_vhd_differencing(d.file("child.vhd"), d.file("parent.vhd")));
  auto child = open_rw("vpc", d.file("child.vhd"));
  REQUIRE(child->backing() != nullptr);
  std::vector<std::byte> buf(4096);
  REQUIRE(child->read_at(0, buf));
  CHECK(buf[0] == std::byte{0x5a});
  CHECK(stats_of(child->backing()).of(IoClass::rd).operations >= 1);
}

TEST_CASE("counting: counters shared with a new handle on the same file continue", "[counting]") {
  TempDir d;
  run_ok("qemu-img create -q -f qcow2 " + d.file("a.qcow2") + " 1M");
  auto first = open_rw("qcow2", d.file("a.qcow2"));
  std::vector<std::byte> buf(512);
  REQUIRE(first->write_at(0, buf));
  auto counters = as_counting(first.get())->counters();
  first.reset();  // the file is closed; the node's counters live on
  auto again = open_rw("qcow2", d.file("a.qcow2"));
  as_counting(again.get())->share_counters(counters);
  REQUIRE(again->write_at(512, buf));
  CHECK(counters->snapshot().of(IoClass::wr).operations == 2);
  CHECK(counters->snapshot().wr_highest_offset == 1024);
  // count_io does not wrap twice.
  Image* raw = again.get();
  CHECK(count_io(std::move(again)).get() == raw);
}

TEST_CASE("counting: the file under a layer counts what the driver did to it, metadata included",
          "[counting]") {
  TempDir d;
  run_ok("qemu-img create -q -f qcow2 -o cluster_size=65536 " + d.file("a.qcow2") + " 4M");
  auto img = open_rw("qcow2", d.file("a.qcow2"));
  const ImageFile* file = img->file();
  REQUIRE(file != nullptr);
  CHECK(file == unwrap_counting(img.get())->file());  // the wrapper forwards it
  const NodeIoStats opened = file->counters()->snapshot();
  CHECK(opened.of(IoClass::rd).operations >= 1);  // the header and tables
  CHECK(opened.of(IoClass::wr).operations == 0);

  // One guest write into a fresh image: the data cluster, the L2 table and the refcounts
  // go to the file, and it grows past the guest offset's cluster.
  std::vector<std::byte> buf(4096, std::byte{0x11});
  REQUIRE(img->write_at(kMiB, buf));
  REQUIRE(img->flush_all());
  const NodeIoStats f = file->counters()->snapshot();
  const NodeIoStats g = stats_of(img.get());
  CHECK(g.of(IoClass::wr).operations == 1);
  CHECK(f.of(IoClass::wr).operations >= 2);
  CHECK(f.of(IoClass::wr).bytes > g.of(IoClass::wr).bytes);
  CHECK(f.of(IoClass::flush).operations >= 1);
  CHECK(f.of(IoClass::wr).failed == 0);
  struct stat st {};
  REQUIRE(::stat(d.file("a.qcow2").c_str(), &st) == 0);
  CHECK(f.wr_highest_offset > 0);
  CHECK(f.wr_highest_offset <= static_cast<uint64_t>(st.st_size));
  // The last cluster allocated is the data's or a table's: the highest write reaches into it.
  CHECK(f.wr_highest_offset > static_cast<uint64_t>(st.st_size) - 65536);

  // A new handle on the file continues the same counters.
  auto counters = file->counters();
  img.reset();
  auto again = open_rw("qcow2", d.file("a.qcow2"));
  again->file_mut()->share_counters(counters);
  REQUIRE(again->read_at(kMiB, buf));
  CHECK(buf[0] == std::byte{0x11});
  CHECK(counters->snapshot().of(IoClass::rd).operations > f.of(IoClass::rd).operations);
}

TEST_CASE("counting: a raw layer's discard punches a hole, counted on the file", "[counting]") {
  TempDir d;
  write_file(d.file("a.raw"), pattern(kMiB, 3));
  auto img = open_rw("raw", d.file("a.raw"));
  REQUIRE(img->file() != nullptr);
  REQUIRE(img->discard_at(0, 65536));
  const NodeIoStats f = img->file()->counters()->snapshot();
  const NodeIoStats g = stats_of(img.get());
  CHECK(g.of(IoClass::unmap).operations == 1);
  // ext4, xfs and tmpfs punch holes; a file system that cannot gets zeroes written instead.
  CHECK(f.of(IoClass::unmap).operations + f.of(IoClass::wr).operations == 1);
  std::vector<std::byte> buf(4096, std::byte{0xff});
  REQUIRE(img->read_at(0, buf));
  CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
}

TEST_CASE("counting: node names as QEMU forms and checks them", "[counting]") {
  const std::string a = generate_node_name(), b = generate_node_name();
  CHECK(a.starts_with("#block"));
  CHECK(a != b);
  CHECK_FALSE(node_name_wellformed(a));  // a user cannot pick a generated name
  CHECK(node_name_wellformed("snap1"));
  CHECK(node_name_wellformed("a-b.c_d"));
  CHECK_FALSE(node_name_wellformed(""));
  CHECK_FALSE(node_name_wellformed("1abc"));
  CHECK_FALSE(node_name_wellformed("a b"));
}

}  // namespace pvhost::block::test
