// Per-node I/O counters (issue #7): what query-blockstats reports for one node of a chain,
// with QEMU's BlockDeviceStats names (qapi/block-core.json). A format layer counts the
// guest's view of it (CountingImage, counting_image.h); the file under it counts what the
// format driver read and wrote there, metadata included (ImageFile, formats.h): QEMU's
// protocol node, reported as "parent".
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>

namespace pvhost::block {

// QEMU's accounting classes (BlockAcctType): read, write, flush, unmap (= discard).
enum class IoClass { rd = 0, wr, flush, unmap };
inline constexpr size_t kIoClasses = 4;

struct NodeIoStats {
  struct Class {
    uint64_t operations = 0;
    uint64_t bytes = 0;
    uint64_t total_time_ns = 0;
    uint64_t failed = 0;
  };
  std::array<Class, kIoClasses> cls{};
  uint64_t wr_highest_offset = 0;  // the offset after the greatest byte written
  [[nodiscard]] const Class& of(IoClass c) const { return cls[static_cast<size_t>(c)]; }
};

// Updated from whichever thread does the I/O (I/O threads, the commit job's thread) with
// relaxed atomics: they are counters, nothing is ordered by them. Read on the main thread.
class NodeCounters {
 public:
  void completed(IoClass c, uint64_t bytes, uint64_t ns, bool ok);
  void wrote_up_to(uint64_t end);
  [[nodiscard]] NodeIoStats snapshot() const;

 private:
  struct Atomic {
    std::atomic<uint64_t> operations{0}, bytes{0}, total_time_ns{0}, failed{0};
  };
  std::array<Atomic, kIoClasses> cls_;
  std::atomic<uint64_t> wr_highest_{0};
};

// Nanoseconds on the monotonic clock, for the counters' total_time_ns.
[[nodiscard]] uint64_t monotonic_ns();

// Runs `op` (returning a Result) and counts it on `c` as one operation of class `cls`
// moving `bytes`, timed, failed if the Result is an error.
template <class Op>
auto counted(NodeCounters& c, IoClass cls, uint64_t bytes, Op&& op) {
  const uint64_t t0 = monotonic_ns();
  auto r = static_cast<Op&&>(op)();
  c.completed(cls, bytes, monotonic_ns() - t0, r.has_value());
  return r;
}

}  // namespace pvhost::block
