#include "backends/block/stats.h"

namespace pvhost::blkif {

void BlockStats::completed(StatClass c, uint64_t bytes, uint64_t ns, bool ok) {
  auto& a = cls_[static_cast<size_t>(c)];
  if (!ok) {
    a.failed.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  a.operations.fetch_add(1, std::memory_order_relaxed);
  a.bytes.fetch_add(bytes, std::memory_order_relaxed);
  a.total_time_ns.fetch_add(ns, std::memory_order_relaxed);
}

void BlockStats::invalid(StatClass c) { cls_[static_cast<size_t>(c)].invalid.fetch_add(1, std::memory_order_relaxed); }

void BlockStats::note_depth(uint64_t depth) {
  uint64_t cur = max_depth_.load(std::memory_order_relaxed);
  while (depth > cur && !max_depth_.compare_exchange_weak(cur, depth, std::memory_order_relaxed)) {
  }
}

void BlockStats::wrote_up_to(uint64_t offset) {
  uint64_t cur = wr_highest_.load(std::memory_order_relaxed);
  while (offset > cur && !wr_highest_.compare_exchange_weak(cur, offset, std::memory_order_relaxed)) {
  }
}

BlockStatsSnapshot BlockStats::snapshot() const {
  BlockStatsSnapshot s;
  for (size_t i = 0; i < kStatClasses; ++i) {
    s.cls[i].operations = cls_[i].operations.load(std::memory_order_relaxed);
    s.cls[i].bytes = cls_[i].bytes.load(std::memory_order_relaxed);
    s.cls[i].total_time_ns = cls_[i].total_time_ns.load(std::memory_order_relaxed);
    s.cls[i].failed = cls_[i].failed.load(std::memory_order_relaxed);
    s.cls[i].invalid = cls_[i].invalid.load(std::memory_order_relaxed);
  }
  s.unsupported = unsupported_.load(std::memory_order_relaxed);
  s.in_flight = in_flight_.load(std::memory_order_relaxed);
  s.max_queue_depth = max_depth_.load(std::memory_order_relaxed);
  s.wr_highest_offset = wr_highest_.load(std::memory_order_relaxed);
  return s;
}

nlohmann::json BlockStatsSnapshot::qmp_stats() const {
  const auto& rd = of(StatClass::rd);
  const auto& wr = of(StatClass::wr);
  const auto& fl = of(StatClass::flush);
  const auto& un = of(StatClass::unmap);
  return {
      {"rd_bytes", rd.bytes},
      {"wr_bytes", wr.bytes},
      {"unmap_bytes", un.bytes},
      {"rd_operations", rd.operations},
      {"wr_operations", wr.operations},
      {"flush_operations", fl.operations},
      {"unmap_operations", un.operations},
      {"rd_total_time_ns", rd.total_time_ns},
      {"wr_total_time_ns", wr.total_time_ns},
      {"flush_total_time_ns", fl.total_time_ns},
      {"unmap_total_time_ns", un.total_time_ns},
      {"wr_highest_offset", wr_highest_offset},
      {"rd_merged", 0},
      {"wr_merged", 0},
      {"unmap_merged", 0},
      {"failed_rd_operations", rd.failed},
      {"failed_wr_operations", wr.failed},
      {"failed_flush_operations", fl.failed},
      {"failed_unmap_operations", un.failed},
      {"invalid_rd_operations", rd.invalid},
      {"invalid_wr_operations", wr.invalid},
      {"invalid_flush_operations", fl.invalid},
      {"invalid_unmap_operations", un.invalid},
      {"account_invalid", true},
      {"account_failed", true},
      {"timed_stats", nlohmann::json::array()},
  };
}

}  // namespace pvhost::blkif
