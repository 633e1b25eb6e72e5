// The host-side buffer between the `out` ring and the host end (pty, socket, file).
//
// The guest's output is always drained from the ring (a console must never stall the
// guest), so a host end that is slower than the guest, or absent, is absorbed here, up to
// the frontend's `limit` (console keys, docs/misc/console.txt). Past it we do what QEMU's
// xen_console and xenconsoled's buffer_append do: discard the middle. With `over` bytes
// too many, the `over` bytes just before the limit mark go, so the reader keeps the oldest
// limit-over bytes (what was there first: the boot log) and the newest `over` bytes (what
// is happening now). Unlike QEMU we count only unsent bytes against the limit, and when
// `over` reaches the limit itself (a tiny limit) only the newest `limit` bytes are kept.
// Every discarded byte is counted (`dropped`, exposed in query-xen-backends).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace pvhost::console {

class OutputBuffer {
 public:
  // `limit` > 0: the most unsent bytes held.
  explicit OutputBuffer(size_t limit) : limit_(limit == 0 ? 1 : limit) {}

  void append(std::span<const std::byte> bytes);
  // The oldest unsent bytes (contiguous).
  [[nodiscard]] std::span<const std::byte> front() const {
    return {data_.data() + head_, data_.size() - head_};
  }
  // Marks `n` bytes of front() as sent.
  void consume(size_t n);
  void clear();

  [[nodiscard]] size_t size() const { return data_.size() - head_; }
  [[nodiscard]] bool empty() const { return size() == 0; }
  [[nodiscard]] size_t limit() const { return limit_; }
  void set_limit(size_t limit);
  [[nodiscard]] uint64_t dropped() const { return dropped_; }

 private:
  void enforce_limit();

  size_t limit_;
  std::vector<std::byte> data_;
  size_t head_ = 0;  // bytes of data_ already sent
  uint64_t dropped_ = 0;
};

}  // namespace pvhost::console
