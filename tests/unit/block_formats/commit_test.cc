// The block-commit engine (src/block/commit.cc): dirty tracking, what the layers above a
// base own, and commits with and without a guest writing meanwhile. qemu-img is the oracle
// for the images it leaves.
#include <atomic>
#include <chrono>
#include <random>
#include <thread>

#include "src/block/commit.h"
#include "src/event_loop.h"
#include "tests/unit/block_formats/test_util.h"

namespace pvhost::block::test {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t kMiB = 1 << 20;

// Waits for `pred`; false after `limit`.
template <class P>
bool wait_for(P pred, std::chrono::milliseconds limit = 20s) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(2ms);
  }
  return true;
}

// A commit of `top` into the layer `depth` levels below it, set up as the qdisk device
// does: the base opened read-write beside the chain's read-only handle.
struct Commit {
  std::shared_ptr<DirtyBitmap> dirty;
  std::unique_ptr<CommitEngine> engine;
  std::atomic<bool> ready{false};
  std::atomic<int> errors{0};

  Commit(Image& top, unsigned depth, std::string_view base_fmt, uint64_t speed = 0) {
    const Image* base = &top;
    for (unsigned i = 0; i < depth; ++i) base = base->backing();
    REQUIRE(base != nullptr);
    dirty = std::make_shared<DirtyBitmap>(top.info().size_bytes, 65536);
    CommitSpec spec;
    spec.top = &top;
    spec.base_in_chain = base;
    spec.base = must_open(base_fmt, base->path());
    spec.dirty = dirty;
    spec.speed = speed;
    spec.on_ready = [this] { ready = true; };
    spec.on_error = [this](const Error&) { ++errors; };
    auto e = CommitEngine::start(std::move(spec));
    INFO((e ? "" : e.error().describe()));
    REQUIRE(e);
    engine = std::move(*e);
  }
  // With writes stopped: the final copy and flush; the read-write base handle is closed.
  void finish() {
    std::atomic<bool> done{false};
    std::string err;
    engine->finish([&](Result<std::unique_ptr<Image>> r) {
      if (!r) err = r.error().describe();
      done = true;  // the handle in `r` closes here, as the device closes it before reopening
    });
    REQUIRE(wait_for([&] { return done.load(); }));
    INFO(err);
    REQUIRE(err.empty());
    engine.reset();
  }
};

TEST_CASE("commit: the dirty bitmap hands out marked granules once, in runs, wrapping around", "[commit]") {
  DirtyBitmap d(10 * 65536 + 100, 65536);
  CHECK(d.dirty_bytes() == 0);
  CHECK(!d.take(0, kMiB));
  d.mark(65536 + 1, 1);          // granule 1
  d.mark(3 * 65536, 2 * 65536);  // granules 3, 4
  d.mark(10 * 65536 + 50, 10);   // the short last granule
  d.mark(11 * 65536, 4096);      // past the end: ignored
  CHECK(d.dirty_bytes() == 4 * 65536);
  auto r = d.take(2 * 65536, kMiB);
  REQUIRE(r);
  CHECK(*r == std::pair<uint64_t, uint64_t>{3 * 65536, 2 * 65536});
  r = d.take(5 * 65536, kMiB);
  REQUIRE(r);
  CHECK(*r == std::pair<uint64_t, uint64_t>{10 * 65536, 100});  // clamped to the disk
  r = d.take(10 * 65536 + 100, kMiB);                           // wraps to the start
  REQUIRE(r);
  CHECK(*r == std::pair<uint64_t, uint64_t>{65536, 65536});
  CHECK(!d.take(0, kMiB));
  // Runs are cut at max_bytes.
  d.mark(0, 10 * 65536);
  r = d.take(0, 3 * 65536);
  REQUIRE(r);
  CHECK(*r == std::pair<uint64_t, uint64_t>{0, 3 * 65536});
  CHECK(d.dirty_bytes() == 7 * 65536);
}

TEST_CASE("commit: allocated_above() unions the layers above the base, as qemu-img map reports them", "[commit]") {
  TempDir d;
  run_ok("qemu-img create -q -f raw " + d.file("base.raw") + " 4M");
  run_ok("qemu-img create -q -f qcow2 -b base.raw -F raw " + d.file("mid.qcow2"));
  run_ok("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 " + d.file("top.qcow2"));
  run_ok("qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 1M 128k' " + d.file("mid.qcow2") + " >/dev/null");
  run_ok("qemu-io -c 'write -P 3 64k 64k' -c 'write -z 3M 64k' " + d.file("top.qcow2") + " >/dev/null");
  auto top = must_open("qcow2", d.file("top.qcow2"));
  const Image* mid = top->backing();
  const Image* base = mid->backing();
  auto runs = [&](const Image* stop) {
    std::vector<std::pair<uint64_t, bool>> out;
    for (uint64_t off = 0; off < 4 * kMiB;) {
      auto a = allocated_above(*top, stop, off, 4 * kMiB - off);
      REQUIRE(a);
      if (out.empty() || out.back().second != a->allocated) out.emplace_back(off, a->allocated);
      off += a->bytes;
    }
    return out;
  };
  using R = std::vector<std::pair<uint64_t, bool>>;
  CHECK(runs(base) == R{{0, true}, {128 << 10, false}, {kMiB, true}, {kMiB + (128 << 10), false},
                        {3 * kMiB, true}, {3 * kMiB + (64 << 10), false}});
  CHECK(runs(mid) == R{{0, false}, {64 << 10, true}, {128 << 10, false}, {3 * kMiB, true}, {3 * kMiB + (64 << 10), false}});
  CHECK(runs(nullptr) == R{{0, true}});  // the raw bottom owns everything
}

TEST_CASE("commit: an idle guest's top is copied into a raw base, which then equals the whole disk", "[commit]") {
  TempDir d;
  write_file(d.file("base.raw"), pattern(8 * kMiB, 1));
  run_ok("qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.raw -F raw " + d.file("top.qcow2"));
  run_ok("qemu-io -c 'write -P 0x21 12288 1M' -c 'write -z 5M 8192' -c 'write -P 0x22 8384000 4608' " +
         d.file("top.qcow2") + " >/dev/null");
  const auto expected = qemu_img_raw("qcow2", d.file("top.qcow2"), d.file("expected.raw"));
  {
    auto top = must_open("qcow2", d.file("top.qcow2"));
    Commit c(*top, 1, "raw");
    REQUIRE(wait_for([&] { return c.ready.load(); }));
    const auto p = c.engine->progress();
    CHECK(p.ready);
    CHECK(p.offset == p.len);
    CHECK(p.offset >= (1 << 20) + 8192 + 4608);
    CHECK(p.offset <= (1 << 20) + 3 * 65536 + 2 * 65536);  // whole granules around what the top owns
    c.finish();
    CHECK(c.errors == 0);
  }
  CHECK((read_file(d.file("base.raw")) == expected));
  CHECK(qemu_img_check("qcow2", d.file("top.qcow2")) == 0);  // untouched and still valid
}

TEST_CASE("commit: a guest writing throughout is committed exactly, into a qcow2 base qemu-img finds clean", "[commit]") {
  TempDir d;
  write_file(d.file("seed.raw"), pattern(16 * kMiB, 2, 256 << 10));
  run_ok("qemu-img convert -f raw -O qcow2 " + d.file("seed.raw") + " " + d.file("base.qcow2"));
  run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + d.file("top.qcow2"));
  auto top = must_open("qcow2", d.file("top.qcow2"));
  std::vector<std::byte> model = read_file(d.file("seed.raw"));
  // The guest: random 4 KiB..64 KiB writes and some discards through the tracking driver.
  std::mt19937_64 rng(7);
  auto guest = [&](DirtyBitmap& bitmap, unsigned ops) {
    auto loop = EventLoop::create("guest");
    REQUIRE(loop);
    auto tracked = make_tracking_driver(*top, std::shared_ptr<DirtyBitmap>(&bitmap, [](DirtyBitmap*) {}));
    auto q = tracked->open_queue(**loop, 8, {});
    REQUIRE(q);
    for (unsigned i = 0; i < ops; ++i) {
      const uint64_t len = 4096 * (1 + rng() % 16);
      const uint64_t off = (rng() % ((16 * kMiB - len) / 4096 + 1)) * 4096;
      int64_t res = -1;
      std::vector<std::byte> data;  // alive until the completion has run
      if (rng() % 8 == 0) {
        (*q)->discard(off, len, [&](int64_t r) { res = r; });
        std::fill(model.begin() + static_cast<long>(off), model.begin() + static_cast<long>(off + len), std::byte{0});
      } else {
        data = pattern(len, rng());
        std::memcpy(model.data() + off, data.data(), len);
        iovec v{data.data(), len};
        (*q)->write(off, std::span(&v, 1), [&](int64_t r) { res = r; });
      }
      (*q)->submit();
      (*q)->drain();
      REQUIRE(res >= 0);
    }
  };
  // Writes before the job: part of what the top owns when it starts.
  {
    DirtyBitmap unused(16 * kMiB, 65536);
    guest(unused, 200);
  }
  {
    Commit c(*top, 1, "qcow2", 64 * kMiB);  // a speed limit, so the guest races the copy
    std::thread writer([&] { guest(*c.dirty, 600); });
    writer.join();
    REQUIRE(wait_for([&] { return c.ready.load(); }));
    guest(*c.dirty, 50);  // after ready: the base falls behind again until the final copy
    c.finish();           // "quiesced": no writes from here on
    CHECK(c.errors == 0);
  }
  CHECK((read_all(*top) == model));  // the guest's view never changed
  top.reset();
  std::string out;
  CHECK(qemu_img_check("qcow2", d.file("base.qcow2"), &out) == 0);
  INFO(out);
  CHECK((qemu_img_raw("qcow2", d.file("base.qcow2"), d.file("base-out.raw")) == model));
}

TEST_CASE("commit: into a base two layers down, the middle layer's data is carried along", "[commit]") {
  TempDir d;
  run_ok("qemu-img create -q -f qcow2 " + d.file("base.qcow2") + " 4M");
  run_ok("qemu-io -c 'write -P 1 0 4M' " + d.file("base.qcow2") + " >/dev/null");
  run_ok("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 " + d.file("mid.qcow2"));
  run_ok("qemu-io -c 'write -P 2 1M 1M' " + d.file("mid.qcow2") + " >/dev/null");
  run_ok("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 " + d.file("top.qcow2"));
  run_ok("qemu-io -c 'write -P 3 1536k 1M' -c 'write -z 0 4096' " + d.file("top.qcow2") + " >/dev/null");
  const auto expected = qemu_img_raw("qcow2", d.file("top.qcow2"), d.file("expected.raw"));
  {
    auto top = must_open("qcow2", d.file("top.qcow2"));
    Commit c(*top, 2, "qcow2");
    REQUIRE(wait_for([&] { return c.ready.load(); }));
    c.finish();
  }
  CHECK(qemu_img_check("qcow2", d.file("base.qcow2")) == 0);
  CHECK((qemu_img_raw("qcow2", d.file("base.qcow2"), d.file("out.raw")) == expected));
}

TEST_CASE("commit: a speed limit bounds the copy rate; cancelling leaves the guest's disk as it was", "[commit]") {
  TempDir d;
  write_file(d.file("base.raw"), pattern(8 * kMiB, 3));
  run_ok("qemu-img create -q -f qcow2 -b base.raw -F raw " + d.file("top.qcow2"));
  run_ok("qemu-io -c 'write -P 9 0 8M' " + d.file("top.qcow2") + " >/dev/null");
  const auto view = qemu_img_raw("qcow2", d.file("top.qcow2"), d.file("view.raw"));
  auto top = must_open("qcow2", d.file("top.qcow2"));
  const auto t0 = std::chrono::steady_clock::now();
  {
    Commit c(*top, 1, "raw", 2 * kMiB);
    std::this_thread::sleep_for(300ms);
    const auto p = c.engine->progress();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // At 2 MiB/s no more than the budget so far plus one step has been copied.
    CHECK(static_cast<double>(p.offset) <= 2.0 * kMiB * secs + kMiB);
    CHECK(!p.ready);
    CHECK(p.len == 8 * kMiB);
  }  // destroyed mid-copy: a cancel
  CHECK((read_all(*top) == view));
}

TEST_CASE("commit: a base that is not below the top, or smaller than it, is refused", "[commit]") {
  TempDir d;
  run_ok("qemu-img create -q -f raw " + d.file("small.raw") + " 1M");
  run_ok("qemu-img create -q -f raw " + d.file("base.raw") + " 4M");
  run_ok("qemu-img create -q -f qcow2 -b base.raw -F raw " + d.file("top.qcow2"));
  run_ok("qemu-img create -q -f raw " + d.file("other.raw") + " 4M");
  auto top = must_open("qcow2", d.file("top.qcow2"));
  auto other = must_open("raw", d.file("other.raw"));
  auto attempt = [&](const Image* in_chain, const std::string& path) {
    CommitSpec s;
    s.top = top.get();
    s.base_in_chain = in_chain;
    s.base = must_open("raw", path);
    s.dirty = std::make_shared<DirtyBitmap>(4 * kMiB, 65536);
    auto e = CommitEngine::start(std::move(s));
    REQUIRE(!e);
    return e.error().describe();
  };
  CHECK_THAT(attempt(other.get(), d.file("other.raw")), Catch::Contains("not below"));
  CHECK_THAT(attempt(top->backing(), d.file("small.raw")), Catch::Contains("smaller than the top"));
}

}  // namespace
}  // namespace pvhost::block::test
