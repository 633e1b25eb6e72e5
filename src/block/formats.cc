#include "src/block/formats.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <mutex>

#include <fmt/format.h>

#include "src/block/counting_image.h"
#include "src/block/nbd/nbd_image.h"
#include "src/block/qcow2/qcow2_image.h"
#include "src/block/vhd/vhd_image.h"
#include "src/fd.h"
#include "src/log.h"

namespace pvhost::block {
namespace {

// An IoQueue over an Image's synchronous core: each operation runs when queued (the
// image's mutex serialises it against other queues), its completion is held until
// submit() hands the batch to the loop (or drain() runs it), so completions never run
// inside the call that queued them.
class SyncQueue final : public IoQueue {
 public:
  SyncQueue(Image& image, EventLoop& loop, std::function<void()> batch_done)
      : image_(image), loop_(loop), state_(std::make_shared<State>()) {
    state_->batch_done = std::move(batch_done);
  }
  ~SyncQueue() override { drain(); }

  void read(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    uint64_t total = 0;
    Result<void> r{};
    for (const iovec& v : iov) {
      r = image_.read_at(offset + total, {static_cast<std::byte*>(v.iov_base), v.iov_len});
      if (!r) break;
      total += v.iov_len;
    }
    finish(r, static_cast<int64_t>(total), std::move(done));
  }
  void write(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    uint64_t total = 0;
    Result<void> r{};
    for (const iovec& v : iov) {
      r = image_.write_at(offset + total, {static_cast<const std::byte*>(v.iov_base), v.iov_len});
      if (!r) break;
      total += v.iov_len;
    }
    finish(r, static_cast<int64_t>(total), std::move(done));
  }
  void flush(Completion done) override { finish(image_.flush_all(), 0, std::move(done)); }
  void discard(uint64_t offset, uint64_t length, Completion done) override {
    finish(image_.discard_at(offset, length), static_cast<int64_t>(length), std::move(done));
  }
  void submit() override {
    if (state_->ready.empty() || state_->scheduled) return;
    state_->scheduled = true;
    loop_.defer([weak = std::weak_ptr<State>(state_)] {
      if (auto s = weak.lock()) run(*s);
    });
  }
  void drain() override { run(*state_); }
  [[nodiscard]] unsigned in_flight() const override { return static_cast<unsigned>(state_->ready.size()); }

 private:
  struct State {
    std::vector<std::pair<Completion, int64_t>> ready;
    bool scheduled = false;
    std::function<void()> batch_done;
  };
  static void run(State& s) {
    s.scheduled = false;
    if (s.ready.empty()) return;
    std::vector<std::pair<Completion, int64_t>> batch;
    batch.swap(s.ready);
    for (auto& [done, res] : batch) done(res);
    if (s.batch_done) s.batch_done();
  }
  void finish(const Result<void>& r, int64_t ok, Completion done) {
    int64_t res = ok;
    if (!r) {
      PVHOST_LOG_RATELIMITED(log::Level::error, "{}: {}", image_.path(), r.error().describe());
      res = -(r.error().code() != 0 ? r.error().code() : EIO);
    }
    state_->ready.emplace_back(std::move(done), res);
  }

  Image& image_;
  EventLoop& loop_;
  std::shared_ptr<State> state_;
};

// A raw file or block device with synchronous I/O (the bottom of backing chains, and
// open_any("raw")). The io_uring driver (raw_driver.cc) is what qdisk uses for raw
// images on its own; this one exists so chains can read synchronously.
class RawImage final : public Image {
 public:
  RawImage(std::string path, UniqueFd fd, uint64_t size, bool read_only, bool blk)
      : path_(std::move(path)), fd_(std::move(fd)), blk_(blk) {
    info_.format = "raw";
    info_.size_bytes = size;
    info_.read_only = read_only;
    info_.discard = !read_only;
  }
  [[nodiscard]] DriverInfo info() const override { return info_; }
  [[nodiscard]] const std::string& path() const override { return path_; }
  Result<void> read_at(uint64_t offset, std::span<std::byte> buf) override {
    PVHOST_TRY(check_range(offset, buf.size()));
    const size_t got = PVHOST_TRY(read_full(fd_.get(), offset, buf));
    std::memset(buf.data() + got, 0, buf.size() - got);
    return {};
  }
  Result<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
    if (info_.read_only) return fail(EROFS, fmt::format("{} is read-only", path_));
    PVHOST_TRY(check_range(offset, buf.size()));
    return write_full(fd_.get(), offset, buf);
  }
  Result<void> flush_all() override {
    if (::fdatasync(fd_.get()) < 0) return fail_errno(fmt::format("fdatasync {}", path_));
    return {};
  }
  Result<void> discard_at(uint64_t offset, uint64_t length) override {
    if (info_.read_only) return fail(EROFS, fmt::format("{} is read-only", path_));
    PVHOST_TRY(check_range(offset, length));
    if (!blk_ && ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(offset),
                             static_cast<off_t>(length)) == 0)
      return {};
    std::vector<std::byte> zero(static_cast<size_t>(std::min<uint64_t>(length, 1u << 20)));
    while (length > 0) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(length, zero.size()));
      PVHOST_TRY(write_full(fd_.get(), offset, std::span<const std::byte>(zero).first(n)));
      offset += n;
      length -= n;
    }
    return {};
  }
  [[nodiscard]] ImageDetails details() const override {
    ImageDetails d;
    d.format = "raw";
    d.virtual_size = info_.size_bytes;
    struct stat st {};
    if (::fstat(fd_.get(), &st) == 0) d.actual_size = static_cast<uint64_t>(st.st_blocks) * 512;
    return d;
  }

 private:
  std::string path_;
  UniqueFd fd_;
  bool blk_;
  DriverInfo info_;
};

}  // namespace

Result<std::unique_ptr<IoQueue>> Image::open_queue(EventLoop& loop, unsigned /*depth*/,
                                                   std::function<void()> batch_done) {
  return std::unique_ptr<IoQueue>(std::make_unique<SyncQueue>(*this, loop, std::move(batch_done)));
}

Result<void> Image::check_range(uint64_t offset, uint64_t length) const {
  const uint64_t size = info().size_bytes;
  if (offset > size || length > size - offset)
    return fail(EINVAL, fmt::format("{}: range {}+{} outside the {}-byte image", path(), offset, length, size));
  return {};
}

Result<Image::Allocation> Image::allocation(uint64_t offset, uint64_t length) {
  PVHOST_TRY(check_range(offset, length));
  if (length == 0) return fail(EINVAL, "allocation: empty range");
  return Allocation{true, length};
}

Result<void> ChainGuard::enter(int fd, const std::string& path) {
  struct stat st {};
  if (::fstat(fd, &st) < 0) return fail_errno(fmt::format("fstat {}", path));
  // Images are files or block devices; a FIFO or a character device named as a backing
  // file would block or never end.
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
    return fail(EINVAL, fmt::format("{} is neither a file nor a block device", path));
  for (const auto& [dev, ino] : seen) {
    if (dev == st.st_dev && ino == st.st_ino)
      return fail(ELOOP, fmt::format("backing chain loops: {} is already part of it", path));
  }
  if (seen.size() > kMaxBackingDepth)
    return fail(ELOOP, fmt::format("backing chain deeper than {} images at {}", kMaxBackingDepth, path));
  seen.emplace_back(st.st_dev, st.st_ino);
  ++depth;
  return {};
}

Result<size_t> read_full(int fd, uint64_t offset, std::span<std::byte> buf) {
  size_t done = 0;
  while (done < buf.size()) {
    const ssize_t n = ::pread(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("pread at {}", offset + done));
    }
    if (n == 0) break;
    done += static_cast<size_t>(n);
  }
  return done;
}

Result<void> write_full(int fd, uint64_t offset, std::span<const std::byte> buf) {
  size_t done = 0;
  while (done < buf.size()) {
    const ssize_t n = ::pwrite(fd, buf.data() + done, buf.size() - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(fmt::format("pwrite at {}", offset + done));
    }
    done += static_cast<size_t>(n);
  }
  return {};
}

std::string resolve_backing_path(const std::string& image_path, const std::string& backing) {
  if (backing.empty() || backing.front() == '/' || backing.find(':') != std::string::npos) return backing;
  const auto slash = image_path.rfind('/');
  if (slash == std::string::npos) return backing;
  return image_path.substr(0, slash + 1) + backing;
}

Result<std::string> probe_format(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
  if (!fd) return fail_errno(fmt::format("opening {}", path));
  {
    ChainGuard type_check;  // refuses FIFOs and character devices before reading
    PVHOST_TRY(type_check.enter(fd.get(), path));
  }
  std::byte head[512] = {};
  const size_t got = PVHOST_TRY_CTX(read_full(fd.get(), 0, head), path);
  if (got >= 4 && load_be32(head) == 0x514649fb) return std::string("qcow2");
  if (got >= 8 && std::memcmp(head, "conectix", 8) == 0) return std::string("vpc");
  struct stat st {};
  if (::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= 512) {
    std::byte tail[512] = {};
    const size_t t = PVHOST_TRY_CTX(read_full(fd.get(), static_cast<uint64_t>(st.st_size) - 512, tail), path);
    if (t == 512 && std::memcmp(tail, "conectix", 8) == 0) return std::string("vpc");
  }
  return std::string("raw");
}

Result<std::unique_ptr<Image>> open_raw_image(const OpenOptions& o, ChainGuard& guard) {
  const bool ro = o.read_only == ReadOnly::yes;
  UniqueFd fd(::open(o.path.c_str(), (ro ? O_RDONLY : O_RDWR) | O_CLOEXEC | O_NONBLOCK));
  if (!fd) return fail_errno(fmt::format("opening {}", o.path));
  PVHOST_TRY(guard.enter(fd.get(), o.path));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return fail_errno(fmt::format("fstat {}", o.path));
  uint64_t size = static_cast<uint64_t>(st.st_size);
  const bool blk = S_ISBLK(st.st_mode);
  if (blk && ::ioctl(fd.get(), BLKGETSIZE64, &size) < 0) return fail_errno(fmt::format("BLKGETSIZE64 {}", o.path));
  return std::unique_ptr<Image>(std::make_unique<RawImage>(o.path, std::move(fd), size, ro, blk));
}

namespace {
Result<std::unique_ptr<Image>> open_layer(std::string_view format, const OpenOptions& o, ChainGuard& guard) {
  if (guard.depth > kMaxBackingDepth)
    return fail(ELOOP, fmt::format("backing chain deeper than {} images", kMaxBackingDepth));
  std::string fmt_name(format);
  if (fmt_name.empty()) {
    if (o.path.starts_with("nbd:") || o.path.starts_with("nbd+")) {
      fmt_name = "nbd";
    } else {
      fmt_name = PVHOST_TRY(probe_format(o.path));
    }
  }
  if (fmt_name == "qcow2") return open_qcow2_in_chain(o, guard);
  if (fmt_name == "vpc" || fmt_name == "vhd") return open_vhd_in_chain(o, guard);
  if (fmt_name == "raw" || fmt_name == "aio" || fmt_name == "file" || fmt_name == "host_device")
    return open_raw_image(o, guard);
  if (fmt_name == "nbd") {
    ++guard.depth;  // a remote export ends the chain (NBD has no backing files)
    return open_nbd(o.path, o.read_only);
  }
  return fail(ENOTSUP, fmt::format("image format '{}' not supported", fmt_name));
}
}  // namespace

Result<std::unique_ptr<Image>> open_any_in_chain(std::string_view format, const OpenOptions& o, ChainGuard& guard) {
  // Every layer counts its own I/O (query-blockstats per node, counting_image.h).
  return count_io(PVHOST_TRY(open_layer(format, o, guard)));
}

Result<std::unique_ptr<Image>> open_any(std::string_view format, const OpenOptions& o) {
  ChainGuard guard;
  return open_any_in_chain(format, o, guard);
}

Result<std::unique_ptr<BlockDriver>> open_format_driver(std::string_view format, const OpenOptions& options) {
  std::unique_ptr<Image> img = PVHOST_TRY(open_any(format, options));
  return std::unique_ptr<BlockDriver>(std::move(img));
}

namespace {
nlohmann::json details_json(const Image& img) {
  const ImageDetails d = img.details();
  nlohmann::json j = {{"filename", img.path()}, {"format", d.format}, {"virtual-size", d.virtual_size},
                      {"dirty-flag", d.dirty}};
  if (d.actual_size) j["actual-size"] = *d.actual_size;
  if (d.cluster_size) j["cluster-size"] = *d.cluster_size;
  if (!d.backing_filename.empty()) {
    j["backing-filename"] = d.backing_filename;
    j["full-backing-filename"] = d.full_backing_filename.empty() ? d.backing_filename : d.full_backing_filename;
    if (!d.backing_format.empty()) j["backing-filename-format"] = d.backing_format;
  }
  if (!d.format_specific.is_null()) j["format-specific"] = d.format_specific;
  if (const Image* b = img.backing()) j["backing-image"] = details_json(*b);
  return j;
}
}  // namespace

nlohmann::json image_info_json(const BlockDriver& driver) {
  if (const auto* img = dynamic_cast<const Image*>(&driver)) return details_json(*img);
  const DriverInfo i = driver.info();
  nlohmann::json j = {{"filename", driver.path()}, {"format", std::string(i.format)},
                      {"virtual-size", i.size_bytes}, {"dirty-flag", false}};
  struct stat st {};
  if (::stat(driver.path().c_str(), &st) == 0) j["actual-size"] = static_cast<uint64_t>(st.st_blocks) * 512;
  return j;
}

}  // namespace pvhost::block
