// block-commit of the active layer (qapi/block-core.json "block-commit"; QEMU implements
// it as a mirror of the top into the base): copy everything the layers above `base` own
// into `base` while the guest keeps writing to the top, track what the guest writes
// meanwhile, copy that again, and report "ready" once the base holds the whole disk. The
// switch to the base (block-job-complete) is the device's part: with the guest quiesced,
// finish() copies what is still dirty and flushes the base; then the device submits to
// the base from then on (backends/block/qdisk.cc).
//
// Threads: the copy runs on a worker thread of its own, with synchronous Image calls
// (every Image takes its own mutex, so the guest's I/O threads may use the same top image
// at the same time). Guest writes are seen through a TrackingDriver wrapped around the top
// driver: a write or discard marks its range dirty when it completes, after the data is in
// the top, so the copy that follows the mark reads the new data. A mark made before the
// worker clears a range is consumed with it; one made after is copied again.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "src/block/formats.h"

namespace pvhost::block {

// Which granules of a disk changed: marked from the guest's I/O threads, taken by the
// commit worker. Granules, not bytes: a range marks every granule it touches.
class DirtyBitmap {
 public:
  DirtyBitmap(uint64_t size_bytes, uint64_t granularity);
  void mark(uint64_t offset, uint64_t length);
  // Clears and returns the first run of dirty granules at or after `from` (wrapping to the
  // start), at most `max_bytes` long and clamped to the disk size: {offset, length}.
  [[nodiscard]] std::optional<std::pair<uint64_t, uint64_t>> take(uint64_t from, uint64_t max_bytes);
  [[nodiscard]] uint64_t dirty_bytes() const;
  [[nodiscard]] uint64_t granularity() const { return gran_; }
  // Called after every mark, under the bitmap's lock (so it is never called once it has
  // been replaced): the commit worker's wake-up. Must not call back into the bitmap.
  void set_on_mark(std::function<void()> fn);

 private:
  [[nodiscard]] bool test(uint64_t g) const { return (bits_[g / 64] >> (g % 64)) & 1; }
  mutable std::mutex mu_;
  const uint64_t size_;
  const uint64_t gran_;
  const uint64_t granules_;
  std::vector<uint64_t> bits_;  // guarded by mu_
  uint64_t count_ = 0;          // dirty granules; guarded by mu_
  std::function<void()> on_mark_;  // guarded by mu_
};

// A BlockDriver that is `inner` plus dirty tracking: writes and discards mark their range
// in `dirty` when they complete (successfully or not: a failed write may have written part).
[[nodiscard]] std::unique_ptr<BlockDriver> make_tracking_driver(BlockDriver& inner, std::shared_ptr<DirtyBitmap> dirty);

// Whether the layers from `top` down to (not including) `base` own the bytes at `offset`:
// the run of `bytes` from `offset` sharing the answer (QEMU's bdrv_is_allocated_above).
// `base` must be in top's chain (or null: down to the bottom).
[[nodiscard]] Result<Image::Allocation> allocated_above(Image& top, const Image* base, uint64_t offset, uint64_t length);

struct CommitProgress {
  uint64_t offset = 0;  // bytes copied so far
  uint64_t len = 0;     // offset + what is known to remain
  bool ready = false;   // the base holds the whole disk (until the guest writes again)
  bool paused = false;
  uint64_t speed = 0;
};

struct CommitSpec {
  Image* top = nullptr;             // the active layer; the guest keeps using it
  const Image* base_in_chain = nullptr;  // the base as top's chain holds it (read-only)
  std::unique_ptr<Image> base;      // the same file opened read-write: the copy goes here
  std::shared_ptr<DirtyBitmap> dirty;  // the one the TrackingDriver marks
  uint64_t speed = 0;               // bytes per second, 0: unlimited
  // On the worker thread: the first time nothing is left to copy; and when the copy fails
  // (the job is over then; the top is untouched and still the guest's disk).
  std::function<void()> on_ready;
  std::function<void(Error)> on_error;
};

class CommitEngine {
 public:
  // Checks the spec (sizes, formats), then starts the worker: it marks what the layers
  // above the base own and copies it.
  [[nodiscard]] static Result<std::unique_ptr<CommitEngine>> start(CommitSpec spec);
  // Stops the worker (a cancel) and joins it.
  ~CommitEngine();
  CommitEngine(const CommitEngine&) = delete;
  CommitEngine& operator=(const CommitEngine&) = delete;

  [[nodiscard]] CommitProgress progress() const;
  void set_speed(uint64_t bytes_per_second);
  void pause();
  void resume();
  // With the guest's writes stopped (the device quiesced): copies what is still dirty and
  // flushes the base, on the worker thread; `done` runs there with the read-write base (to
  // be closed before the base is reopened as the guest's disk) or the error.
  void finish(std::function<void(Result<std::unique_ptr<Image>>)> done);

 private:
  explicit CommitEngine(CommitSpec spec) : spec_(std::move(spec)) {}
  void run();
  [[nodiscard]] Result<void> mark_allocated();
  [[nodiscard]] Result<void> copy(uint64_t offset, uint64_t length);
  [[nodiscard]] Result<void> copy_all_dirty();
  void throttle(uint64_t bytes);
  void wake();

  CommitSpec spec_;
  std::vector<std::byte> buf_;  // worker thread only
  uint64_t cursor_ = 0;         // worker thread only
  mutable std::mutex mu_;
  std::condition_variable cv_;
  // guarded by mu_:
  bool stop_ = false;
  bool paused_ = false;
  bool ready_ = false;
  bool woken_ = false;
  uint64_t offset_ = 0;
  uint64_t speed_ = 0;
  std::function<void(Result<std::unique_ptr<Image>>)> finish_;
  std::thread worker_;
  std::chrono::steady_clock::time_point budget_start_{};
  uint64_t budget_bytes_ = 0;  // worker thread only
};

}  // namespace pvhost::block
