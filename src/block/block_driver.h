// The block layer's driver interface (ARCHITECTURE.md "Block layer"). A BlockDriver is one
// opened image (a node: "xvda-raw"); I/O goes through an IoQueue, one per I/O thread, so a
// driver never needs locks on its data path (the thread that owns the queue's EventLoop is
// the only one that submits to it and the one its completions run on).
//
// Formats other than raw (qcow2, vhd, nbd) plug in here: implement BlockDriver + IoQueue and
// add a case to open_image() (block_driver.cc).
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "src/error.h"
#include "src/event_loop.h"

namespace pvhost::block {

enum class ReadOnly { no, yes };
// O_DIRECT wish; a driver falls back to buffered I/O where the file system refuses it.
enum class DirectIo { no, yes };

struct OpenOptions {
  std::string path;
  ReadOnly read_only = ReadOnly::no;
  DirectIo direct = DirectIo::yes;
};

// Result of one operation: bytes transferred (>= 0) or -errno.
using Completion = std::function<void(int64_t result)>;

// One I/O thread's submission queue. Operations are queued by the calls below and handed to
// the kernel in one batch by submit(); completions run on the owning loop, followed by one
// call of the `batch_done` hook given to open_queue() per batch reaped.
// The iovec memory must stay valid until the completion runs.
class IoQueue {
 public:
  virtual ~IoQueue() = default;
  virtual void read(uint64_t offset, std::span<const iovec> iov, Completion done) = 0;
  virtual void write(uint64_t offset, std::span<const iovec> iov, Completion done) = 0;
  // fdatasync of everything completed before it was queued.
  virtual void flush(Completion done) = 0;
  // Deallocates [offset, offset+length); reads of the range return zeroes afterwards.
  virtual void discard(uint64_t offset, uint64_t length, Completion done) = 0;
  // Hands every queued operation to the kernel (one syscall).
  virtual void submit() = 0;
  // Waits for every operation in flight and runs the completions (used when draining).
  virtual void drain() = 0;
  [[nodiscard]] virtual unsigned in_flight() const = 0;
};

// What a driver can do, for the feature keys the backend advertises.
struct DriverInfo {
  std::string_view format;        // "raw"
  uint64_t size_bytes = 0;
  uint32_t logical_block_size = 512;
  uint32_t physical_block_size = 512;
  bool read_only = false;
  bool direct_io = false;         // O_DIRECT in use
  bool discard = false;
  bool secure_discard = false;
  uint32_t discard_granularity = 512;
};

class BlockDriver {
 public:
  virtual ~BlockDriver() = default;
  [[nodiscard]] virtual DriverInfo info() const = 0;
  [[nodiscard]] virtual const std::string& path() const = 0;
  // Re-reads the size (the image was grown or shrunk underneath); returns the new size.
  [[nodiscard]] virtual Result<uint64_t> refresh_size() = 0;
  // A queue for the thread owning `loop`, with at most `depth` operations in the kernel.
  [[nodiscard]] virtual Result<std::unique_ptr<IoQueue>> open_queue(EventLoop& loop, unsigned depth,
                                                                    std::function<void()> batch_done) = 0;
};

// Image formats this build can open.
enum class Format { raw, qcow2, vpc, nbd };
[[nodiscard]] std::string_view to_string(Format f);
// "raw" (also "aio", QEMU's legacy name for raw), "qcow2", "vpc"/"vhd", "nbd" -> Format;
// anything else is a clear error naming the format.
[[nodiscard]] Result<Format> parse_format(std::string_view name);

[[nodiscard]] Result<std::unique_ptr<BlockDriver>> open_image(Format format, const OpenOptions& options);

}  // namespace pvhost::block
