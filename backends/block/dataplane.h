// The qdisk data plane: one RingQueue per blkif queue, each in an I/O thread of its own
// (QEMU's xen-block dataplane). It maps the ring, binds the event channel, consumes
// requests (copy once -> parse -> execute), moves data with batched grant copies (or through
// the persistent-grant cache when the frontend negotiated feature-persistent), does the I/O
// through the block driver's io_uring queue, and answers, possibly out of order.
//
// Threading: every member is touched on the I/O thread only, except the constructor/
// destructor (run on the main thread, handing work over with run_sync) and the atomics in
// QueueInfo. A protocol violation is reported through `on_violation`, called on the I/O
// thread; the device posts it to the main loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backends/block/request.h"
#include "backends/block/stats.h"
#include "hw/xen/xen.h"
#include "src/block/block_driver.h"
#include "src/event_loop.h"

namespace pvhost::blkif {

struct QueueParams {
  xen::Xen* xen = nullptr;
  DomId frontend;
  unsigned index = 0;
  std::vector<GrantRef> ring_refs;
  Port remote_port;
  Abi abi = kNativeAbi;
  bool persistent = false;
  size_t persistent_cap = 1024;  // mapped grants kept per queue (LRU beyond that)
  Limits limits;
  bool paused = false;
  block::BlockDriver* driver = nullptr;
  BlockStats* stats = nullptr;
  std::string name;  // "qdisk dom1/51712 q0"
  std::function<void(Error)> on_violation;
};

// Observable from any thread.
struct QueueInfo {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint32_t> in_flight{0};
  std::atomic<uint64_t> notifications_sent{0};
  std::atomic<uint64_t> wakeups{0};
  std::atomic<uint32_t> persistent_grants{0};
  std::atomic<bool> violated{false};
};

class RingQueue {
 public:
  [[nodiscard]] static Result<std::unique_ptr<RingQueue>> start(QueueParams params);
  // Stops consuming, drains in-flight I/O (answering it), unbinds, unmaps; joins the thread.
  ~RingQueue();
  RingQueue(const RingQueue&) = delete;
  RingQueue& operator=(const RingQueue&) = delete;

  // Stop consuming; `drained` runs on the I/O thread once nothing is in flight.
  void pause(std::function<void()> drained);
  void resume();
  void set_limits(const Limits& limits);
  // While paused and drained: submit from now on to `driver` (a snapshot overlay). Runs
  // on the I/O thread and waits for it.
  [[nodiscard]] Result<void> switch_driver(block::BlockDriver* driver);

  [[nodiscard]] const QueueInfo& info() const { return *info_; }
  [[nodiscard]] Port local_port() const { return local_port_; }
  [[nodiscard]] uint32_t ring_size() const { return ring_size_; }
  [[nodiscard]] size_t ring_pages() const { return params_.ring_refs.size(); }

  class Worker;  // the I/O-thread state (dataplane.cc)

 private:
  RingQueue() = default;
  QueueParams params_;
  std::unique_ptr<QueueInfo> info_ = std::make_unique<QueueInfo>();
  std::unique_ptr<LoopThread> thread_;
  std::unique_ptr<Worker> worker_;
  Port local_port_;
  uint32_t ring_size_ = 0;
};

}  // namespace pvhost::blkif
