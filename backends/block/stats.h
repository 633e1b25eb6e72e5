// Per-device block statistics: the counters QEMU keeps per BlockBackend (BlockAcctStats),
// with its QMP field names, so query-blockstats (libxenstat/xentop read rd_bytes,
// wr_bytes, rd_operations, wr_operations) and the tests read the same numbers.
// Updated from the I/O threads with relaxed atomics (counters only; nothing is ordered by
// them), read from the main thread.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>

#include <nlohmann/json.hpp>

#include "backends/block/request.h"

namespace pvhost::blkif {

// QEMU's accounting classes: read, write, flush, unmap (= discard).
enum class StatClass { rd = 0, wr, flush, unmap };
inline constexpr size_t kStatClasses = 4;
[[nodiscard]] constexpr StatClass stat_class(Op op) {
  switch (op) {
    case Op::read:
      return StatClass::rd;
    case Op::write:
    case Op::write_barrier:
      return StatClass::wr;
    case Op::flush:
      return StatClass::flush;
    case Op::discard:
      return StatClass::unmap;
  }
  return StatClass::rd;
}

struct ClassStats {
  uint64_t operations = 0;
  uint64_t bytes = 0;
  uint64_t total_time_ns = 0;
  uint64_t failed = 0;
  uint64_t invalid = 0;
};

// A consistent-enough copy for reporting.
struct BlockStatsSnapshot {
  std::array<ClassStats, kStatClasses> cls{};
  uint64_t unsupported = 0;  // answered EOPNOTSUPP
  uint64_t in_flight = 0;
  uint64_t max_queue_depth = 0;  // highest in-flight count seen on one queue
  uint64_t wr_highest_offset = 0;
  [[nodiscard]] const ClassStats& of(StatClass c) const { return cls[static_cast<size_t>(c)]; }
  // QEMU's BlockDeviceStats object.
  [[nodiscard]] nlohmann::json qmp_stats() const;
};

class BlockStats {
 public:
  void completed(StatClass c, uint64_t bytes, uint64_t ns, bool ok);
  void invalid(StatClass c);
  void unsupported() { unsupported_.fetch_add(1, std::memory_order_relaxed); }
  void started() { note_depth(in_flight_.fetch_add(1, std::memory_order_relaxed) + 1); }
  void finished() { in_flight_.fetch_sub(1, std::memory_order_relaxed); }
  void wrote_up_to(uint64_t offset);
  void note_depth(uint64_t depth);
  [[nodiscard]] BlockStatsSnapshot snapshot() const;

 private:
  struct Atomic {
    std::atomic<uint64_t> operations{0}, bytes{0}, total_time_ns{0}, failed{0}, invalid{0};
  };
  std::array<Atomic, kStatClasses> cls_;
  std::atomic<uint64_t> unsupported_{0};
  std::atomic<uint64_t> in_flight_{0};
  std::atomic<uint64_t> max_depth_{0};
  std::atomic<uint64_t> wr_highest_{0};
};

}  // namespace pvhost::blkif
