// qcow2 driver tests. qemu-img (Debian qemu-utils) is the oracle: images it makes must
// read like `qemu-img convert -O raw`; images we write must pass `qemu-img check` and
// `qemu-img compare` against the expected raw content.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <random>

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

TEST_CASE("qcow2: a full refcount table is a clear error that leaves the image clean", "[qcow2]") {
  // 512-byte clusters, 64-bit refcounts, one refcount-table cluster (as qemu-img makes
  // it): refcounts for 64 * 64 clusters = 2 MiB of file. Growing the table is not
  // implemented, so the image cannot grow past that.
  TempDir d;
  run_ok("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 " + d.file("f.qcow2") + " 8M");
  std::vector<std::byte> model(8 * kMiB);
  std::string err;
  {
    auto img = must_open("qcow2", d.file("f.qcow2"));
    for (uint64_t off = 0; off < 8 * kMiB; off += 65536) {
      auto data = pattern(65536, off);
      auto r = img->write_at(off, data);
      if (!r) {
        err = r.error().describe();
        break;
      }
      std::memcpy(model.data() + off, data.data(), data.size());
    }
    REQUIRE(img->flush_all());
  }
  INFO(err);
  CHECK(err.find("refcount table full") != std::string::npos);
  CHECK(qemu_img_check("qcow2", d.file("f.qcow2")) == 0);
  auto img = must_open("qcow2", d.file("f.qcow2"), ReadOnly::yes);
  const auto got = read_all(*img);
  // The first MiB went in before the table filled up (about 1.9 MiB fits).
  CHECK(std::equal(model.begin(), model.begin() + static_cast<std::ptrdiff_t>(kMiB), got.begin()));
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

}  // namespace
}  // namespace pvhost::block::test
