#include "src/block/raw_driver.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <liburing.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

#include <cstdlib>
#include <deque>
#include <vector>

#include <fmt/format.h>

#include "src/fd.h"
#include "src/log.h"

namespace pvhost::block {
namespace {

struct AlignedFree {
  void operator()(void* p) const noexcept { std::free(p); }
};

// Probes whether O_DIRECT I/O of one 512-byte sector works on `fd` (tmpfs and some network
// file systems refuse it with EINVAL, at open or at the first read).
bool direct_io_works(int fd, uint64_t size) {
  if (size < 512) return true;  // nothing to read; the first real I/O will tell
  std::unique_ptr<void, AlignedFree> buf(std::aligned_alloc(4096, 4096));
  if (!buf) return false;
  return ::pread(fd, buf.get(), 512, 0) >= 0;
}

class RawQueue final : public IoQueue {
 public:
  RawQueue(int fd, bool block_device, unsigned depth, EventLoop& loop, std::function<void()> batch_done)
      : fd_(fd), block_device_(block_device), depth_(depth), loop_(loop), batch_done_(std::move(batch_done)) {}

  ~RawQueue() override {
    drain();
    watch_.reset();
    if (ring_ok_) io_uring_queue_exit(&ring_);
  }

  Result<void> init() {
    // Twice the depth in SQ entries so a full backlog flush never finds the SQ full.
    if (int r = io_uring_queue_init(depth_ * 2, &ring_, 0); r < 0) {
      errno = -r;
      return fail_errno("io_uring_queue_init");
    }
    ring_ok_ = true;
    efd_ = UniqueFd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!efd_) return fail_errno("eventfd");
    if (int r = io_uring_register_eventfd(&ring_, efd_.get()); r < 0) {
      errno = -r;
      return fail_errno("io_uring_register_eventfd");
    }
    watch_ = PVHOST_TRY(loop_.watch_fd(efd_.get(), EPOLLIN, [this](uint32_t) { on_eventfd(); }));
    return {};
  }

  void read(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    enqueue(Op{Kind::read, offset, total(iov), {iov.begin(), iov.end()}, std::move(done)});
  }
  void write(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    enqueue(Op{Kind::write, offset, total(iov), {iov.begin(), iov.end()}, std::move(done)});
  }
  void flush(Completion done) override { enqueue(Op{Kind::flush, 0, 0, {}, std::move(done)}); }
  void discard(uint64_t offset, uint64_t length, Completion done) override {
    enqueue(Op{Kind::discard, offset, length, {}, std::move(done)});
  }

  void submit() override {
    start_backlog();
    if (queued_ == 0) return;
    int r = io_uring_submit(&ring_);
    if (r < 0) PVHOST_LOG_RATELIMITED(log::Level::error, "io_uring_submit: {}", errno_name(-r));
    queued_ = 0;
  }

  void drain() override {
    if (!ring_ok_) return;
    while (in_flight_ > 0 || !backlog_.empty()) {
      submit();
      io_uring_cqe* cqe = nullptr;
      int r = io_uring_wait_cqe(&ring_, &cqe);
      if (r < 0 && r != -EINTR) {
        log::error("io_uring_wait_cqe while draining: {}", errno_name(-r));
        return;
      }
      reap();
    }
  }

  [[nodiscard]] unsigned in_flight() const override {
    return in_flight_ + static_cast<unsigned>(backlog_.size());
  }

 private:
  enum class Kind { read, write, flush, discard };
  struct Op {
    Kind kind;
    uint64_t offset;
    uint64_t length;
    std::vector<iovec> iov;
    Completion done;
  };

  static uint64_t total(std::span<const iovec> iov) {
    uint64_t n = 0;
    for (const auto& v : iov) n += v.iov_len;
    return n;
  }

  void enqueue(Op op) {
    backlog_.push_back(std::make_unique<Op>(std::move(op)));
    start_backlog();
  }

  // Moves operations from the backlog into SQEs while fewer than `depth` are in the kernel.
  void start_backlog() {
    while (!backlog_.empty() && in_flight_ < depth_) {
      std::unique_ptr<Op> op = std::move(backlog_.front());
      backlog_.pop_front();
      if (op->kind == Kind::discard && block_device_) {
        // No io_uring opcode for BLKDISCARD in this liburing: done synchronously.
        uint64_t range[2] = {op->offset, op->length};
        int64_t res = ::ioctl(fd_, BLKDISCARD, range) < 0 ? -errno : static_cast<int64_t>(op->length);
        loop_.defer([done = std::move(op->done), res] { done(res); });
        continue;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) {
        (void)io_uring_submit(&ring_);  // a full SQ: hand it over and retry; errors show at reap
        queued_ = 0;
        sqe = io_uring_get_sqe(&ring_);
        if (sqe == nullptr) {
          backlog_.push_front(std::move(op));
          return;
        }
      }
      switch (op->kind) {
        case Kind::read:
          io_uring_prep_readv(sqe, fd_, op->iov.data(), static_cast<unsigned>(op->iov.size()), op->offset);
          break;
        case Kind::write:
          io_uring_prep_writev(sqe, fd_, op->iov.data(), static_cast<unsigned>(op->iov.size()), op->offset);
          break;
        case Kind::flush:
          io_uring_prep_fsync(sqe, fd_, IORING_FSYNC_DATASYNC);
          break;
        case Kind::discard:
          io_uring_prep_fallocate(sqe, fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, op->offset, op->length);
          break;
      }
      io_uring_sqe_set_data(sqe, op.release());
      ++in_flight_;
      ++queued_;
    }
  }

  void on_eventfd() {
    uint64_t v = 0;
    // Clearing the counter; EAGAIN (already cleared) is harmless.
    (void)::read(efd_.get(), &v, sizeof v);
    reap();
    submit();
  }

  void reap() {
    std::vector<std::pair<std::unique_ptr<Op>, int>> done;
    io_uring_cqe* cqe = nullptr;
    while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe != nullptr) {
      done.emplace_back(std::unique_ptr<Op>(static_cast<Op*>(io_uring_cqe_get_data(cqe))), cqe->res);
      io_uring_cqe_seen(&ring_, cqe);
      --in_flight_;
    }
    if (done.empty()) return;
    for (auto& [op, res] : done) {
      int64_t result = res;
      if (res >= 0) {
        switch (op->kind) {
          case Kind::read:
          case Kind::write:
            // A short transfer inside the image is an I/O error for the guest (blkif has
            // no partial completion).
            if (static_cast<uint64_t>(res) != op->length) result = -EIO;
            break;
          case Kind::flush:
            break;
          case Kind::discard:
            result = static_cast<int64_t>(op->length);
            break;
        }
      }
      op->done(result);
    }
    start_backlog();
    if (batch_done_) batch_done_();
  }

  int fd_;
  bool block_device_;
  unsigned depth_;
  EventLoop& loop_;
  std::function<void()> batch_done_;
  io_uring ring_{};
  bool ring_ok_ = false;
  UniqueFd efd_;
  EventLoop::Watch watch_;
  unsigned in_flight_ = 0;  // SQEs handed to the ring, not yet reaped
  unsigned queued_ = 0;     // SQEs prepared since the last submit
  std::deque<std::unique_ptr<Op>> backlog_;
};

class RawDriver final : public BlockDriver {
 public:
  RawDriver(std::string path, UniqueFd fd, DriverInfo info, bool block_device)
      : path_(std::move(path)), fd_(std::move(fd)), info_(info), block_device_(block_device) {}

  [[nodiscard]] DriverInfo info() const override { return info_; }
  [[nodiscard]] const std::string& path() const override { return path_; }

  Result<uint64_t> refresh_size() override {
    info_.size_bytes = PVHOST_TRY(size_of(fd_.get(), block_device_));
    return info_.size_bytes;
  }

  Result<std::unique_ptr<IoQueue>> open_queue(EventLoop& loop, unsigned depth,
                                              std::function<void()> batch_done) override {
    auto q = std::make_unique<RawQueue>(fd_.get(), block_device_, depth, loop, std::move(batch_done));
    PVHOST_TRY_CTX(q->init(), path_);
    return std::unique_ptr<IoQueue>(std::move(q));
  }

  static Result<uint64_t> size_of(int fd, bool block_device) {
    if (block_device) {
      uint64_t bytes = 0;
      if (::ioctl(fd, BLKGETSIZE64, &bytes) < 0) return fail_errno("BLKGETSIZE64");
      return bytes;
    }
    struct stat st {};
    if (::fstat(fd, &st) < 0) return fail_errno("fstat");
    return static_cast<uint64_t>(st.st_size);
  }

 private:
  std::string path_;
  UniqueFd fd_;
  DriverInfo info_;
  bool block_device_;
};

}  // namespace

Result<std::unique_ptr<BlockDriver>> open_raw(const OpenOptions& o) {
  const int base = (o.read_only == ReadOnly::yes ? O_RDONLY : O_RDWR) | O_CLOEXEC;
  bool direct = o.direct == DirectIo::yes;
  UniqueFd fd(::open(o.path.c_str(), base | (direct ? O_DIRECT : 0)));
  if (!fd && direct && errno == EINVAL) {
    direct = false;
    fd = UniqueFd(::open(o.path.c_str(), base));
  }
  if (!fd) return fail_errno(fmt::format("opening {}", o.path));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return fail_errno(fmt::format("fstat {}", o.path));
  const bool blk = S_ISBLK(st.st_mode);
  if (!blk && !S_ISREG(st.st_mode)) return fail(EINVAL, fmt::format("{} is neither a file nor a block device", o.path));

  DriverInfo info;
  info.format = "raw";
  info.read_only = o.read_only == ReadOnly::yes;
  info.size_bytes = PVHOST_TRY_CTX(RawDriver::size_of(fd.get(), blk), o.path);
  if (blk) {
    int lbs = 512;
    unsigned pbs = 512;
    if (::ioctl(fd.get(), BLKSSZGET, &lbs) == 0 && lbs > 0) info.logical_block_size = static_cast<uint32_t>(lbs);
    if (::ioctl(fd.get(), BLKPBSZGET, &pbs) == 0 && pbs > 0) info.physical_block_size = pbs;
    info.discard = !info.read_only;
    info.discard_granularity = info.logical_block_size;
  } else {
    // Hole punching (FALLOC_FL_PUNCH_HOLE) is how a file discards; granularity as QEMU
    // reports for files: one sector.
    info.discard = !info.read_only;
    info.discard_granularity = 512;
  }
  if (direct && !direct_io_works(fd.get(), info.size_bytes)) {
    log::info("{}: O_DIRECT refused by the file system, using buffered I/O", o.path);
    direct = false;
    fd = UniqueFd(::open(o.path.c_str(), base));
    if (!fd) return fail_errno(fmt::format("opening {}", o.path));
  }
  info.direct_io = direct;
  return std::unique_ptr<BlockDriver>(std::make_unique<RawDriver>(o.path, std::move(fd), info, blk));
}

}  // namespace pvhost::block
