// The format drivers under concurrent requests: qdisk's queues run them on several worker
// threads (ThreadedQueue, src/block/formats.cc), and qcow2/VHD move guest data without
// their mutex where that is safe ("Concurrency" in qcow2_image.cc and vhd_image.cc). Many
// threads write, read back, discard and flush interleaved 4 KiB units of one image (units
// of different threads share clusters), against a model; afterwards the image reads as
// the model, qemu-img converts it to the model, and qemu-img check finds it clean.
#include <sys/uio.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "src/block/qcow2/qcow2_image.h"
#include "src/block/vhd/vhd_image.h"
#include "src/event_loop.h"
#include "tests/unit/block_formats/test_util.h"

namespace pvhost::block::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;
constexpr uint64_t kUnit = 4096;
constexpr unsigned kThreads = 8;

struct Failures {
  std::mutex mu;
  std::vector<std::string> what;
  void add(std::string s) {
    std::lock_guard lock(mu);
    if (what.size() < 20) what.push_back(std::move(s));
  }
};

// Thread `t` owns units t, t + kThreads, ...: it alone writes, discards and checks them,
// so its part of `model` needs no lock. Requests are sometimes shorter than a unit, at odd
// byte offsets, or in a misaligned buffer (the locked, bounced path), mostly aligned and
// in aligned buffers (the unlocked path).
void hammer(Image& img, std::vector<std::byte>& model, unsigned t, int ops, bool discards,
            Failures& f) {
  std::mt19937_64 rng(1000 + t);
  const uint64_t units = model.size() / kUnit;
  AlignedBytes buf(kUnit + 1);
  for (int i = 0; i < ops; ++i) {
    const uint64_t unit = t + kThreads * (rng() % (units / kThreads));
    uint64_t off = unit * kUnit;
    uint64_t len = kUnit;
    const unsigned shape = static_cast<unsigned>(rng() % 10);
    if (shape == 0) {  // a byte range inside the unit
      const uint64_t a = rng() % kUnit, b = rng() % kUnit;
      off += std::min(a, b);
      len = std::max<uint64_t>(1, std::max(a, b) - std::min(a, b));
    } else if (shape == 1) {  // sectors inside the unit
      const uint64_t a = rng() % 8, b = rng() % 8;
      off += std::min(a, b) * 512;
      len = (std::max(a, b) - std::min(a, b) + 1) * 512;
    }
    std::byte* p = buf.data() + (rng() % 10 == 0 ? 1 : 0);
    const unsigned op = static_cast<unsigned>(rng() % 10);
    const std::string where = fmt::format("thread {} op {} at {}+{}", t, i, off, len);
    if (op < 5) {
      for (uint64_t k = 0; k < len; ++k) p[k] = std::byte(rng() & 0xff);
      if (auto r = img.write_at(off, std::span<const std::byte>(p, len)); !r) {
        f.add(where + " write: " + r.error().describe());
        return;
      }
      std::memcpy(model.data() + off, p, len);
    } else if (op < 9 || !discards) {
      if (auto r = img.read_at(off, std::span<std::byte>(p, len)); !r) {
        f.add(where + " read: " + r.error().describe());
        return;
      }
      if (std::memcmp(p, model.data() + off, len) != 0) {
        f.add(where + " read back other bytes than written");
        return;
      }
    } else {
      if (auto r = img.discard_at(off, len); !r) {
        f.add(where + " discard: " + r.error().describe());
        return;
      }
      std::memset(model.data() + off, 0, len);
    }
  }
}

void run_concurrently(Image& img, std::vector<std::byte>& model, int ops, bool discards) {
  Failures f;
  std::atomic<bool> stop{false};
  std::atomic<int> flushes{0};
  std::thread flusher([&] {
    while (!stop) {
      if (auto r = img.flush_all(); !r) {
        f.add("flush: " + r.error().describe());
        return;
      }
      ++flushes;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  });
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] { hammer(img, model, t, ops, discards, f); });
  for (auto& th : threads) th.join();
  stop = true;
  flusher.join();
  INFO((f.what.empty() ? std::string() : f.what.front()));
  CHECK(f.what.empty());
  CHECK(flushes > 0);
  REQUIRE(img.flush_all());
}

// `qemu_reads_it`: false for VHD differencing disks, whose parent QEMU's vpc driver does
// not read (it ignores the sector bitmaps); those are checked by opening them again.
void check_converts_to(const TempDir& d, const std::string& fmt, const std::string& path,
                       const std::vector<std::byte>& model, bool qemu_reads_it) {
  if (!qemu_reads_it) {
    auto img = must_open(fmt, path, ReadOnly::yes);
    CHECK((read_all(*img) == model));
    return;
  }
  if (fmt == "qcow2") {
    std::string out;
    const int st = qemu_img_check(fmt, path, &out);
    INFO(out);
    CHECK(st == 0);
  }
  const auto seen = qemu_img_raw(fmt, path, d.file("out.raw"));
  REQUIRE(seen.size() == model.size());
  const auto diff = std::mismatch(seen.begin(), seen.end(), model.begin());
  INFO("qemu-img reads other bytes from offset " << (diff.first - seen.begin()));
  CHECK((seen == model));
}

}  // namespace

TEST_CASE("formats: many threads on one image keep every byte", "[concurrency]") {
  TempDir d;  // /tmp: a disk-backed file system, so O_DIRECT (the unlocked path) is in use
  const uint64_t size = 16 * kMiB;
  struct Variant {
    std::string name;
    std::string fmt;
    std::function<void()> make;  // creates d/"img"
    bool discards;
    bool backing;  // model starts as d/"base.raw"
    bool qemu_reads_it = true;
  };
  const std::string img_path = d.file("img");
  const auto base = pattern(size, 99, 256 * 1024);
  write_file(d.file("base.raw"), base);
  auto qcow2 = [&](uint64_t cs, const std::string& backing) {
    return [&, cs, backing] {
      Qcow2CreateOptions o;
      o.cluster_size = cs;
      o.backing_file = backing;
      o.backing_format = backing.empty() ? "" : "raw";
      REQUIRE(create_qcow2(img_path, size, o));
    };
  };
  const std::vector<Variant> variants = {
      {"qcow2 64 KiB clusters", "qcow2", qcow2(65536, ""), true, false},
      {"qcow2 4 KiB clusters", "qcow2", qcow2(4096, ""), true, false},
      {"qcow2 512-byte clusters", "qcow2", qcow2(512, ""), true, false},
      {"qcow2 over a raw backing file", "qcow2", qcow2(65536, d.file("base.raw")), true, true},
      {"vhd dynamic", "vpc",
       [&] {
         run_ok("qemu-img create -q -f vpc -o subformat=dynamic,force_size=on " + img_path +
                " 16M");
       },
       true, false},
      {"vhd differencing", "vpc",
       [&] {
         run_ok("qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on " +
                d.file("base.raw") + " " + d.file("parent.vhd"));
         REQUIRE(create_vhd_differencing(img_path, d.file("parent.vhd")));
       },
       true, true, false},
  };
  for (const auto& v : variants) {
    DYNAMIC_SECTION(v.name) {
      v.make();
      std::vector<std::byte> model = v.backing ? base : std::vector<std::byte>(size);
      {
        auto img = must_open(v.fmt, img_path);
        CHECK(img->info().direct_io);
        run_concurrently(*img, model, 600, v.discards);
        CHECK((read_all(*img) == model));
      }
      check_converts_to(d, v.fmt, img_path, model, v.qemu_reads_it);
      // Again on the reopened image: now most writes land in allocated clusters and run
      // without the mutex, while discards free clusters under them.
      {
        auto img = must_open(v.fmt, img_path);
        CHECK((read_all(*img) == model));
        run_concurrently(*img, model, 600, v.discards);
      }
      check_converts_to(d, v.fmt, img_path, model, v.qemu_reads_it);
    }
  }
}

TEST_CASE("formats: an image's I/O queue completes on its loop, several requests at once",
          "[concurrency]") {
  TempDir d;
  REQUIRE(create_qcow2(d.file("q.qcow2"), 8 * kMiB, 65536, "", ""));
  auto img = must_open("qcow2", d.file("q.qcow2"));
  auto loop = EventLoop::create("guest");
  REQUIRE(loop);
  auto q = img->open_queue(**loop, 32, nullptr);
  REQUIRE(q);
  const auto loop_thread = std::this_thread::get_id();
  std::vector<AlignedBytes> bufs;
  for (size_t i = 0; i < 48; ++i) {
    const auto p = pattern(8192, i);
    bufs.emplace_back(p.begin(), p.end());
  }
  int completed = 0, bad = 0;
  std::vector<std::byte> model(8 * kMiB);
  for (size_t i = 0; i < bufs.size(); ++i) {
    iovec v{bufs[i].data(), bufs[i].size()};
    const uint64_t off = i * 131072 + 4096;
    std::memcpy(model.data() + off, bufs[i].data(), bufs[i].size());
    (*q)->write(off, std::span(&v, 1), [&](int64_t r) {
      if (r != 8192 || std::this_thread::get_id() != loop_thread) ++bad;
      ++completed;
    });
  }
  CHECK((*q)->in_flight() == 48);
  (*q)->submit();
  CHECK(completed == 0);  // never inside the call that queued or submitted them
  for (int i = 0; i < 1000 && completed < 48; ++i)
    REQUIRE((*loop)->run_once(std::chrono::milliseconds(50)));
  CHECK(completed == 48);
  CHECK(bad == 0);
  CHECK((*q)->in_flight() == 0);
  // Reads and a flush, then drain() instead of the loop.
  std::vector<AlignedBytes> back(bufs.size(), AlignedBytes(8192));
  for (size_t i = 0; i < back.size(); ++i) {
    iovec v{back[i].data(), back[i].size()};
    (*q)->read(i * 131072 + 4096, std::span(&v, 1), [&](int64_t r) {
      if (r != 8192) ++bad;
      ++completed;
    });
  }
  (*q)->flush([&](int64_t r) {
    if (r != 0) ++bad;
    ++completed;
  });
  (*q)->submit();
  (*q)->drain();
  CHECK(completed == 48 + 49);
  CHECK(bad == 0);
  CHECK((*q)->in_flight() == 0);
  for (size_t i = 0; i < back.size(); ++i) CHECK((back[i] == bufs[i]));
  // One request alone runs on the loop thread (no worker hop); still completed later.
  AlignedBytes one(4096);
  iovec v{one.data(), one.size()};
  bool one_done = false;
  (*q)->read(4096, std::span(&v, 1), [&](int64_t r) { one_done = r == 4096; });
  (*q)->submit();
  CHECK_FALSE(one_done);
  REQUIRE((*loop)->run_once(std::chrono::milliseconds(50)));
  CHECK(one_done);
  // Destroying a queue with requests in flight completes them first.
  int late = 0;
  for (size_t i = 0; i < 8; ++i) {
    iovec w{bufs[i].data(), bufs[i].size()};
    (*q)->write(i * 131072 + 4096, std::span(&w, 1), [&](int64_t r) { late += r == 8192 ? 1 : 0; });
  }
  (*q)->submit();
  q->reset();
  CHECK(late == 8);
  img.reset();
  write_file(d.file("expected.raw"), model);
  run_ok("qemu-img compare -f qcow2 -F raw " + d.file("q.qcow2") + " " + d.file("expected.raw"));
}

}  // namespace pvhost::block::test
