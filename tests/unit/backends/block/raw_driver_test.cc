// The raw io_uring driver (src/block/raw_driver.h) on a temp file: write, read back, flush,
// discard, the bounded queue, and what it reports.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "src/block/raw_driver.h"

using namespace pvhost;
using namespace pvhost::block;

namespace {

struct TempImage {
  std::string path;
  explicit TempImage(size_t bytes) {
    char tmpl[] = "/var/tmp/pvhost-raw-XXXXXX";
    int fd = ::mkstemp(tmpl);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, static_cast<off_t>(bytes)) == 0);
    ::close(fd);
    path = tmpl;
  }
  ~TempImage() { ::unlink(path.c_str()); }
};

struct Aligned {
  std::byte* p;
  explicit Aligned(size_t n) : p(static_cast<std::byte*>(std::aligned_alloc(4096, n))) {}
  ~Aligned() { std::free(p); }
};

void run_until(EventLoop& loop, const bool& flag) {
  for (int i = 0; i < 500 && !flag; ++i) REQUIRE(loop.run_once(std::chrono::milliseconds(10)));
  REQUIRE(flag);
}

}  // namespace

TEST_CASE("raw driver: a write reads back, through io_uring, with one batch_done per reap", "[block][raw]") {
  TempImage img(1 << 20);
  auto drv = open_raw({img.path, ReadOnly::no, DirectIo::yes});
  REQUIRE(drv);
  auto info = (*drv)->info();
  CHECK(info.size_bytes == (1u << 20));
  CHECK(info.format == "raw");
  CHECK_FALSE(info.read_only);
  CHECK(info.discard);
  auto loop = EventLoop::create("test");
  REQUIRE(loop);
  int batches = 0;
  auto q = (*drv)->open_queue(**loop, 4, [&] { ++batches; });
  REQUIRE(q);

  Aligned wbuf(8192), rbuf(8192);
  for (size_t i = 0; i < 8192; ++i) wbuf.p[i] = std::byte(i * 7 + 3);
  iovec wiov[2] = {{wbuf.p, 4096}, {wbuf.p + 4096, 4096}};
  bool wrote = false;
  int64_t wres = -1;
  (*q)->write(65536, wiov, [&](int64_t r) {
    wres = r;
    wrote = true;
  });
  CHECK((*q)->in_flight() == 1);
  (*q)->submit();
  run_until(**loop, wrote);
  CHECK(wres == 8192);
  CHECK(batches >= 1);

  bool flushed = false;
  (*q)->flush([&](int64_t r) {
    CHECK(r == 0);
    flushed = true;
  });
  (*q)->submit();
  run_until(**loop, flushed);

  iovec riov{rbuf.p, 8192};
  bool read = false;
  (*q)->read(65536, {&riov, 1}, [&](int64_t r) {
    CHECK(r == 8192);
    read = true;
  });
  (*q)->submit();
  run_until(**loop, read);
  CHECK(std::memcmp(rbuf.p, wbuf.p, 8192) == 0);

  // The same bytes are in the file, seen without the driver.
  std::vector<std::byte> direct(8192);
  int fd = ::open(img.path.c_str(), O_RDONLY);
  REQUIRE(::pread(fd, direct.data(), 8192, 65536) == 8192);
  ::close(fd);
  CHECK(std::memcmp(direct.data(), wbuf.p, 8192) == 0);

  bool discarded = false;
  (*q)->discard(65536, 4096, [&](int64_t r) {
    CHECK(r == 4096);
    discarded = true;
  });
  (*q)->submit();
  run_until(**loop, discarded);
  bool reread = false;
  (*q)->read(65536, {&riov, 1}, [&](int64_t) { reread = true; });
  (*q)->submit();
  run_until(**loop, reread);
  CHECK(std::to_integer<int>(rbuf.p[0]) == 0);
  CHECK(std::to_integer<int>(rbuf.p[4095]) == 0);
  CHECK(std::memcmp(rbuf.p + 4096, wbuf.p + 4096, 4096) == 0);
}

TEST_CASE("raw driver: more operations than the depth wait in the backlog; drain completes them", "[block][raw]") {
  TempImage img(1 << 20);
  auto drv = open_raw({img.path, ReadOnly::no, DirectIo::yes});
  REQUIRE(drv);
  auto loop = EventLoop::create("test");
  REQUIRE(loop);
  auto q = (*drv)->open_queue(**loop, 2, {});
  REQUIRE(q);
  Aligned buf(4096 * 16);
  std::memset(buf.p, 0x5a, 4096 * 16);
  std::vector<iovec> iovs(16);
  int done = 0;
  for (int i = 0; i < 16; ++i) {
    iovs[static_cast<size_t>(i)] = {buf.p + i * 4096, 4096};
    (*q)->write(static_cast<uint64_t>(i) * 4096, {&iovs[static_cast<size_t>(i)], 1}, [&](int64_t r) {
      CHECK(r == 4096);
      ++done;
    });
  }
  CHECK((*q)->in_flight() == 16);
  (*q)->drain();
  CHECK(done == 16);
  CHECK((*q)->in_flight() == 0);
}

TEST_CASE("raw driver: a short or failed transfer is an error, read-only is reported", "[block][raw]") {
  TempImage img(8192);
  auto drv = open_raw({img.path, ReadOnly::yes, DirectIo::no});
  REQUIRE(drv);
  CHECK((*drv)->info().read_only);
  CHECK_FALSE((*drv)->info().discard);
  auto loop = EventLoop::create("test");
  REQUIRE(loop);
  auto q = (*drv)->open_queue(**loop, 2, {});
  REQUIRE(q);
  Aligned buf(8192);
  iovec iov{buf.p, 8192};
  int64_t res = 0;
  (*q)->read(4096, {&iov, 1}, [&](int64_t r) { res = r; });  // runs past the end: short
  (*q)->drain();
  CHECK(res == -EIO);
  (*q)->write(0, {&iov, 1}, [&](int64_t r) { res = r; });  // opened read-only
  (*q)->drain();
  CHECK(res == -EBADF);
}

TEST_CASE("open_image: missing files and unsupported formats are clear errors", "[block][raw]") {
  auto missing = open_raw({"/nonexistent/pvhost.img", ReadOnly::no, DirectIo::yes});
  REQUIRE_FALSE(missing);
  CHECK(missing.error().code() == ENOENT);
  CHECK(parse_format("aio").value() == Format::raw);
  CHECK(parse_format("qcow2").value() == Format::qcow2);
  auto q = parse_format("vmdk");
  REQUIRE_FALSE(q);
  CHECK(q.error().what() == "format 'vmdk' is not supported (raw, qcow2, vhd, nbd)");
}
