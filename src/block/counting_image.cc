#include "src/block/counting_image.h"

#include <algorithm>
#include <cctype>
#include <chrono>

#include <fmt/format.h>

namespace pvhost::block {
namespace {

void raise_to(std::atomic<uint64_t>& a, uint64_t v) {
  uint64_t cur = a.load(std::memory_order_relaxed);
  while (v > cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

}  // namespace

uint64_t monotonic_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

void NodeCounters::completed(IoClass c, uint64_t bytes, uint64_t ns, bool ok) {
  Atomic& a = cls_[static_cast<size_t>(c)];
  // QEMU's block_acct_failed: a failed operation counts only as failed_*.
  if (!ok) {
    a.failed.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  a.operations.fetch_add(1, std::memory_order_relaxed);
  a.bytes.fetch_add(bytes, std::memory_order_relaxed);
  a.total_time_ns.fetch_add(ns, std::memory_order_relaxed);
}

void NodeCounters::wrote_up_to(uint64_t end) {
  raise_to(wr_highest_, end);
}

NodeIoStats NodeCounters::snapshot() const {
  NodeIoStats s;
  for (size_t i = 0; i < kIoClasses; ++i) {
    s.cls[i].operations = cls_[i].operations.load(std::memory_order_relaxed);
    s.cls[i].bytes = cls_[i].bytes.load(std::memory_order_relaxed);
    s.cls[i].total_time_ns = cls_[i].total_time_ns.load(std::memory_order_relaxed);
    s.cls[i].failed = cls_[i].failed.load(std::memory_order_relaxed);
  }
  s.wr_highest_offset = wr_highest_.load(std::memory_order_relaxed);
  return s;
}

CountingImage::CountingImage(std::unique_ptr<Image> inner) : inner_(std::move(inner)) {}

Result<void> CountingImage::read_at(uint64_t offset, std::span<std::byte> buf) {
  return counted(*counters_, IoClass::rd, buf.size(), [&] { return inner_->read_at(offset, buf); });
}

Result<void> CountingImage::write_at(uint64_t offset, std::span<const std::byte> buf) {
  PVHOST_TRY(counted(*counters_, IoClass::wr, buf.size(), [&] { return inner_->write_at(offset, buf); }));
  counters_->wrote_up_to(offset + buf.size());
  return {};
}

Result<void> CountingImage::flush_all() {
  return counted(*counters_, IoClass::flush, 0, [&] { return inner_->flush_all(); });
}

Result<void> CountingImage::discard_at(uint64_t offset, uint64_t length) {
  return counted(*counters_, IoClass::unmap, length, [&] { return inner_->discard_at(offset, length); });
}

std::unique_ptr<Image> count_io(std::unique_ptr<Image> inner) {
  if (!inner || dynamic_cast<CountingImage*>(inner.get()) != nullptr) return inner;
  return std::make_unique<CountingImage>(std::move(inner));
}

Image* unwrap_counting(Image* image) {
  while (auto* c = dynamic_cast<CountingImage*>(image)) image = &c->inner();
  return image;
}

CountingImage* as_counting(BlockDriver* driver) {
  return dynamic_cast<CountingImage*>(driver);
}
const CountingImage* as_counting(const BlockDriver* driver) {
  return dynamic_cast<const CountingImage*>(driver);
}

std::string generate_node_name() {
  static std::atomic<uint64_t> next{1};
  return fmt::format("#block{:03}", next.fetch_add(1, std::memory_order_relaxed));
}

bool node_name_wellformed(std::string_view name) {
  if (name.empty() || std::isalpha(static_cast<unsigned char>(name[0])) == 0) return false;
  return std::all_of(name.begin(), name.end(), [](char ch) {
    return std::isalnum(static_cast<unsigned char>(ch)) != 0 || ch == '-' || ch == '.' || ch == '_';
  });
}

}  // namespace pvhost::block
