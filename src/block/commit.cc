#include "src/block/commit.h"

#include <algorithm>
#include <bit>
#include <chrono>

#include <fmt/format.h>

#include "src/log.h"

namespace pvhost::block {
namespace {

// One copy step: big enough to stream, small enough that a pause, a cancel or the final
// switch waits for little.
constexpr uint64_t kChunk = 1 << 20;

}  // namespace

// ---- DirtyBitmap ----

DirtyBitmap::DirtyBitmap(uint64_t size_bytes, uint64_t granularity)
    : size_(size_bytes),
      gran_(std::max<uint64_t>(512, std::bit_ceil(granularity))),
      granules_((size_bytes + gran_ - 1) / gran_),
      bits_((granules_ + 63) / 64, 0) {}

void DirtyBitmap::mark(uint64_t offset, uint64_t length) {
  if (length == 0 || offset >= size_) return;
  const uint64_t end = std::min(size_, offset + std::min(length, size_ - offset));
  std::lock_guard lock(mu_);
  for (uint64_t g = offset / gran_; g * gran_ < end; ++g) {
    const uint64_t bit = uint64_t{1} << (g % 64);
    if (!(bits_[g / 64] & bit)) {
      bits_[g / 64] |= bit;
      ++count_;
    }
  }
  if (on_mark_) on_mark_();
}

void DirtyBitmap::set_on_mark(std::function<void()> fn) {
  std::lock_guard lock(mu_);
  on_mark_ = std::move(fn);
}

std::optional<std::pair<uint64_t, uint64_t>> DirtyBitmap::take(uint64_t from, uint64_t max_bytes) {
  std::lock_guard lock(mu_);
  if (count_ == 0 || granules_ == 0) return std::nullopt;
  const uint64_t max_granules = std::max<uint64_t>(1, max_bytes / gran_);
  uint64_t start = from / gran_;
  if (start >= granules_) start = 0;
  // Find the first dirty granule at or after `start`, wrapping once; skip clean words whole.
  uint64_t g = start;
  for (uint64_t scanned = 0; scanned < granules_;) {
    if (bits_[g / 64] == 0 && g % 64 == 0 && g + 64 <= granules_) {
      scanned += 64;
      g += 64;
    } else if (test(g)) {
      break;
    } else {
      ++scanned;
      ++g;
    }
    if (g >= granules_) g = 0;
  }
  if (!test(g)) return std::nullopt;  // count_ says otherwise only if a bug; be safe
  uint64_t n = 0;
  while (g + n < granules_ && n < max_granules && test(g + n)) {
    bits_[(g + n) / 64] &= ~(uint64_t{1} << ((g + n) % 64));
    --count_;
    ++n;
  }
  const uint64_t offset = g * gran_;
  return std::pair{offset, std::min(n * gran_, size_ - offset)};
}

uint64_t DirtyBitmap::dirty_bytes() const {
  std::lock_guard lock(mu_);
  return std::min(count_ * gran_, size_);
}

// ---- TrackingDriver ----

namespace {

class TrackingQueue final : public IoQueue {
 public:
  TrackingQueue(std::unique_ptr<IoQueue> inner, std::shared_ptr<DirtyBitmap> dirty)
      : inner_(std::move(inner)), dirty_(std::move(dirty)) {}
  void read(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    inner_->read(offset, iov, std::move(done));
  }
  void write(uint64_t offset, std::span<const iovec> iov, Completion done) override {
    uint64_t len = 0;
    for (const iovec& v : iov) len += v.iov_len;
    inner_->write(offset, iov, [d = dirty_, offset, len, done = std::move(done)](int64_t res) {
      d->mark(offset, len);  // after the data is in the top: see commit.h
      done(res);
    });
  }
  void flush(Completion done) override { inner_->flush(std::move(done)); }
  void discard(uint64_t offset, uint64_t length, Completion done) override {
    inner_->discard(offset, length, [d = dirty_, offset, length, done = std::move(done)](int64_t res) {
      d->mark(offset, length);
      done(res);
    });
  }
  void submit() override { inner_->submit(); }
  void drain() override { inner_->drain(); }
  [[nodiscard]] unsigned in_flight() const override { return inner_->in_flight(); }

 private:
  std::unique_ptr<IoQueue> inner_;
  std::shared_ptr<DirtyBitmap> dirty_;
};

class TrackingDriver final : public BlockDriver {
 public:
  TrackingDriver(BlockDriver& inner, std::shared_ptr<DirtyBitmap> dirty) : inner_(inner), dirty_(std::move(dirty)) {}
  [[nodiscard]] DriverInfo info() const override { return inner_.info(); }
  [[nodiscard]] const std::string& path() const override { return inner_.path(); }
  [[nodiscard]] Result<uint64_t> refresh_size() override { return inner_.refresh_size(); }
  [[nodiscard]] Result<std::unique_ptr<IoQueue>> open_queue(EventLoop& loop, unsigned depth,
                                                            std::function<void()> batch_done) override {
    // Fairness with the copy: while the commit runs, each guest queue on the top runs one
    // request at a time. With the format queues' worker threads a guest writing at full
    // depth dirties granules faster than the worker copies them, and READY (nothing left
    // dirty) would wait for the guest to pause. (The top of a commit is a format Image, with
    // a backing file; its queue takes `depth` as its number of workers.) Convergence still
    // depends on the copy outrunning the guest's writes: QEMU's write-blocking copy mode,
    // which mirrors guest writes into the base, is not implemented.
    (void)depth;
    auto q = PVHOST_TRY(inner_.open_queue(loop, 1, std::move(batch_done)));
    return std::unique_ptr<IoQueue>(std::make_unique<TrackingQueue>(std::move(q), dirty_));
  }

 private:
  BlockDriver& inner_;
  std::shared_ptr<DirtyBitmap> dirty_;
};

}  // namespace

std::unique_ptr<BlockDriver> make_tracking_driver(BlockDriver& inner, std::shared_ptr<DirtyBitmap> dirty) {
  return std::make_unique<TrackingDriver>(inner, std::move(dirty));
}

Result<Image::Allocation> allocated_above(Image& top, const Image* base, uint64_t offset, uint64_t length) {
  if (length == 0) return fail(EINVAL, "allocated_above: empty range");
  uint64_t run = length;
  for (Image* layer = &top; layer != nullptr && layer != base; layer = layer->backing_image()) {
    const uint64_t size = layer->info().size_bytes;
    if (offset >= size) continue;  // a shorter backing file owns nothing there
    const Image::Allocation a = PVHOST_TRY(layer->allocation(offset, std::min(run, size - offset)));
    if (a.allocated) return Image::Allocation{true, a.bytes};
    run = std::min(run, a.bytes);
  }
  return Image::Allocation{false, run};
}

// ---- CommitEngine ----

Result<std::unique_ptr<CommitEngine>> CommitEngine::start(CommitSpec spec) {
  if (spec.top == nullptr || spec.base_in_chain == nullptr || !spec.base || !spec.dirty)
    return fail(EINVAL, "commit: incomplete job description");
  const uint64_t top_size = spec.top->info().size_bytes;
  const uint64_t base_size = spec.base->info().size_bytes;
  if (spec.base->info().read_only) return fail(EROFS, fmt::format("{} is open read-only", spec.base->path()));
  if (base_size < top_size)
    return fail(EINVAL, fmt::format("the base {} ({} bytes) is smaller than the top {} ({} bytes); growing it is not supported",
                                    spec.base->path(), base_size, spec.top->path(), top_size));
  bool in_chain = false;
  for (const Image* l = spec.top->backing(); l != nullptr; l = l->backing()) in_chain = in_chain || l == spec.base_in_chain;
  if (!in_chain) return fail(EINVAL, fmt::format("{} is not below {} in its backing chain", spec.base->path(), spec.top->path()));
  std::unique_ptr<CommitEngine> e(new CommitEngine(std::move(spec)));
  e->speed_ = e->spec_.speed;
  e->buf_.resize(kChunk);
  CommitEngine* self = e.get();
  e->spec_.dirty->set_on_mark([self] { self->wake(); });
  e->worker_ = std::thread([self] { self->run(); });
  return e;
}

CommitEngine::~CommitEngine() {
  spec_.dirty->set_on_mark(nullptr);  // no wake() after this returns
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

void CommitEngine::wake() {
  {
    std::lock_guard lock(mu_);
    woken_ = true;
  }
  cv_.notify_all();
}

CommitProgress CommitEngine::progress() const {
  CommitProgress p;
  {
    std::lock_guard lock(mu_);
    p.offset = offset_;
    p.ready = ready_;
    p.paused = paused_;
    p.speed = speed_;
  }
  p.len = p.offset + spec_.dirty->dirty_bytes();
  return p;
}

void CommitEngine::set_speed(uint64_t bytes_per_second) {
  {
    std::lock_guard lock(mu_);
    speed_ = bytes_per_second;
    woken_ = true;
  }
  cv_.notify_all();
}

void CommitEngine::pause() {
  std::lock_guard lock(mu_);
  paused_ = true;
}

void CommitEngine::resume() {
  {
    std::lock_guard lock(mu_);
    paused_ = false;
  }
  cv_.notify_all();
}

void CommitEngine::finish(std::function<void(Result<std::unique_ptr<Image>>)> done) {
  {
    std::lock_guard lock(mu_);
    finish_ = std::move(done);
  }
  cv_.notify_all();
}

Result<void> CommitEngine::mark_allocated() {
  const uint64_t size = spec_.top->info().size_bytes;
  uint64_t off = 0;
  while (off < size) {
    {
      std::lock_guard lock(mu_);
      if (stop_) return {};
    }
    const Image::Allocation a = PVHOST_TRY(allocated_above(*spec_.top, spec_.base_in_chain, off, size - off));
    if (a.allocated) spec_.dirty->mark(off, a.bytes);
    off += a.bytes;
  }
  return {};
}

Result<void> CommitEngine::copy(uint64_t offset, uint64_t length) {
  std::span<std::byte> b = std::span(buf_).first(static_cast<size_t>(length));
  PVHOST_TRY_CTX(spec_.top->read_at(offset, b), "reading the top");
  PVHOST_TRY_CTX(spec_.base->write_at(offset, b), "writing the base");
  std::lock_guard lock(mu_);
  offset_ += length;
  return {};
}

Result<void> CommitEngine::copy_all_dirty() {
  while (auto run = spec_.dirty->take(0, kChunk)) PVHOST_TRY(copy(run->first, run->second));
  return with_context(spec_.base->flush_all(), "flushing the base");
}

void CommitEngine::throttle(uint64_t bytes) {
  std::unique_lock lock(mu_);
  if (speed_ == 0) {
    budget_bytes_ = 0;
    return;
  }
  const auto now = std::chrono::steady_clock::now();
  if (budget_bytes_ == 0) budget_start_ = now;
  budget_bytes_ += bytes;
  const uint64_t speed = speed_;
  const auto due = budget_start_ + std::chrono::microseconds(budget_bytes_ * 1000000 / speed);
  woken_ = false;
  // A speed change (woken_), a cancel or the final switch ends the wait early.
  cv_.wait_until(lock, due, [&] { return stop_ || finish_ || (woken_ && speed_ != speed); });
  if (speed_ != speed) budget_bytes_ = 0;
}

void CommitEngine::run() {
  auto idle_until_told = [this](std::unique_lock<std::mutex>& lock) {
    cv_.wait(lock, [&] { return stop_ || static_cast<bool>(finish_); });
  };
  auto finish_with = [this](std::unique_lock<std::mutex>& lock, Result<std::unique_ptr<Image>> r) {
    auto done = std::move(finish_);
    lock.unlock();
    done(std::move(r));
  };
  if (auto r = mark_allocated(); !r) {
    if (spec_.on_error) spec_.on_error(Error(r.error()).add_context("finding what the top owns"));
    std::unique_lock lock(mu_);
    idle_until_told(lock);
    if (!stop_) finish_with(lock, std::unexpected(std::move(r).error()));
    return;
  }
  for (;;) {
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || finish_ || !paused_; });
      if (stop_) return;
      if (finish_) {
        lock.unlock();
        auto r = copy_all_dirty();
        lock.lock();
        if (!r) return finish_with(lock, std::unexpected(std::move(r).error()));
        return finish_with(lock, std::move(spec_.base));
      }
      woken_ = false;
    }
    const auto run = spec_.dirty->take(cursor_, kChunk);
    if (!run) {
      bool first = false;
      {
        std::lock_guard lock(mu_);
        first = !ready_;
        ready_ = true;
      }
      if (first && spec_.on_ready) spec_.on_ready();
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || finish_ || woken_; });
      continue;
    }
    if (auto r = copy(run->first, run->second); !r) {
      spec_.dirty->mark(run->first, run->second);  // not copied: still owed
      log::error("commit {} -> {}: {}", spec_.top->path(), spec_.base->path(), r.error().describe());
      if (spec_.on_error) spec_.on_error(std::move(r).error());
      std::unique_lock lock(mu_);
      idle_until_told(lock);
      if (!stop_) finish_with(lock, fail(EIO, "the commit failed earlier"));
      return;
    }
    cursor_ = run->first + run->second;
    throttle(run->second);
  }
}

}  // namespace pvhost::block
