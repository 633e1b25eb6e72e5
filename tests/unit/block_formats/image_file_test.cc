// ImageFile (src/block/formats.h) with O_DIRECT, and the format drivers on top of it. The
// oracles: a buffered read of the file (std::ifstream), the open file's flags as the kernel
// reports them (fcntl F_GETFL, /proc/self/fdinfo), /proc/self/io (rchar/wchar: the bytes our
// read and write syscalls moved), qemu-img check and compare.
//
// O_DIRECT needs a file system that supports it; tmpfs (/dev/shm, and /tmp on many
// machines) refuses it (before Linux 6.6) or accepts it without reporting an alignment, so
// the direct-I/O tests keep their files in /var/tmp, and the fallbacks are tested on
// /dev/shm and under a seccomp filter that makes the kernel refuse O_DIRECT.
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <random>
#include <string>

#include "src/block/qcow2/qcow2_image.h"
#include "src/block/vhd/vhd_format.h"
#include "src/block/vhd/vhd_image.h"
#include "tests/unit/block_formats/test_util.h"

namespace pvhost::block::test {
namespace {

constexpr uint64_t kMiB = 1 << 20;
const char* const kDirectIoDir = "/var/tmp";

ImageFile must_open_file(const std::string& path, DirectIo direct, ReadOnly ro = ReadOnly::no) {
  auto f = ImageFile::open(path, ro, direct);
  INFO(path << ": " << (f ? std::string() : f.error().describe()));
  REQUIRE(f);
  return std::move(*f);
}

uint64_t file_size(const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  return static_cast<uint64_t>(st.st_size);
}

// Whether the kernel has O_DIRECT set on the open file (fcntl(2) F_GETFL).
bool fd_has_o_direct(int fd) {
  const int fl = ::fcntl(fd, F_GETFL);
  REQUIRE(fl >= 0);
  return (fl & O_DIRECT) != 0;
}

// The status flags (proc(5) /proc/pid/fdinfo "flags", octal) of every descriptor this
// process has open on `path`: how a driver opened its file, without asking the driver.
std::vector<unsigned> open_flags_of(const std::string& path) {
  const std::filesystem::path want = std::filesystem::canonical(path);
  std::vector<unsigned> flags;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(e.path(), ec);
    if (ec || target != want) continue;
    std::ifstream info("/proc/self/fdinfo/" + e.path().filename().string());
    std::string key;
    while (info >> key) {
      if (key != "flags:") continue;
      std::string octal;
      info >> octal;
      flags.push_back(static_cast<unsigned>(std::stoul(octal, nullptr, 8)));
      break;
    }
  }
  return flags;
}
bool all_o_direct(const std::vector<unsigned>& flags) {
  return !flags.empty() &&
         std::all_of(flags.begin(), flags.end(), [](unsigned f) { return (f & O_DIRECT) != 0; });
}

// rchar and wchar of /proc/self/io (proc(5)): bytes passed through read(2)/pread(2) and
// write(2)/pwrite(2) by this process. Reading the counters is a read too: `self` is how
// many bytes that took, which the next reading includes.
struct IoCounters {
  uint64_t rchar = 0, wchar = 0, self = 0;
};
IoCounters io_counters() {
  char text[1024];
  size_t n = 0;
  {
    UniqueFd fd(::open("/proc/self/io", O_RDONLY | O_CLOEXEC));
    REQUIRE(fd.valid());
    for (ssize_t r = 0; (r = ::read(fd.get(), text + n, sizeof text - 1 - n)) > 0;)
      n += static_cast<size_t>(r);
  }
  text[n] = '\0';
  IoCounters c;
  c.self = n;
  REQUIRE(std::sscanf(text, "rchar: %lu wchar: %lu", &c.rchar, &c.wchar) == 2);
  return c;
}
uint64_t read_between(const IoCounters& a, const IoCounters& b) {
  return b.rchar - a.rchar - a.self;
}
uint64_t written_between(const IoCounters& a, const IoCounters& b) {
  return b.wchar - a.wchar;
}

// A buffer of `n` bytes starting `skew` bytes past an aligned address.
struct SkewedBuffer {
  AlignedBytes storage;
  std::span<std::byte> bytes;
  SkewedBuffer(size_t n, size_t skew) : storage(n + skew) {
    bytes = std::span(storage).subspan(skew, n);
  }
};

// Random reads and writes through `f` at any offset, length and buffer address (a few
// aligned ones, straight through; some over kMaxBounce, several bounced steps), also past the
// end of the file, checked against `model` (the file's content, grown by the writes).
void random_io(ImageFile& f, const std::string& path, std::vector<std::byte>& model,
               uint64_t seed) {
  const uint32_t align = f.alignment();
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 400; ++i) {
    const bool aligned = i % 4 == 0;  // some straight through, the rest bounced
    const uint64_t limit = model.size() + 3 * std::max<uint32_t>(align, 512);
    uint64_t off = rng() % limit;
    size_t len = 1 + rng() % (i % 10 == 0 ? 2 * kMiB + 5000 : 9000);  // a few over the bounce size
    size_t skew = 1 + rng() % 511;
    if (aligned) {
      off = off / align * align;
      len = (len + align - 1) / align * align;
      skew = 0;
    }
    SkewedBuffer buf(len, skew);
    INFO("op " << i << " offset " << off << " length " << len << " skew " << skew);
    if (rng() % 2 == 0) {
      const auto data = pattern(len, rng());
      std::memcpy(buf.bytes.data(), data.data(), len);
      auto r = f.write(off, buf.bytes);
      INFO((r ? std::string() : r.error().describe()));
      REQUIRE(r);
      if (off + len > model.size()) model.resize(off + len);
      std::memcpy(model.data() + off, data.data(), len);
      REQUIRE(f.size() == model.size());
      REQUIRE(file_size(path) == model.size());
    } else {
      auto r = f.read_full(off, buf.bytes);
      INFO((r ? std::string() : r.error().describe()));
      REQUIRE(r);
      const size_t expect = off >= model.size() ? 0 : std::min<uint64_t>(len, model.size() - off);
      REQUIRE(*r == expect);
      REQUIRE(std::memcmp(buf.bytes.data(), model.data() + off, expect) == 0);
      if (expect == len) {
        REQUIRE(f.read_exact(off, buf.bytes));
      } else {
        auto e = f.read_exact(off, buf.bytes);
        REQUIRE(!e);
        CHECK(e.error().message().find("file ends early") != std::string::npos);
      }
    }
  }
  REQUIRE(f.sync());
  CHECK(read_file(path) == model);
}

TEST_CASE(
    "ImageFile: O_DIRECT reads and writes at any offset, length and address match a buffered read",
    "[image-file]") {
  TempDir d(kDirectIoDir);
  const std::string path = d.file("f.bin");
  // An unaligned size: reads past the end are short, and writes past it end the file exactly.
  std::vector<std::byte> model = pattern(3 * kMiB + 777, 5);
  write_file(path, model);
  ImageFile f = must_open_file(path, DirectIo::yes);
  REQUIRE(f.direct());
  CHECK(fd_has_o_direct(f.fd()));  // the kernel's word, not ImageFile's
  const uint32_t align = f.alignment();
  INFO("alignment " << align << ", memory " << f.mem_alignment());
  REQUIRE(align >= 512);
  REQUIRE((align & (align - 1)) == 0);
  REQUIRE(f.mem_alignment() <= align);
  CHECK(f.size() == model.size());
  random_io(f, path, model, 99);
  CHECK(fd_has_o_direct(f.fd()));
}

TEST_CASE("ImageFile on tmpfs: O_DIRECT as far as the kernel grants it, the same results",
          "[image-file]") {
  // tmpfs refuses O_DIRECT at open before Linux 6.6 (ImageFile falls back to buffered
  // I/O) and since then accepts it without reporting STATX_DIOALIGN (ImageFile assumes
  // 4096-byte alignment). Either way every access must give what a buffered one gives.
  if (::access("/dev/shm", W_OK) != 0) {
    WARN("no writable /dev/shm; the tmpfs case is not tested");
    return;
  }
  TempDir d("/dev/shm");
  const std::string path = d.file("f.bin");
  std::vector<std::byte> model = pattern(2 * kMiB + 333, 15);
  write_file(path, model);
  ImageFile f = must_open_file(path, DirectIo::yes);
  INFO("direct " << f.direct() << ", alignment " << f.alignment());
  CHECK(f.direct() == fd_has_o_direct(f.fd()));
  if (f.direct()) {
    CHECK(f.alignment() >= 512);
    CHECK((f.alignment() & (f.alignment() - 1)) == 0);
  } else {
    CHECK(f.alignment() == 1);
  }
  random_io(f, path, model, 98);
}

// Runs `body` in a forked child under a seccomp filter (no Catch2 in the child: `body`
// returns 0 for success or the number of the check that failed); returns the child's exit
// status, or -1 if it did not exit normally.
int run_filtered(std::span<sock_filter> filter, const std::function<int()>& body) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    const sock_fprog prog{static_cast<unsigned short>(filter.size()), filter.data()};
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
        ::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0)
      ::_exit(100);
    ::_exit(body());
  }
  int st = 0;
  REQUIRE(::waitpid(pid, &st, 0) == pid);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}
sock_filter bpf_stmt(uint16_t code, uint32_t k) {
  return sock_filter{code, 0, 0, k};
}
sock_filter bpf_jump(uint16_t code, uint32_t k, uint8_t jt, uint8_t jf) {
  return sock_filter{code, jt, jf, k};
}
// The low 32 bits of syscall argument `i` (seccomp_data is native-endian; x86-64 and arm64
// are little-endian).
uint32_t arg_low(int i) {
  return static_cast<uint32_t>(offsetof(seccomp_data, args) + 8 * i);
}

// In the child: opening `path` with DirectIo::yes must give a working buffered ImageFile.
int expect_buffered_fallback(const std::string& path, const std::vector<std::byte>& content) {
  auto f = ImageFile::open(path, ReadOnly::no, DirectIo::yes);
  if (!f) return 1;
  if (f->direct() || f->alignment() != 1 || f->mem_alignment() != 1) return 2;
  const int fl = ::fcntl(f->fd(), F_GETFL);
  if (fl < 0 || (fl & O_DIRECT) != 0) return 3;
  std::byte buf[100];
  auto r = f->read_full(7, buf);
  if (!r || *r != sizeof buf || std::memcmp(buf, content.data() + 7, sizeof buf) != 0) return 4;
  std::memset(buf, 0x5a, sizeof buf);
  if (!f->write(content.size() - 30, buf) || f->size() != content.size() + 70) return 5;
  if (!f->sync()) return 6;
  return 0;
}

TEST_CASE("ImageFile falls back to buffered I/O where the file system refuses O_DIRECT",
          "[image-file]") {
  TempDir d(kDirectIoDir);
  const std::string path = d.file("f.bin");
  const std::vector<std::byte> content = pattern(64 * 1024 + 5, 16);
  std::vector<std::byte> expect = content;
  expect.resize(content.size() + 70);
  std::fill(expect.end() - 100, expect.end(), std::byte{0x5a});

  SECTION("open(2) fails with EINVAL (\"the file system does not support O_DIRECT\")") {
    // openat with O_DIRECT in its flags (glibc's open() is openat) fails with EINVAL.
    sock_filter filter[] = {
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_openat, 0, 3),
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(2)),
        bpf_jump(BPF_JMP | BPF_JSET | BPF_K, O_DIRECT, 0, 1),
        bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EINVAL),
        bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    write_file(path, content);
    // The filter works as meant: a plain O_DIRECT open fails under it.
    CHECK(run_filtered(filter, [&] {
            const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECT | O_CLOEXEC);
            return fd < 0 && errno == EINVAL ? 0 : 1;
          }) == 0);
    CHECK(run_filtered(filter, [&] { return expect_buffered_fallback(path, content); }) == 0);
    CHECK(read_file(path) == expect);
  }
  SECTION("open(2) succeeds but a direct read fails with EINVAL") {
    // Every pread64 at offset 0 fails with EINVAL: ImageFile's probe read (its later reads
    // are elsewhere).
    sock_filter filter[] = {
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, SYS_pread64, 0, 5),
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(3)),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 3),
        bpf_stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(3) + 4),
        bpf_jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1),
        bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EINVAL),
        bpf_stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    write_file(path, content);
    CHECK(run_filtered(filter, [&] { return expect_buffered_fallback(path, content); }) == 0);
    CHECK(read_file(path) == expect);
  }
}

TEST_CASE("ImageFile: short files and reads past the end, as the drivers read them",
          "[image-file]") {
  // Drivers read data clusters and blocks that lie (partly) past the end of the file
  // (qcow2 preallocation=metadata, a VHD block cut short) with read_full and zero the rest;
  // headers and tables with read_exact, where the end of the file is an error.
  TempDir d(kDirectIoDir);
  const DirectIo direct = GENERATE(DirectIo::yes, DirectIo::no);
  INFO((direct == DirectIo::yes ? "O_DIRECT" : "buffered"));
  AlignedBytes block(4096);  // aligned buffer: straight through when the offset is aligned

  SECTION("an empty file") {
    const std::string path = d.file("empty.bin");
    write_file(path, {});
    ImageFile f = must_open_file(path, direct);
    CHECK(f.direct() == (direct == DirectIo::yes));
    CHECK(f.direct() == fd_has_o_direct(f.fd()));
    CHECK(f.size() == 0);
    CHECK(*f.read_full(0, block) == 0);
    CHECK(*f.read_full(1, std::span(block).first(10)) == 0);
    CHECK(!f.read_exact(0, std::span(block).first(1)));
    const auto three = pattern(3, 1);
    REQUIRE(f.write(0, three));
    CHECK(f.size() == 3);
    CHECK(read_file(path) == three);
  }
  SECTION("a file shorter than one block") {
    const std::string path = d.file("short.bin");
    const auto content = pattern(100, 2);
    write_file(path, content);
    ImageFile f = must_open_file(path, direct);
    CHECK(f.direct() == (direct == DirectIo::yes));
    CHECK(*f.read_full(0, block) == 100);  // aligned: the kernel's short read
    CHECK(std::memcmp(block.data(), content.data(), 100) == 0);
    std::byte b[100];
    CHECK(*f.read_full(50, b) == 50);  // bounced, ending inside the block
    CHECK(std::memcmp(b, content.data() + 50, 50) == 0);
    CHECK(*f.read_full(100, b) == 0);
    CHECK(*f.read_full(4096, std::span(block).first(512)) == 0);
    CHECK(*f.read_full(5000, b) == 0);
    CHECK(f.read_exact(0, std::span(b).first(100)));
    CHECK(!f.read_exact(1, std::span(b).first(100)));
    // Past the end: the gap reads as zeroes, the file ends with the write, not with the
    // block the read-modify-write wrote.
    const auto ten = pattern(10, 3);
    REQUIRE(f.write(1000, ten));
    CHECK(f.size() == 1010);
    CHECK(file_size(path) == 1010);
    std::vector<std::byte> expect = content;
    expect.resize(1000);
    expect.insert(expect.end(), ten.begin(), ten.end());
    CHECK(read_file(path) == expect);
    CHECK(*f.read_full(0, block) == 1010);
    CHECK(std::memcmp(block.data(), expect.data(), expect.size()) == 0);
  }
  SECTION("a file ending inside a block, read across its end") {
    const std::string path = d.file("tail.bin");
    const auto content = pattern(3 * 4096 + 1234, 4);
    write_file(path, content);
    ImageFile f = must_open_file(path, direct);
    AlignedBytes big(4 * 4096);
    CHECK(*f.read_full(4096, big) == content.size() - 4096);  // aligned, short at the end
    CHECK(std::memcmp(big.data(), content.data() + 4096, content.size() - 4096) == 0);
    SkewedBuffer odd(4 * 4096, 3);
    CHECK(*f.read_full(777, odd.bytes) == content.size() - 777);  // bounced, short at the end
    CHECK(std::memcmp(odd.bytes.data(), content.data() + 777, content.size() - 777) == 0);
  }
}

TEST_CASE("ImageFile: extend_to allocates the new range, which reads as zeroes", "[image-file]") {
  // qcow2 grows its file with extend_to before writing a new cluster there without its
  // mutex; allocated blocks (not a hole) let ext4 run such O_DIRECT writes in parallel.
  TempDir d(kDirectIoDir);
  const std::string path = d.file("grow.bin");
  const auto head = pattern(4096, 5);
  write_file(path, head);
  ImageFile f = must_open_file(path, DirectIo::yes);
  REQUIRE(f.extend_to(4096 + 2 * kMiB));
  CHECK(f.size() == 4096 + 2 * kMiB);
  CHECK(file_size(path) == 4096 + 2 * kMiB);
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  // fallocate(2) allocated it: the blocks cover the whole file (a hole would leave ~4 KiB).
  CHECK(static_cast<uint64_t>(st.st_blocks) * 512 >= 4096 + 2 * kMiB);
  AlignedBytes buf(kMiB, std::byte{0xff});
  REQUIRE(f.read_exact(4096 + kMiB, buf));
  CHECK(std::all_of(buf.begin(), buf.end(), [](std::byte b) { return b == std::byte{0}; }));
  // Never shrinks; the old content stays.
  REQUIRE(f.extend_to(4096));
  CHECK(file_size(path) == 4096 + 2 * kMiB);
  REQUIRE(f.read_exact(0, std::span(buf).first(4096)));
  CHECK(std::memcmp(buf.data(), head.data(), 4096) == 0);
  // An unbounced write lands inside the grown range without growing the file further.
  const auto data = pattern(65536, 6);
  std::copy(data.begin(), data.end(), buf.begin());
  REQUIRE(f.write_unbounced(4096 + kMiB, std::span<const std::byte>(buf).first(65536)));
  CHECK(file_size(path) == 4096 + 2 * kMiB);
}

TEST_CASE(
    "ImageFile: with O_DIRECT a change inside one block is one block-sized pwrite; aligned I/O is "
    "not bounced",
    "[image-file]") {
  TempDir d(kDirectIoDir);
  const std::string path = d.file("f.bin");
  std::vector<std::byte> model = pattern(1 * kMiB, 6);
  write_file(path, model);
  ImageFile f = must_open_file(path, DirectIo::yes);
  REQUIRE(f.direct());
  const uint64_t align = f.alignment();
  REQUIRE(io_counters().rchar > 0);  // /proc/self/io counts here

  // The qcow2 header switch (qcow2_image.cc, step g3): 12 bytes at offset 48.
  std::byte hdr[12];
  for (size_t i = 0; i < sizeof hdr; ++i) hdr[i] = std::byte(0x40 + i);
  IoCounters a = io_counters();
  REQUIRE(f.write(48, hdr));
  IoCounters b = io_counters();
  CHECK(written_between(a, b) == align);  // one block written...
  CHECK(read_between(a, b) == align);     // ...after reading it
  std::memcpy(model.data() + 48, hdr, sizeof hdr);

  // Straddling a block boundary: both blocks read, both written in one pwrite.
  const auto two = pattern(40, 7);
  a = io_counters();
  REQUIRE(f.write(align - 20, two));
  b = io_counters();
  CHECK(written_between(a, b) == 2 * align);
  CHECK(read_between(a, b) == 2 * align);
  std::memcpy(model.data() + align - 20, two.data(), two.size());

  // Aligned offset, length and buffer: straight through, nothing read back.
  AlignedBytes blocks(8 * align);
  const auto content = pattern(blocks.size(), 8);
  std::memcpy(blocks.data(), content.data(), content.size());
  a = io_counters();
  REQUIRE(f.write(4 * align, blocks));
  b = io_counters();
  CHECK(written_between(a, b) == blocks.size());
  CHECK(read_between(a, b) == 0);
  std::memcpy(model.data() + 4 * align, content.data(), content.size());
  a = io_counters();
  REQUIRE(f.read_exact(4 * align, blocks));
  b = io_counters();
  CHECK(read_between(a, b) == blocks.size());
  CHECK(std::memcmp(blocks.data(), content.data(), content.size()) == 0);

  REQUIRE(f.sync());
  CHECK(read_file(path) == model);
}

TEST_CASE("ImageFile: DirectIo::no is buffered I/O; non-files are refused", "[image-file]") {
  TempDir d(kDirectIoDir);
  const std::string path = d.file("f.bin");
  write_file(path, pattern(10000, 9));
  ImageFile f = must_open_file(path, DirectIo::no);
  CHECK(!f.direct());
  CHECK(f.alignment() == 1);
  std::vector<std::byte> buf(3);
  REQUIRE(f.read_exact(9997, buf));
  CHECK(*f.read_full(9998, buf) == 2);
  auto chr = ImageFile::open("/dev/null", ReadOnly::yes, DirectIo::yes);
  REQUIRE(!chr);
  CHECK(chr.error().message().find("neither a file nor a block device") != std::string::npos);
}

// Writes at odd offsets, lengths and buffer addresses through an Image, into a model.
void odd_writes(Image& img, std::vector<std::byte>& model, uint64_t seed, int n) {
  std::mt19937_64 rng(seed);
  for (int i = 0; i < n; ++i) {
    const uint64_t off = rng() % model.size();
    const size_t len =
        static_cast<size_t>(std::min<uint64_t>(1 + rng() % (200 * 1024), model.size() - off));
    SkewedBuffer buf(len, i % 3 == 0 ? 0 : 1 + rng() % 4095);
    const auto data = pattern(len, rng());
    std::memcpy(buf.bytes.data(), data.data(), len);
    auto r = img.write_at(off, buf.bytes);
    INFO("write " << i << " at " << off << " length " << len << ": "
                  << (r ? std::string() : r.error().describe()));
    REQUIRE(r);
    std::memcpy(model.data() + off, data.data(), len);
  }
}

TEST_CASE("qcow2 and VHD on a disk-backed file system use O_DIRECT, down the chain, and stay clean",
          "[image-file][qcow2][vhd]") {
  TempDir d(kDirectIoDir);
  const auto base = pattern(16 * kMiB, 21, kMiB);
  write_file(d.file("base.raw"), base);

  SECTION("qcow2 over a raw backing file") {
    const std::string top = d.file("top.qcow2");
    run_ok("qemu-img create -q -f qcow2 -o cluster_size=65536 -b " + d.file("base.raw") +
           " -F raw " + top);
    std::vector<std::byte> model = base;
    {
      OpenOptions o;
      o.path = top;
      o.direct = DirectIo::no;
      auto buffered = open_format_driver("qcow2", o);
      REQUIRE(buffered);
      CHECK(!(*buffered)->info().direct_io);
      CHECK(!dynamic_cast<Image&>(**buffered).backing()->info().direct_io);
      const auto flags = open_flags_of(top);
      REQUIRE(flags.size() == 1);
      CHECK((flags[0] & O_DIRECT) == 0);
    }
    {
      auto img = must_open("qcow2", top);  // OpenOptions' default: DirectIo::yes, as qdisk asks
      CHECK(img->info().direct_io);
      REQUIRE(img->backing() != nullptr);
      CHECK(img->backing()->info().direct_io);  // the raw backing file, read-only, also O_DIRECT
      CHECK(img->backing()->info().read_only);
      CHECK(all_o_direct(open_flags_of(top)));  // the kernel's word, not the driver's
      CHECK(all_o_direct(open_flags_of(d.file("base.raw"))));
      odd_writes(*img, model, 1, 150);
      REQUIRE(img->flush_all());
      CHECK(read_all(*img) == model);
      odd_writes(*img, model, 2, 50);
    }  // closing writes metadata back
    std::string out;
    const int check = qemu_img_check("qcow2", top, &out);
    INFO(out);
    REQUIRE(check == 0);
    write_file(d.file("expected.raw"), model);
    run_ok("qemu-img compare -f qcow2 -F raw " + top + " " + d.file("expected.raw"));
    CHECK(read_file(d.file("base.raw")) == base);
  }

  SECTION("qcow2 growing its refcount table") {
    // 512-byte clusters and 64-bit refcounts: one table cluster covers 2 MiB of file, so
    // writing 4 MiB moves the table (steps g1..g4, with the 12-byte header switch).
    const std::string img_path = d.file("grow.qcow2");
    run_ok("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 " + img_path + " 8M");
    REQUIRE(peek_be(img_path, 56, 4) == 1);
    std::vector<std::byte> model(8 * kMiB);
    {
      auto img = must_open("qcow2", img_path);
      CHECK(img->info().direct_io);
      CHECK(all_o_direct(open_flags_of(img_path)));
      const auto data = pattern(4 * kMiB, 3);
      REQUIRE(img->write_at(777, data));
      std::memcpy(model.data() + 777, data.data(), data.size());
      odd_writes(*img, model, 3, 40);
      REQUIRE(img->flush_all());
    }
    CHECK(peek_be(img_path, 56, 4) > 1);
    std::string out;
    const int check = qemu_img_check("qcow2", img_path, &out);
    INFO(out);
    REQUIRE(check == 0);
    write_file(d.file("expected.raw"), model);
    run_ok("qemu-img compare -f qcow2 -F raw " + img_path + " " + d.file("expected.raw"));
  }

  for (const char* sub : {"dynamic", "fixed"}) {
    SECTION(std::string("vhd ") + sub) {
      const std::string img_path = d.file("w.vhd");
      run_ok(std::string("qemu-img create -q -f vpc -o subformat=") + sub + " " + img_path +
             " 20M");
      std::vector<std::byte> model;
      {
        auto img = must_open("vpc", img_path);
        CHECK(img->info().direct_io);
        CHECK(all_o_direct(open_flags_of(img_path)));
        model.assign(img->info().size_bytes, std::byte{0});
        odd_writes(*img, model, 4, 60);
        REQUIRE(img->flush_all());
        CHECK(read_all(*img) == model);
      }
      write_file(d.file("expected.raw"), model);
      run_ok("qemu-img compare -f vpc -F raw " + img_path + " " + d.file("expected.raw"));
      const auto bytes = read_file(img_path);
      REQUIRE(bytes.size() % 512 == 0);  // the file still ends in a whole footer sector
      REQUIRE(vhd::parse_footer(std::span(bytes).last(512)));
    }
  }

  SECTION("vhd differencing over a dynamic parent") {
    run_ok("qemu-img convert -f raw -O vpc " + d.file("base.raw") + " " + d.file("parent.vhd"));
    const auto parent = qemu_img_raw("vpc", d.file("parent.vhd"), d.file("p.raw"));
    auto r = create_vhd_differencing(d.file("child.vhd"), d.file("parent.vhd"));
    INFO((r ? "" : r.error().describe()));
    REQUIRE(r);
    std::vector<std::byte> model = parent;
    {
      auto img = must_open("vpc", d.file("child.vhd"));
      CHECK(img->info().direct_io);
      REQUIRE(img->backing() != nullptr);
      CHECK(img->backing()->info().direct_io);
      CHECK(all_o_direct(open_flags_of(d.file("child.vhd"))));
      CHECK(all_o_direct(open_flags_of(d.file("parent.vhd"))));
      odd_writes(*img, model, 5, 60);
      REQUIRE(img->flush_all());
      CHECK(read_all(*img) == model);
    }
    auto img = must_open("vpc", d.file("child.vhd"), ReadOnly::yes);
    CHECK(read_all(*img) == model);
    CHECK(qemu_img_raw("vpc", d.file("parent.vhd"), d.file("p2.raw")) == parent);
  }
}

}  // namespace
}  // namespace pvhost::block::test
