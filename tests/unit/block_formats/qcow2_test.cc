// qcow2 driver tests. qemu-img (Debian qemu-utils) is the oracle: images it makes must
// read like `qemu-img convert -O raw`; images we write must pass `qemu-img check` and
// `qemu-img compare` against the expected raw content.
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <functional>
#include <random>
#include <set>

#include "src/block/qcow2/qcow2_format.h"
#include "src/block/qcow2/qcow2_image.h"
#include "tests/unit/block_formats/test_util.h"

namespace pvhost::block::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;

// Applies `n` random writes (and a few discards) to both `img` and the model.
void random_writes(Image& img, std::vector<std::byte>& model, uint64_t seed, int n, uint64_t granule = 512) {
  std::mt19937_64 rng(seed);
  const uint64_t size = model.size();
  for (int i = 0; i < n; ++i) {
    const uint64_t len = granule * (1 + rng() % 160);
    const uint64_t off = (rng() % (size / granule)) * granule;
    const uint64_t l = std::min(len, size - off);
    if (rng() % 8 == 0) {
      auto r = img.discard_at(off, l);
      INFO((r ? "" : r.error().describe()));
      REQUIRE(r);
      std::memset(model.data() + off, 0, l);
      continue;
    }
    auto data = pattern(l, rng());
    auto r = img.write_at(off, data);
    INFO((r ? "" : r.error().describe()));
    REQUIRE(r);
    std::memcpy(model.data() + off, data.data(), l);
  }
}

void check_clean_and_equal(const TempDir& d, const std::string& path, const std::vector<std::byte>& model) {
  std::string out;
  const int st = qemu_img_check("qcow2", path, &out);
  INFO(out);
  REQUIRE(st == 0);
  write_file(d.file("expected.raw"), model);
  run_ok("qemu-img compare -f qcow2 -F raw " + path + " " + d.file("expected.raw"));
}

TEST_CASE("qcow2: images made by qemu-img read as qemu-img converts them", "[qcow2]") {
  TempDir d;
  const auto raw = pattern(6 * kMiB + 4096 * 3, 7, 192 * 1024);
  write_file(d.file("src.raw"), raw);
  struct Variant {
    const char* opts;
  };
  for (const char* opts : {"cluster_size=4096,compat=0.10", "cluster_size=65536", "cluster_size=2097152",
                           "cluster_size=512,compat=1.1", "cluster_size=65536,refcount_bits=1",
                           "cluster_size=16384,refcount_bits=64"}) {
    SECTION(opts) {
      run_ok(std::string("qemu-img convert -f raw -O qcow2 -o ") + opts + " " + d.file("src.raw") + " " + d.file("a.qcow2"));
      auto img = must_open("", d.file("a.qcow2"), ReadOnly::yes);
      CHECK(img->info().size_bytes == raw.size());
      CHECK(read_all(*img) == raw);
    }
  }
}

TEST_CASE("qcow2: compressed clusters inflate to what qemu-img wrote", "[qcow2]") {
  TempDir d;
  const auto raw = pattern(3 * kMiB, 11, 256 * 1024);
  write_file(d.file("src.raw"), raw);
  for (const char* cs : {"4096", "65536"}) {
    run_ok(std::string("qemu-img convert -c -f raw -O qcow2 -o cluster_size=") + cs + " " + d.file("src.raw") + " " +
           d.file("c.qcow2"));
    auto img = must_open("qcow2", d.file("c.qcow2"), ReadOnly::yes);
    CHECK(read_all(*img) == raw);
  }
}

TEST_CASE("qcow2: unallocated clusters read from the backing file, zero clusters as zeroes", "[qcow2]") {
  TempDir d;
  const auto base = pattern(2 * kMiB, 3);
  write_file(d.file("base.raw"), base);
  run_ok("qemu-img convert -f raw -O qcow2 " + d.file("base.raw") + " " + d.file("base.qcow2"));
  run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + d.file("top.qcow2"));
  run_ok("qemu-io -c 'write -P 0x41 4096 8192' -c 'write -z 1048576 65536' " + d.file("top.qcow2") + " >/dev/null");
  auto expected = qemu_img_raw("qcow2", d.file("top.qcow2"), d.file("out.raw"));
  // As open_image() will call it, through the BlockDriver interface.
  {
    OpenOptions o;
    o.path = d.file("top.qcow2");
    o.read_only = ReadOnly::yes;
    auto drv = open_format_driver("qcow2", o);
    REQUIRE(drv);
    CHECK((*drv)->info().format == "qcow2");
    CHECK(image_info_json(**drv)["backing-image"]["format"] == "qcow2");
  }
  auto img = must_open("qcow2", d.file("top.qcow2"), ReadOnly::yes);
  REQUIRE(img->backing() != nullptr);
  CHECK(read_all(*img) == expected);
  const auto j = image_info_json(*img);
  CHECK(j["format"] == "qcow2");
  CHECK(j["backing-filename"] == "base.qcow2");
  CHECK(j["backing-filename-format"] == "qcow2");
  CHECK(j["backing-image"]["format"] == "qcow2");
  CHECK(j["virtual-size"] == 2 * kMiB);
  CHECK(j["cluster-size"] == 65536);
}

TEST_CASE("qcow2: writes leave an image qemu-img check finds clean, with the written content", "[qcow2]") {
  TempDir d;
  for (const char* opts : {"cluster_size=65536", "cluster_size=4096,compat=0.10", "cluster_size=2097152",
                           "cluster_size=512", "cluster_size=4096,refcount_bits=1", "cluster_size=4096,refcount_bits=64"}) {
    SECTION(opts) {
      const uint64_t size = 24 * kMiB;
      run_ok(std::string("qemu-img create -q -f qcow2 -o ") + opts + " " + d.file("w.qcow2") + " " + std::to_string(size));
      std::vector<std::byte> model(size);
      {
        auto img = must_open("qcow2", d.file("w.qcow2"));
        random_writes(*img, model, 42, 120);
        REQUIRE(img->flush_all());
        // Reads see our own writes before and after the flush.
        CHECK(read_all(*img) == model);
      }
      check_clean_and_equal(d, d.file("w.qcow2"), model);
      // Reopen and keep going: in-place overwrites and new allocations.
      {
        auto img = must_open("qcow2", d.file("w.qcow2"));
        CHECK(read_all(*img) == model);
        random_writes(*img, model, 43, 60);
      }  // closing writes metadata back
      check_clean_and_equal(d, d.file("w.qcow2"), model);
    }
  }
}

TEST_CASE("qcow2: writes over a backing file copy the rest of the cluster from it", "[qcow2]") {
  TempDir d;
  const auto base = pattern(8 * kMiB, 5);
  write_file(d.file("base.raw"), base);
  run_ok("qemu-img convert -f raw -O qcow2 -o cluster_size=4096 " + d.file("base.raw") + " " + d.file("base.qcow2"));
  run_ok("qemu-img create -q -f qcow2 -o cluster_size=65536 -b base.qcow2 -F qcow2 " + d.file("top.qcow2"));
  std::vector<std::byte> model = base;
  {
    auto img = must_open("qcow2", d.file("top.qcow2"));
    random_writes(*img, model, 9, 80);
    REQUIRE(img->flush_all());
    CHECK(read_all(*img) == model);
  }
  check_clean_and_equal(d, d.file("top.qcow2"), model);
  // The backing file is untouched.
  CHECK(qemu_img_raw("qcow2", d.file("base.qcow2"), d.file("b.raw")) == base);
}

TEST_CASE("qcow2: writes into compressed clusters reallocate them and free the old ones", "[qcow2]") {
  TempDir d;
  const auto raw = pattern(2 * kMiB, 21);
  write_file(d.file("src.raw"), raw);
  run_ok("qemu-img convert -c -f raw -O qcow2 -o cluster_size=4096 " + d.file("src.raw") + " " + d.file("c.qcow2"));
  std::vector<std::byte> model = raw;
  {
    auto img = must_open("qcow2", d.file("c.qcow2"));
    random_writes(*img, model, 77, 60);
  }
  check_clean_and_equal(d, d.file("c.qcow2"), model);
}

TEST_CASE("qcow2: create_qcow2 makes images qemu-img accepts, and snapshot overlays of them", "[qcow2]") {
  TempDir d;
  for (uint64_t cs : {512u, 4096u, 65536u, 2u << 20}) {
    const std::string p = d.file("n" + std::to_string(cs) + ".qcow2");
    auto r = create_qcow2(p, 100 * kMiB + 512, cs, "", "");
    INFO((r ? "" : r.error().describe()));
    REQUIRE(r);
    CHECK(qemu_img_check("qcow2", p) == 0);
    const RunResult info = run("qemu-img info --output=json " + p);
    REQUIRE(info.status == 0);
    const auto j = nlohmann::json::parse(info.output);
    CHECK(j["virtual-size"] == 100 * kMiB + 512);
    CHECK(j["cluster-size"] == cs);
  }
  // Snapshot: base image with content, overlay backed by it, writes into the overlay.
  const auto base = pattern(4 * kMiB, 8);
  write_file(d.file("base.raw"), base);
  run_ok("qemu-img convert -f raw -O qcow2 " + d.file("base.raw") + " " + d.file("base.qcow2"));
  REQUIRE(create_qcow2(d.file("snap.qcow2"), 4 * kMiB, 65536, "base.qcow2", "qcow2"));
  CHECK(qemu_img_check("qcow2", d.file("snap.qcow2")) == 0);
  const RunResult info = run("qemu-img info --output=json " + d.file("snap.qcow2"));
  REQUIRE(info.status == 0);
  const auto j = nlohmann::json::parse(info.output);
  CHECK(j["backing-filename"] == "base.qcow2");
  CHECK(j["backing-filename-format"] == "qcow2");
  std::vector<std::byte> model = base;
  {
    auto img = must_open("qcow2", d.file("snap.qcow2"));
    CHECK(read_all(*img) == base);
    random_writes(*img, model, 99, 40);
  }
  check_clean_and_equal(d, d.file("snap.qcow2"), model);
  // v2 overlays too.
  Qcow2CreateOptions o;
  o.version = 2;
  o.cluster_size = 4096;
  o.backing_file = d.file("base.qcow2");
  o.backing_format = "qcow2";
  REQUIRE(create_qcow2(d.file("snap2.qcow2"), 4 * kMiB, o));
  CHECK(qemu_img_check("qcow2", d.file("snap2.qcow2")) == 0);
  {
    auto img = must_open("qcow2", d.file("snap2.qcow2"));
    CHECK(read_all(*img) == base);
  }
}

TEST_CASE("qcow2: create_qcow2 sizes the refcount table for a fully allocated image", "[qcow2]") {
  // 4 KiB clusters, 16-bit refcounts: one refcount block covers 8 MiB of file, one table
  // cluster 4 GiB; a 20 GiB image needs more than one table cluster.
  TempDir d;
  const std::string p = d.file("big.qcow2");
  REQUIRE(create_qcow2(p, 20ULL << 30, 4096, "", ""));
  CHECK(peek_be(p, 56, 4) * 4096 / 8 * 8 * kMiB >= (20ULL << 30));
  CHECK(qemu_img_check("qcow2", p) == 0);
  std::vector<std::byte> tail = pattern(8192, 3);
  {
    auto img = must_open("qcow2", p);
    REQUIRE(img->write_at((20ULL << 30) - 8192, tail));
    REQUIRE(img->write_at(0, tail));
  }
  CHECK(qemu_img_check("qcow2", p) == 0);
  auto img = must_open("qcow2", p, ReadOnly::yes);
  std::vector<std::byte> back(8192);
  REQUIRE(img->read_at((20ULL << 30) - 8192, back));
  CHECK(back == tail);
}

TEST_CASE("qcow2: writes that need new refcount blocks allocate them", "[qcow2]") {
  // 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters, so
  // a few hundred KiB of writes need many new blocks.
  TempDir d;
  run_ok("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 " + d.file("r.qcow2") + " 4M");
  std::vector<std::byte> model(4 * kMiB);
  {
    auto img = must_open("qcow2", d.file("r.qcow2"));
    random_writes(*img, model, 5, 60);
  }
  check_clean_and_equal(d, d.file("r.qcow2"), model);
}

TEST_CASE("qcow2: an image that outgrows its refcount table gets a larger one, and stays clean",
          "[qcow2]") {
  // 512-byte clusters, one refcount-table cluster as qemu-img makes it (64 entries): each
  // refcount block covers 64 (64-bit refcounts) or 256 (16-bit) clusters, so the table
  // covers 2 MiB or 8 MiB of file. Writing more moves the table, several times (it grows
  // by half each time), in between discards (frees) and rewrites.
  struct Variant {
    const char* opts;
    uint64_t size;  // virtual size; written nearly all
  };
  for (const Variant v : {Variant{"cluster_size=512,refcount_bits=64", 8 * kMiB},
                          Variant{"cluster_size=512,compat=0.10", 12 * kMiB}}) {
    SECTION(v.opts) {
      TempDir d;
      const std::string p = d.file("g.qcow2");
      run_ok(std::string("qemu-img create -q -f qcow2 -o ") + v.opts + " " + p + " " +
             std::to_string(v.size));
      REQUIRE(peek_be(p, 56, 4) == 1);
      const uint64_t first_table = peek_be(p, 48, 8);
      std::vector<std::byte> model(v.size);
      {
        auto img = must_open("qcow2", p);
        for (uint64_t off = 0; off + 65536 <= v.size - kMiB; off += 65536) {
          auto data = pattern(65536, off);
          auto r = img->write_at(off, data);
          INFO("write at " << off << ": " << (r ? "" : r.error().describe()));
          REQUIRE(r);
          std::memcpy(model.data() + off, data.data(), data.size());
        }
        random_writes(*img, model, 31, 40);
        REQUIRE(img->flush_all());
        CHECK(read_all(*img) == model);
      }
      CHECK(peek_be(p, 56, 4) > 1);
      CHECK(peek_be(p, 48, 8) != first_table);
      check_clean_and_equal(d, p, model);
      // Reopened, the grown table is the one in use: reads agree, and more writes (which
      // may grow it again) keep the image clean.
      {
        auto img = must_open("qcow2", p);
        CHECK(read_all(*img) == model);
        random_writes(*img, model, 32, 60);
      }
      check_clean_and_equal(d, p, model);
      auto img = must_open("qcow2", p, ReadOnly::yes);
      CHECK(read_all(*img) == model);
    }
  }
}

TEST_CASE("qcow2: a refcount table growth plan covers the new table and its own refcount blocks",
          "[qcow2]") {
  for (uint32_t bits : {9u, 12u, 16u}) {  // 2 MiB clusters: one table cluster reaches past 2^56
    for (uint32_t order : {0u, 4u, 6u}) {
      for (uint32_t old_clusters : {1u, 3u}) {
        qcow2::Header h;
        h.cluster_bits = bits;
        h.refcount_order = order;
        h.refcount_table_clusters = old_clusters;
        const uint64_t cs = h.cluster_size();
        const uint64_t per_block = h.refblock_entries();
        const uint64_t old_entries = h.refcount_table_bytes() / 8;
        const uint64_t covered = old_entries * per_block;
        // At the end of what the table covers, a little past it (a file that ends
        // there), and a long way past it (a file with a large unaccounted tail).
        for (uint64_t start : {covered, covered + per_block - 1, covered + 3, covered * 5 + 7}) {
          for (uint64_t min_entries : {old_entries + 1, old_entries * 4}) {
            INFO("cluster_bits " << bits << " order " << order << " old " << old_clusters
                                 << " start " << start << " min " << min_entries);
            auto r = qcow2::plan_refcount_table_growth(h, start, min_entries);
            INFO((r ? "" : r.error().describe()));
            REQUIRE(r);
            const auto& g = *r;
            const uint64_t entries = uint64_t{g.table_clusters} * cs / 8;
            CHECK(g.blocks_offset == start * cs);
            CHECK(g.table_offset == g.blocks_offset + g.block_count * cs);
            CHECK(g.first_block_index == start / per_block);
            CHECK(entries >= min_entries);
            CHECK(entries >= old_entries + old_entries / 2);
            CHECK(uint64_t{g.table_clusters} * cs <= qcow2::kMaxRefTableBytes);
            // Every cluster of the area has a new block, the table has its entry, and
            // no block is there for nothing.
            const uint64_t last = start + g.area_clusters() - 1;
            CHECK(last / per_block == g.first_block_index + g.block_count - 1);
            CHECK(last / per_block < entries);
          }
        }
      }
    }
  }
  qcow2::Header h;
  h.cluster_bits = 9;
  h.refcount_order = 6;  // the worst case in qcow2.txt: 8 MiB of table reach 32 GiB
  h.refcount_table_clusters = 1;
  SECTION("an area inside what the old table covers is refused") {
    auto r = qcow2::plan_refcount_table_growth(h, 64 * 64 - 1, 65);
    REQUIRE(!r);
    CHECK(r.error().code() == EINVAL);
  }
  SECTION("a table past QEMU's 8 MiB limit is refused: the image cannot grow further") {
    auto r =
        qcow2::plan_refcount_table_growth(h, (32ULL << 30) / 512, (32ULL << 30) / 512 / 64 + 1);
    REQUIRE(!r);
    CHECK(r.error().code() == ENOSPC);
    CHECK(r.error().describe().find("cannot grow further") != std::string::npos);
    // Just below the limit it fits, the area included.
    CHECK(qcow2::plan_refcount_table_growth(h, (32ULL << 30) / 512 - 64 * 64 * 8, 64 * 64));
  }
  SECTION("an area past 2^56 is refused") {
    h.cluster_bits = 16;
    h.refcount_order = 0;
    auto r = qcow2::plan_refcount_table_growth(h, (1ULL << 56) / 65536, 2);
    REQUIRE(!r);
    CHECK(r.error().code() == ENOSPC);
  }
}

TEST_CASE("qcow2: discard makes clusters read as zeroes and frees them", "[qcow2]") {
  TempDir d;
  const auto base = pattern(2 * kMiB, 1);
  write_file(d.file("base.raw"), base);
  run_ok("qemu-img convert -f raw -O qcow2 " + d.file("base.raw") + " " + d.file("b.qcow2"));
  run_ok("qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 " + d.file("t.qcow2"));
  std::vector<std::byte> model = base;
  {
    auto img = must_open("qcow2", d.file("t.qcow2"));
    REQUIRE(img->write_at(0, pattern(kMiB, 2)));
    std::memcpy(model.data(), pattern(kMiB, 2).data(), kMiB);
    // Whole clusters over the backing file: zero flag; a partial one: zeroes written.
    REQUIRE(img->discard_at(65536, 3 * 65536 + 1000));
    std::memset(model.data() + 65536, 0, 3 * 65536 + 1000);
    REQUIRE(img->discard_at(kMiB + 65536, 65536));
    std::memset(model.data() + kMiB + 65536, 0, 65536);
    CHECK(read_all(*img) == model);
  }
  check_clean_and_equal(d, d.file("t.qcow2"), model);
  // In a fresh overlay there is no L2 table yet: discard still hides the backing file.
  run_ok("qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 " + d.file("fresh.qcow2"));
  model = base;
  {
    auto img = must_open("qcow2", d.file("fresh.qcow2"));
    REQUIRE(img->discard_at(kMiB, 2 * 65536));
    std::memset(model.data() + kMiB, 0, 2 * 65536);
    CHECK(read_all(*img) == model);
  }
  check_clean_and_equal(d, d.file("fresh.qcow2"), model);
}

TEST_CASE("qcow2: several I/O queues on one image see each other's writes", "[qcow2]") {
  TempDir d;
  REQUIRE(create_qcow2(d.file("q.qcow2"), 8 * kMiB, 65536, "", ""));
  auto img = must_open("qcow2", d.file("q.qcow2"));
  auto t1 = LoopThread::start("q1");
  auto t2 = LoopThread::start("q2");
  REQUIRE(t1);
  REQUIRE(t2);
  std::vector<std::byte> model(8 * kMiB);
  // Catch2 assertions are not thread-safe: the threads only count, the test checks after.
  std::atomic<int> done{0}, bad{0};
  std::vector<std::vector<std::byte>> bufs(64);
  for (size_t i = 0; i < 64; ++i) bufs[i] = pattern(65536 + 512, i);
  auto run_queue = [&](LoopThread& t, int first) {
    t.run_sync([&, first] {
      auto q = img->open_queue(t.loop(), 32, nullptr);
      if (!q) {
        ++bad;
        return;
      }
      for (int i = first; i < 64; i += 2) {
        iovec v{bufs[static_cast<size_t>(i)].data(), bufs[static_cast<size_t>(i)].size()};
        (*q)->write(static_cast<uint64_t>(i) * 100000, std::span(&v, 1), [&](int64_t r) {
          if (r != 65536 + 512) ++bad;
          ++done;
        });
      }
      (*q)->flush([&](int64_t r) {
        if (r != 0) ++bad;
      });
      (*q)->submit();
      (*q)->drain();
    });
  };
  std::thread a([&] { run_queue(**t1, 0); });
  std::thread b([&] { run_queue(**t2, 1); });
  a.join();
  b.join();
  CHECK(bad == 0);
  CHECK(done == 64);
  for (size_t i = 0; i < 64; ++i) std::memcpy(model.data() + i * 100000, bufs[i].data(), bufs[i].size());
  CHECK(read_all(*img) == model);
  img.reset();
  check_clean_and_equal(d, d.file("q.qcow2"), model);
}

// ---- crash consistency ----

struct CrashPlan {
  uint64_t size;
  uint64_t seed;
};

// The writes of generation `g` (deterministic from the seed), as (offset, data).
std::vector<std::pair<uint64_t, std::vector<std::byte>>> generation(const CrashPlan& p, uint64_t g) {
  std::mt19937_64 rng(p.seed * 1000003 + g);
  std::vector<std::pair<uint64_t, std::vector<std::byte>>> out;
  const int n = 1 + static_cast<int>(rng() % 6);
  for (int i = 0; i < n; ++i) {
    const uint64_t len = 512 * (1 + rng() % 300);
    const uint64_t off = (rng() % (p.size / 512)) * 512;
    out.emplace_back(off, pattern(std::min(len, p.size - off), rng()));
  }
  return out;
}

TEST_CASE("qcow2: a crash at any point leaves at most leaks, and flushed writes survive", "[qcow2][crash]") {
  // kill -9 of the writer: the order of its write(2)s is what is tested, so tmpfs will do.
  TempDir d(::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(12);
  std::mt19937_64 trial_rng(1234);
  int trials = 0, leaks = 0;
  int64_t max_flushed = -1;
  const auto base = pattern(4 * kMiB, 17);
  write_file(d.file("base.raw"), base);
  while (std::chrono::steady_clock::now() < deadline) {
    const CrashPlan plan{4 * kMiB, trial_rng()};
    const bool with_backing = trials % 2 == 1;
    const uint64_t cs = trials % 3 == 0 ? 4096 : 65536;
    const std::string img_path = d.file("crash.qcow2");
    REQUIRE(create_qcow2(img_path, plan.size, cs, with_backing ? d.file("base.raw") : "", with_backing ? "raw" : ""));
    int pipefd[2];
    REQUIRE(::pipe(pipefd) == 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(pipefd[0]);
      OpenOptions o;
      o.path = img_path;
      auto img = open_any("qcow2", o);
      if (!img) ::_exit(2);
      for (uint64_t g = 0;; ++g) {
        for (auto& [off, data] : generation(plan, g)) {
          if (!(*img)->write_at(off, data)) ::_exit(3);
        }
        if (!(*img)->flush_all()) ::_exit(4);
        const uint64_t done = g;
        if (::write(pipefd[1], &done, sizeof done) != sizeof done) ::_exit(5);
      }
    }
    ::close(pipefd[1]);
    ::usleep(static_cast<useconds_t>(1000 + trial_rng() % 150000));
    ::kill(pid, SIGKILL);
    int st = 0;
    ::waitpid(pid, &st, 0);
    REQUIRE(WIFSIGNALED(st));
    int64_t flushed = -1;
    uint64_t g = 0;
    while (::read(pipefd[0], &g, sizeof g) == sizeof g) flushed = static_cast<int64_t>(g);
    ::close(pipefd[0]);

    std::string out;
    const int check = qemu_img_check("qcow2", img_path, &out);
    INFO("trial " << trials << " flushed generation " << flushed << "\n" << out);
    REQUIRE((check == 0 || check == 3));
    if (check == 3) ++leaks;
    max_flushed = std::max(max_flushed, flushed);
    // Content: generation `flushed` complete; generation flushed+1 may be partly there.
    std::vector<std::byte> state = with_backing ? base : std::vector<std::byte>(plan.size);
    for (int64_t k = 0; k <= flushed; ++k)
      for (auto& [off, data] : generation(plan, static_cast<uint64_t>(k))) std::memcpy(state.data() + off, data.data(), data.size());
    // Bytes generation flushed+1 wrote may hold any value it wrote there (its writes may
    // overlap each other, and the kill may fall between them) or the flushed one. All
    // pattern bytes are < 64, so one bit mask per byte says which values are allowed.
    std::vector<uint64_t> allowed(plan.size);
    for (size_t i = 0; i < plan.size; ++i) allowed[i] = uint64_t{1} << std::to_integer<unsigned>(state[i]);
    for (auto& [off, data] : generation(plan, static_cast<uint64_t>(flushed + 1)))
      for (size_t i = 0; i < data.size(); ++i) allowed[off + i] |= uint64_t{1} << std::to_integer<unsigned>(data[i]);
    const auto got = qemu_img_raw("qcow2", img_path, d.file("crash.raw"));
    REQUIRE(got.size() == plan.size);
    size_t bad = 0;
    for (size_t i = 0; i < plan.size; ++i) {
      const unsigned v = std::to_integer<unsigned>(got[i]);
      if (v >= 64 || !(allowed[i] & (uint64_t{1} << v))) ++bad;
    }
    REQUIRE(bad == 0);
    ++trials;
  }
  WARN("crash trials " << trials << ", with leaks " << leaks << ", flushed generations seen " << max_flushed);
  CHECK(trials >= 3);  // sanity only: the machine may be busy
}

// "N leaked clusters were found on the image." in qemu-img check's output; 0 without.
uint64_t leaked_clusters(const std::string& check_output) {
  const auto at = check_output.find(" leaked clusters were found");
  if (at == std::string::npos) return 0;
  const auto from = check_output.rfind('\n', at);
  return std::stoull(check_output.substr(from == std::string::npos ? 0 : from + 1, at));
}

// Runs `body` in a forked child traced with ptrace(2) (stopping through a seccomp filter)
// and kills it (SIGKILL) on entry to its pwrite64 number `kill_at` (counted from 0), so
// that exactly the writes before it happened: a crash between two chosen writes,
// deterministically. A `kill_at` past the last write lets the child finish. `writes` gets
// (length, offset) of every pwrite64 the child started; the child marks points of
// interest by calling getppid(2), and `marks` gets how many writes it had started at each.
struct TracedRun {
  bool traced = true;  // false: ptrace is not permitted here
  bool killed = false;
  std::vector<std::pair<uint64_t, uint64_t>> writes;
  std::vector<uint64_t> marks;
};

TracedRun run_traced(const std::function<void()>& body, uint64_t kill_at) {
  TracedRun t;
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    if (::ptrace(PTRACE_TRACEME, 0, nullptr, nullptr) != 0) ::_exit(10);
    ::raise(SIGSTOP);  // the parent sets options while we wait here
    // Stop (SECCOMP_RET_TRACE) only at pwrite64 and getppid, not at every syscall: the
    // same native binary, so no architecture check.
    auto stmt = [](uint16_t code, uint32_t k) { return sock_filter{code, 0, 0, k}; };
    auto jeq = [](uint32_t k, uint8_t jt) {
      return sock_filter{BPF_JMP | BPF_JEQ | BPF_K, jt, 0, k};
    };
    sock_filter filter[] = {
        stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        jeq(SYS_pwrite64, 2),
        jeq(SYS_getppid, 1),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        stmt(BPF_RET | BPF_K, SECCOMP_RET_TRACE),
    };
    const sock_fprog prog{static_cast<unsigned short>(std::size(filter)), filter};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
      ::_exit(11);
    body();
    ::_exit(0);
  }
  int st = 0;
  REQUIRE(::waitpid(pid, &st, 0) == pid);
  if (WIFEXITED(st)) {
    REQUIRE(WEXITSTATUS(st) == 10);
    t.traced = false;
    return t;
  }
  // (A child that cannot install the filter exits 11: the exit-status check at the end.)
  REQUIRE(WIFSTOPPED(st));
  REQUIRE(::ptrace(PTRACE_SETOPTIONS, pid, nullptr, PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL) ==
          0);
  REQUIRE(::ptrace(PTRACE_CONT, pid, nullptr, nullptr) == 0);
  for (;;) {
    REQUIRE(::waitpid(pid, &st, 0) == pid);
    if (WIFEXITED(st) || WIFSIGNALED(st)) break;
    long sig = 0;
    if (st >> 8 == (SIGTRAP | (PTRACE_EVENT_SECCOMP << 8))) {
      __ptrace_syscall_info info{};
      REQUIRE(::ptrace(PTRACE_GET_SYSCALL_INFO, pid, sizeof info, &info) > 0);
      REQUIRE(info.op == PTRACE_SYSCALL_INFO_SECCOMP);
      if (info.seccomp.nr == SYS_pwrite64) {
        if (t.writes.size() == kill_at) {
          // Killed before the syscall runs: this write never happens.
          ::kill(pid, SIGKILL);
          REQUIRE(::waitpid(pid, &st, 0) == pid);
          t.killed = true;
          return t;
        }
        t.writes.emplace_back(info.seccomp.args[2], info.seccomp.args[3]);
      } else if (info.seccomp.nr == SYS_getppid) {
        t.marks.push_back(t.writes.size());
      }
    } else {
      sig = WSTOPSIG(st);  // a signal for the child: deliver it
    }
    REQUIRE(::ptrace(PTRACE_CONT, pid, nullptr, sig) == 0);
  }
  INFO("child status " << st);
  REQUIRE((WIFEXITED(st) && WEXITSTATUS(st) == 0));
  return t;
}

TEST_CASE("qcow2: a crash at any write of a refcount table growth leaves at most leaks",
          "[qcow2][crash]") {
  // 512-byte clusters, 64-bit refcounts: the one table cluster qemu-img makes covers 2 MiB
  // of file. qemu-io fills it to 1.8 MiB; our driver then writes 256 KiB more and
  // flushes, which grows the table (steps g1..g4 in qcow2_image.cc). The child is killed
  // before each write around the header switch (bytes 48-59) and before each write of
  // the flush that follows, and qemu-img checks every result.
  // Buffered on tmpfs, where the switch is a 12-byte pwrite at 48; and with O_DIRECT on a
  // disk-backed file system, where ImageFile makes it a read-modify-write of the first
  // logical block: one pwrite of that block at 0.
  const bool direct = GENERATE(false, true);
  TempDir d(direct ? "/var/tmp" : ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  const std::string seed_img = d.file("seed.qcow2"), img_path = d.file("crash.qcow2");
  run_ok("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 " + seed_img + " 4M");
  run_ok("qemu-io -c 'write -P 0x21 0 1800k' " + seed_img + " >/dev/null");
  REQUIRE(peek_be(seed_img, 56, 4) == 1);
  std::pair<uint64_t, uint64_t> header_switch{12, 48};  // (length, offset) of its pwrite
  if (direct) {
    auto f = ImageFile::open(seed_img, ReadOnly::yes, DirectIo::yes);
    REQUIRE(f);
    REQUIRE(f->direct());
    if (f->alignment() != 512) {
      // With larger logical blocks the header's block also holds the L1 table and the
      // refcount table (512-byte clusters), whose entries are written the same way: the
      // switch would not be the one pwrite of that block to find.
      WARN("O_DIRECT alignment " << f->alignment() << " here; the O_DIRECT crash points need 512");
      return;
    }
    header_switch = {f->alignment(), 0};
  }
  INFO((direct ? "O_DIRECT" : "buffered") << ", header switch pwrite of " << header_switch.first << " bytes at "
                                          << header_switch.second);
  std::vector<std::byte> before(4 * kMiB);
  std::memset(before.data(), 0x21, 1800 * 1024);
  const uint64_t chunk_off = 2 * kMiB;
  const auto chunk = pattern(256 * 1024, 77);
  std::vector<std::byte> after = before;
  std::memcpy(after.data() + chunk_off, chunk.data(), chunk.size());
  auto writer = [&] {
    OpenOptions o;
    o.path = img_path;
    o.direct = direct ? DirectIo::yes : DirectIo::no;
    auto img = open_any("qcow2", o);
    if (!img || (*img)->info().direct_io != direct) ::_exit(2);
    if (!(*img)->write_at(chunk_off, chunk)) ::_exit(3);
    (void)::syscall(SYS_getppid);  // a mark for the tracer: the flush starts here
    if (!(*img)->flush_all()) ::_exit(4);
    img->reset();
  };

  // A run without a crash: no leaks, the table grew, and where its writes were.
  run_ok("cp " + seed_img + " " + img_path);
  const TracedRun full = run_traced(writer, ~uint64_t{0});
  if (!full.traced) {
    WARN("ptrace is not permitted here; crash points not tested");
    return;
  }
  check_clean_and_equal(d, img_path, after);
  REQUIRE(peek_be(img_path, 56, 4) > 1);
  const auto& w = full.writes;
  const auto switch_it = std::find(w.begin(), w.end(), header_switch);
  REQUIRE(switch_it != w.end());
  CHECK(std::count(w.begin(), w.end(), header_switch) == 1);
  const uint64_t sw = static_cast<uint64_t>(switch_it - w.begin());
  REQUIRE(full.marks.size() == 1);
  const uint64_t flush_start = full.marks[0];
  REQUIRE(sw < flush_start);
  std::set<uint64_t> points;
  for (uint64_t k = sw >= 8 ? sw - 8 : 0; k <= sw + 4; ++k) points.insert(k);
  for (uint64_t k = flush_start >= 2 ? flush_start - 2 : 0; k < w.size(); ++k) points.insert(k);
  INFO("pwrites " << w.size() << ", header switch at " << sw << ", flush from " << flush_start);

  int leaks = 0;
  for (uint64_t k : points) {
    run_ok("cp " + seed_img + " " + img_path);
    const TracedRun t = run_traced(writer, k);
    REQUIRE(t.killed);
    std::string out;
    const int check = qemu_img_check("qcow2", img_path, &out);
    INFO("killed before pwrite " << k << "\n" << out);
    REQUIRE((check == 0 || check == 3));
    if (check == 3) ++leaks;
    // The header names the old table until the switch, the new one from then on.
    CHECK((peek_be(img_path, 56, 4) > 1) == (k > sw));
    // Each byte is old or new (the chunk's writes were not acknowledged by a flush).
    const auto got = qemu_img_raw("qcow2", img_path, d.file("crash.raw"));
    REQUIRE(got.size() == before.size());
    size_t bad = 0;
    for (size_t i = 0; i < got.size(); ++i)
      if (got[i] != before[i] && got[i] != after[i]) ++bad;
    REQUIRE(bad == 0);
    if (k == sw) {
      // Everything but the switch is on disk: the area past the end is unreferenced and
      // uncounted (no leak), and the next growth goes past it. The leaks are the chunk's
      // clusters that g1 counted; finishing the write adds none.
      {
        OpenOptions o;
        o.path = img_path;
        o.direct = direct ? DirectIo::yes : DirectIo::no;
        auto img = open_any("qcow2", o);
        REQUIRE(img);
        REQUIRE((*img)->write_at(chunk_off, chunk));
      }
      std::string out2;
      const int check2 = qemu_img_check("qcow2", img_path, &out2);
      INFO("after finishing the write\n" << out2);
      CHECK(check2 == check);
      CHECK(leaked_clusters(out2) == leaked_clusters(out));
      CHECK(peek_be(img_path, 56, 4) > 1);
      write_file(d.file("expected.raw"), after);
      run_ok("qemu-img compare -f qcow2 -F raw " + img_path + " " + d.file("expected.raw"));
    }
  }
  CHECK(leaks > 0);  // g1 writes the chunk's refcounts before the flush writes its L2 entries
  WARN("refcount growth crash points " << points.size() << ", with leaks " << leaks << (direct ? " (O_DIRECT)" : " (buffered)"));
}

// ---- hostile images ----

struct Hostile {
  std::string name;
  std::function<void(const std::string&)> corrupt;
  std::string expect;  // substring of the error
};

TEST_CASE("qcow2: hostile headers and tables give clear errors, never a crash", "[qcow2][hostile]") {
  TempDir d;
  const auto raw = pattern(2 * kMiB, 4);
  write_file(d.file("src.raw"), raw);
  const std::string good = d.file("good.qcow2");
  run_ok("qemu-img convert -f raw -O qcow2 -o cluster_size=65536 " + d.file("src.raw") + " " + good);
  const uint64_t l1 = peek_be(good, 40, 8);
  const uint64_t rt = peek_be(good, 48, 8);
  const uint64_t l2 = peek_be(good, l1, 8) & qcow2::kL1OffsetMask;
  const std::vector<Hostile> cases = {
      {"bad magic", [](const std::string& p) { patch_be(p, 0, 0x12345678, 4); }, "qcow2 image"},
      {"version 4", [](const std::string& p) { patch_be(p, 4, 4, 4); }, "version 4"},
      {"cluster_bits 30", [](const std::string& p) { patch_be(p, 20, 30, 4); }, "cluster_bits"},
      {"cluster_bits 8", [](const std::string& p) { patch_be(p, 20, 8, 4); }, "cluster_bits"},
      {"huge size", [](const std::string& p) { patch_be(p, 24, ~0ULL, 8); }, "too large"},
      {"L1 too small for size", [](const std::string& p) { patch_be(p, 24, 1ULL << 50, 8); }, "L1 table"},
      {"huge L1", [](const std::string& p) { patch_be(p, 36, 0xffffffff, 4); }, "L1 table"},
      {"L1 past the end", [](const std::string& p) { patch_be(p, 40, 1ULL << 40, 8); }, "past the end"},
      {"L1 unaligned", [l1](const std::string& p) { patch_be(p, 40, l1 + 8, 8); }, "aligned"},
      {"refcount table overlaps L1", [l1](const std::string& p) { patch_be(p, 48, l1, 8); }, "overlaps"},
      {"refcount table past the end", [](const std::string& p) { patch_be(p, 48, 1ULL << 40, 8); }, "past the end"},
      {"huge refcount table", [](const std::string& p) { patch_be(p, 56, 0xffffffff, 4); }, "too large"},
      {"refcount_order 7", [](const std::string& p) { patch_be(p, 96, 7, 4); }, "refcount_order"},
      {"unknown incompatible bit", [](const std::string& p) { patch_be(p, 72, 1ULL << 40, 8); }, "unknown incompatible"},
      {"dirty bit", [](const std::string& p) { patch_be(p, 72, 1, 8); }, "dirty"},
      {"corrupt bit", [](const std::string& p) { patch_be(p, 72, 2, 8); }, "corrupt"},
      {"extended L2", [](const std::string& p) { patch_be(p, 72, 16, 8); }, "extended L2"},
      {"encrypted", [](const std::string& p) { patch_be(p, 32, 1, 4); }, "encrypted"},
      {"header_length odd", [](const std::string& p) { patch_be(p, 100, 105, 4); }, "header_length"},
      {"L1 entry past the end", [l1](const std::string& p) { patch_be(p, l1, (1ULL << 45) | qcow2::kOflagCopied, 8); }, "past the end"},
      {"L1 entry into the header", [l1](const std::string& p) { patch_be(p, l1, 0x200 | qcow2::kOflagCopied, 8); }, "aligned"},
      {"L1 entry onto the refcount table", [l1, rt](const std::string& p) { patch_be(p, l1, rt | qcow2::kOflagCopied, 8); }, "overlaps"},
      {"refcount block past the end", [rt](const std::string& p) { patch_be(p, rt, 1ULL << 45, 8); }, "past the end"},
      {"backing name too long", [](const std::string& p) { patch_be(p, 8, 512, 8); patch_be(p, 16, 5000, 4); }, "backing file name"},
      {"truncated to 100 bytes", [](const std::string& p) { REQUIRE(::truncate(p.c_str(), 100) == 0); }, ""},
      {"truncated inside the L1 table", [l1](const std::string& p) { REQUIRE(::truncate(p.c_str(), static_cast<off_t>(l1 + 4)) == 0); }, ""},
  };
  // One loop, not SECTIONs: Catch2 would rerun the conversion above for each.
  for (const auto& c : cases) {
    const std::string p = d.file("bad.qcow2");
    run_ok("cp " + good + " " + p);
    c.corrupt(p);
    const std::string err = open_error("qcow2", p);
    INFO(c.name << ": " << err);
    CHECK(!err.empty());
    CHECK(err.find(c.expect) != std::string::npos);
  }
  SECTION("L2 entry unaligned: reads of that cluster fail, others work") {
    const std::string p = d.file("bad.qcow2");
    run_ok("cp " + good + " " + p);
    patch_be(p, l2, 0x12345 | qcow2::kOflagCopied, 8);
    auto img = must_open("qcow2", p);
    std::vector<std::byte> buf(4096);
    auto r = img->read_at(0, buf);
    REQUIRE(!r);
    CHECK(r.error().describe().find("aligned") != std::string::npos);
    auto w = img->write_at(0, buf);
    REQUIRE(!w);
    CHECK(img->read_at(65536, buf));
  }
  SECTION("L2 entry pointing at the L1 table: refused, not overwritten") {
    const std::string p = d.file("bad.qcow2");
    run_ok("cp " + good + " " + p);
    patch_be(p, l2, l1 | qcow2::kOflagCopied, 8);
    auto img = must_open("qcow2", p);
    std::vector<std::byte> buf(4096);
    auto w = img->write_at(0, buf);
    REQUIRE(!w);
    CHECK(w.error().describe().find("overlaps the L1 table") != std::string::npos);
  }
}

TEST_CASE("qcow2: backing chains that loop or go too deep are refused", "[qcow2][hostile]") {
  TempDir d;
  REQUIRE(create_qcow2(d.file("a.qcow2"), kMiB, 65536, "b.qcow2", "qcow2"));
  REQUIRE(create_qcow2(d.file("b.qcow2"), kMiB, 65536, "a.qcow2", "qcow2"));
  std::string err = open_error("qcow2", d.file("a.qcow2"));
  INFO(err);
  CHECK(err.find("loops") != std::string::npos);
  REQUIRE(create_qcow2(d.file("self.qcow2"), kMiB, 65536, "self.qcow2", ""));
  err = open_error("qcow2", d.file("self.qcow2"));
  CHECK(err.find("loops") != std::string::npos);
  // A long, non-looping chain.
  REQUIRE(create_qcow2(d.file("c0.qcow2"), kMiB, 65536, "", ""));
  for (unsigned i = 1; i <= kMaxBackingDepth + 2; ++i)
    REQUIRE(create_qcow2(d.file("c" + std::to_string(i) + ".qcow2"), kMiB, 65536, "c" + std::to_string(i - 1) + ".qcow2", "qcow2"));
  err = open_error("qcow2", d.file("c" + std::to_string(kMaxBackingDepth + 2) + ".qcow2"));
  CHECK(err.find("deeper") != std::string::npos);
  CHECK(open_error("qcow2", d.file("c5.qcow2")).empty());
  // A missing backing file is an error naming it.
  REQUIRE(create_qcow2(d.file("orphan.qcow2"), kMiB, 65536, "missing.qcow2", "qcow2"));
  err = open_error("qcow2", d.file("orphan.qcow2"));
  CHECK(err.find("missing.qcow2") != std::string::npos);
}

TEST_CASE("qcow2: allocation() agrees with qemu-img map on what the top layer owns", "[qcow2]") {
  for (const char* cluster : {"4096", "65536", "2097152"}) {
    DYNAMIC_SECTION("cluster size " << cluster) {
      TempDir d;
      run_ok(std::string("qemu-img create -q -f qcow2 -o cluster_size=") + cluster + " " + d.file("base.qcow2") + " 8M");
      run_ok("qemu-io -c 'write -P 0x11 0 8M' " + d.file("base.qcow2") + " >/dev/null");
      run_ok(std::string("qemu-img create -q -f qcow2 -o cluster_size=") + cluster +
             " -b base.qcow2 -F qcow2 " + d.file("top.qcow2"));
      // Data, a zero cluster (owned: it hides the backing data), and data again.
      run_ok("qemu-io -c 'write -P 0x41 4096 8192' -c 'write -z 4194304 2097152' -c 'write -P 0x42 7340032 4096' " +
             d.file("top.qcow2") + " >/dev/null");
      const RunResult map = run("qemu-img map --output=json " + d.file("top.qcow2"));
      REQUIRE(map.status == 0);
      // Bytes owned by the top layer, per qemu-img (depth 0).
      std::vector<bool> expected(8 * kMiB / 512, false);
      for (const auto& e : nlohmann::json::parse(map.output))
        if (e["depth"] == 0)
          for (uint64_t s = e["start"].get<uint64_t>() / 512; s < (e["start"].get<uint64_t>() + e["length"].get<uint64_t>()) / 512; ++s)
            expected[s] = true;
      auto img = must_open("qcow2", d.file("top.qcow2"), ReadOnly::yes);
      std::vector<bool> got(expected.size(), false);
      uint64_t off = 0;
      while (off < 8 * kMiB) {
        auto a = img->allocation(off, 8 * kMiB - off);
        REQUIRE(a);
        REQUIRE(a->bytes > 0);
        for (uint64_t s = off / 512; s < (off + a->bytes) / 512; ++s) got[s] = a->allocated;
        off += a->bytes;
      }
      CHECK(got == expected);
      CHECK(!img->allocation(8 * kMiB, 1));
      // The base owns everything (no backing file below it).
      auto a = img->backing_image()->allocation(0, 8 * kMiB);
      REQUIRE(a);
      CHECK((a->allocated && a->bytes == 8 * kMiB));
    }
  }
}

TEST_CASE("qcow2: a refcount block is never placed on the L1 table, even when the image gives it no refcount", "[qcow2][hostile]") {
  TempDir d;
  const std::string img = d.file("t.qcow2");
  run_ok("qemu-img create -q -f qcow2 " + img + " 1M");
  // qemu-img's layout: header, refcount table (cluster 1), refcount block (2), L1 (3).
  // Dropping the table's only entry leaves every cluster, the L1 table's too, at refcount 0.
  patch_be(img, 65536, 0, 8);
  const auto data = pattern(65536, 11);
  {
    auto w = must_open("qcow2", img);
    REQUIRE(w->write_at(0, data));
    REQUIRE(w->flush_all());
  }
  // The new refcount block went elsewhere (the L1 table is at 196608).
  const auto file = read_file(img);
  const uint64_t rb = load_be64(file.data() + 65536);
  CHECK(rb != 0);
  CHECK(rb != 65536);
  CHECK(rb != 196608);
  // The L1 table survived: qemu-img reads the written cluster back through it.
  const auto back = qemu_img_raw("qcow2", img, d.file("out.raw"));
  REQUIRE(back.size() == 1 << 20);
  CHECK((std::vector<std::byte>(back.begin(), back.begin() + 65536) == data));
}

}  // namespace
}  // namespace pvhost::block::test
