#include "backends/console/output_buffer.h"

#include <algorithm>

namespace pvhost::console {

void OutputBuffer::append(std::span<const std::byte> bytes) {
  if (bytes.empty()) return;
  // Compact once the sent prefix dominates, so memory stays bounded by about 2 x limit.
  if (head_ > 0 && head_ >= data_.size() / 2) {
    data_.erase(data_.begin(), data_.begin() + static_cast<std::ptrdiff_t>(head_));
    head_ = 0;
  }
  data_.insert(data_.end(), bytes.begin(), bytes.end());
  enforce_limit();
}

void OutputBuffer::enforce_limit() {
  const size_t pending = size();
  if (pending <= limit_) return;
  const size_t over = pending - limit_;
  auto unsent = data_.begin() + static_cast<std::ptrdiff_t>(head_);
  if (over >= limit_) {
    // Nothing of the old data would survive: keep the newest `limit_` bytes.
    data_.erase(unsent, data_.end() - static_cast<std::ptrdiff_t>(limit_));
  } else {
    // Drop [limit - over, limit) of the unsent bytes; [limit, pending) moves down.
    auto first = unsent + static_cast<std::ptrdiff_t>(limit_ - over);
    data_.erase(first, first + static_cast<std::ptrdiff_t>(over));
  }
  dropped_ += over;
}

void OutputBuffer::consume(size_t n) {
  head_ += std::min(n, size());
  if (head_ == data_.size()) clear();
}

void OutputBuffer::clear() {
  data_.clear();
  head_ = 0;
}

void OutputBuffer::set_limit(size_t limit) {
  limit_ = limit == 0 ? 1 : limit;
  enforce_limit();
}

}  // namespace pvhost::console
