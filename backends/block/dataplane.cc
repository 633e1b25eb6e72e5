#include "backends/block/dataplane.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <list>
#include <unordered_map>

#include <fmt/format.h>

#include "backends/block/ring.h"
#include "src/log.h"

namespace pvhost::blkif {
namespace {

struct AlignedFree {
  void operator()(std::byte* p) const noexcept { std::free(p); }
};
using Buffer = std::unique_ptr<std::byte, AlignedFree>;

// Bounce buffers are page aligned so O_DIRECT accepts them.
Buffer alloc_buffer(size_t bytes) {
  const size_t rounded = (bytes + kPageSize - 1) / kPageSize * kPageSize;
  return Buffer(static_cast<std::byte*>(std::aligned_alloc(kPageSize, rounded == 0 ? kPageSize : rounded)));
}

uint64_t now_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

// Persistent grants (blkif.h feature-persistent): each granted page mapped once and kept,
// least recently used evicted beyond `cap`. The misses of one request are mapped with one
// map_refs call (one hypervisor round trip, not one per page); the pages of such a batch
// share that mapping, which goes away when the last of them is evicted. Data is always
// bounced through our own buffers, so a mapping is only used for the duration of one
// memcpy and can be evicted any time.
class GrantCache {
 public:
  GrantCache(xen::GrantTables& gt, DomId dom, size_t cap) : gt_(gt), dom_(dom), cap_(cap) {}

  // Maps every ref of `refs` not yet mapped, in one call when possible. A failure here is
  // not reported: get() then maps the bad ref alone and reports it.
  void prefetch(std::span<const Seg> segs) {
    std::vector<GrantRef> miss;
    for (const Seg& s : segs)
      if (!map_.contains(s.gref.value()) &&
          std::find(miss.begin(), miss.end(), s.gref) == miss.end())
        miss.push_back(s.gref);
    if (miss.size() < 2) return;
    auto m = gt_.map_refs(dom_, miss, xen::Access::read_write);
    if (!m) return;
    auto shared = std::make_shared<xen::GuestMapping>(std::move(*m));
    for (size_t i = 0; i < miss.size(); ++i) insert(miss[i].value(), shared, shared->data() + i * kPageSize);
  }

  // The page for `ref`, mapped read-write (the frontend grants persistent pages writable).
  Result<std::byte*> get(GrantRef ref) {
    if (auto it = map_.find(ref.value()); it != map_.end()) {
      lru_.splice(lru_.begin(), lru_, it->second.pos);
      return it->second.page;
    }
    const GrantRef one[1] = {ref};
    auto m = gt_.map_refs(dom_, one, xen::Access::read_write);
    if (!m) return std::unexpected(std::move(m).error());
    auto shared = std::make_shared<xen::GuestMapping>(std::move(*m));
    return insert(ref.value(), shared, shared->data());
  }
  [[nodiscard]] size_t size() const { return map_.size(); }
  void clear() {
    map_.clear();
    lru_.clear();
  }

 private:
  struct Entry {
    std::shared_ptr<xen::GuestMapping> mapping;  // possibly shared with refs mapped alongside
    std::byte* page;
    std::list<uint32_t>::iterator pos;
  };
  std::byte* insert(uint32_t ref, std::shared_ptr<xen::GuestMapping> mapping, std::byte* page) {
    while (map_.size() >= cap_ && !lru_.empty()) {
      map_.erase(lru_.back());
      lru_.pop_back();
    }
    lru_.push_front(ref);
    map_[ref] = Entry{std::move(mapping), page, lru_.begin()};
    return page;
  }

  xen::GrantTables& gt_;
  DomId dom_;
  size_t cap_;
  std::unordered_map<uint32_t, Entry> map_;
  std::list<uint32_t> lru_;  // most recent first
};

}  // namespace

class RingQueue::Worker {
 public:
  Worker(QueueParams& p, QueueInfo& info, EventLoop& loop)
      : p_(p), info_(info), loop_(loop), limits_(p.limits), paused_(p.paused),
        cache_(p.xen->grants(), p.frontend, p.persistent_cap) {}

  // Paused with nothing in flight (the caller quiesced us), so no completion can still
  // refer to the old queue.
  Result<void> switch_driver(block::BlockDriver* driver) {
    if (io_ && io_->in_flight() != 0) return fail(EBUSY, "switching drivers with I/O in flight");
    auto q = PVHOST_TRY(driver->open_queue(loop_, ring_.size(), [this] { after_completions(); }));
    io_ = std::move(q);
    p_.driver = driver;
    return {};
  }

  Result<void> open() {
    auto& gt = p_.xen->grants();
    ring_map_ = PVHOST_TRY_CTX(gt.map_refs(p_.frontend, p_.ring_refs, xen::Access::read_write), "mapping the ring");
    ring_ = SharedRing(ring_map_.data(), ring_map_.size(), p_.abi);
    if (ring_.size() == 0) return fail(EINVAL, "ring too small");
    // BACK_RING_INIT: a fresh ring starts at index 0 on both sides.
    st_ = BackRingState{};
    evtchn_ = PVHOST_TRY_CTX(p_.xen->open_event_channels(), "event channels");
    Port port = PVHOST_TRY_CTX(evtchn_->bind_interdomain(p_.frontend, p_.remote_port),
                               fmt::format("binding event channel {}", p_.remote_port));
    binding_ = xen::PortBinding(evtchn_.get(), port);
    io_ = PVHOST_TRY(p_.driver->open_queue(loop_, ring_.size(), [this] { after_completions(); }));
    watch_ = PVHOST_TRY(loop_.watch_fd(evtchn_->fd(), EPOLLIN, [this](uint32_t) { on_event(); }));
    // Requests may already be waiting (a frontend that queued before we bound).
    loop_.defer([this, alive = std::weak_ptr<bool>(alive_)] {
      if (alive.lock()) process_ring();
    });
    return {};
  }

  void close() {
    if (closed_) return;
    closed_ = true;
    stopping_ = true;
    if (io_) io_->drain();  // runs the completions: every consumed request gets its answer
    fail_barrier("device disconnecting");
    if (ring_map_.valid()) push();
    watch_.reset();
    binding_.reset();
    evtchn_.reset();
    io_.reset();
    cache_.clear();
    ring_map_.reset();  // nothing is written into guest memory after this
    info_.in_flight.store(0, std::memory_order_relaxed);
  }

  [[nodiscard]] Port port() const { return binding_.port(); }
  [[nodiscard]] uint32_t size() const { return ring_.size(); }

  void pause(std::function<void()> drained) {
    paused_ = true;
    drained_ = std::move(drained);
    check_drained();
  }
  void resume() {
    paused_ = false;
    drained_ = nullptr;
    process_ring();
  }
  void set_limits(const Limits& l) { limits_ = l; }

 private:
  enum class Phase { data, flush_after };
  struct Pending {
    Request req;
    Buffer buf;
    uint64_t start_ns = 0;
    int16_t status = BLKIF_RSP_OKAY;
    Phase phase = Phase::data;
  };

  void on_event() {
    info_.wakeups.fetch_add(1, std::memory_order_relaxed);
    for (;;) {
      auto p = evtchn_->pending();
      if (!p || !*p) break;
      if (auto r = evtchn_->unmask(**p); !r)
        PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: unmask: {}", p_.name, r.error().describe());
    }
    process_ring();
  }

  void process_ring() {
    if (stopping_ || paused_ || violated_ || !ring_map_.valid()) return;
    bool more = true;
    while (more) {
      const RingIndex prod = ring_.req_prod();
      const auto w = request_window(prod, st_.req_cons, ring_.size());
      if (w.violation) {
        violation(fmt::format("producer index {} is more than a ring ({} entries) ahead of consumer index {}", prod,
                              ring_.size(), st_.req_cons));
        return;
      }
      while (st_.req_cons != prod && !barrier_ && !barrier_running_ && consumable(st_.req_cons, st_.rsp_prod_pvt, ring_.size()) > 0) {
        std::array<std::byte, kMaxEntrySize> entry{};
        ring_.copy_request(st_.req_cons, entry);
        ++st_.req_cons;
        info_.requests.fetch_add(1, std::memory_order_relaxed);
        handle(entry);
      }
      dispatch_writes();
      io_->submit();
      settle();
      if (st_.req_cons != prod) break;  // stalled (barrier or ring full): completions resume us
      more = final_check_for_requests(ring_, st_);
    }
  }

  void handle(std::span<const std::byte> entry) {
    auto parsed = parse_request(entry, p_.abi, limits_);
    if (!parsed) {
      reject(parsed.error());
      return;
    }
    Request req = std::move(*parsed);
    if (req.needs_indirect() && !fetch_indirect(req)) return;
    auto p = std::make_unique<Pending>();
    p->req = std::move(req);
    if (p->req.op == Op::write_barrier) {
      // Drain before: the barrier runs once everything consumed before it completed.
      barrier_ = std::move(p);
      if (outstanding_ == 0) run_barrier();
      return;
    }
    start(std::move(p));
  }

  void reject(const Rejection& r) {
    if (r.kind == Rejection::Kind::unsupported)
      p_.stats->unsupported();
    else
      p_.stats->invalid(r.op ? stat_class(*r.op) : StatClass::rd);
    PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: request id {:#x} op {}: {}", p_.name, r.id, r.operation, r.reason);
    respond(r.id, r.operation, r.status());
  }

  // Copies the segment descriptors out of the indirect pages (one batched grant copy).
  bool fetch_indirect(Request& req) {
    std::vector<std::byte> desc(req.indirect_pages.size() * kPageSize);
    std::vector<xen::GrantCopySegment> segs;
    for (size_t i = 0; i < req.indirect_pages.size(); ++i) {
      const size_t n = indirect_bytes_in_page(req, i);
      segs.push_back({xen::GrantCopySegment::Direction::from_guest, p_.frontend, req.indirect_pages[i], 0,
                      static_cast<uint16_t>(n), desc.data() + i * kPageSize});
    }
    bool ok = static_cast<bool>(p_.xen->grants().copy(segs));
    for (const auto& s : segs) ok = ok && s.status == 0;
    if (!ok) {
      p_.stats->completed(stat_class(req.op), 0, 0, false);
      PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: request id {:#x}: indirect page not readable", p_.name, req.id);
      respond(req.id, req.operation, BLKIF_RSP_ERROR);
      return false;
    }
    // The descriptors are contiguous per page; pack them for the parser.
    std::vector<std::byte> packed;
    for (size_t i = 0; i < req.indirect_pages.size(); ++i) {
      const size_t n = indirect_bytes_in_page(req, i);
      packed.insert(packed.end(), desc.begin() + static_cast<ptrdiff_t>(i * kPageSize),
                    desc.begin() + static_cast<ptrdiff_t>(i * kPageSize + n));
    }
    if (auto r = complete_indirect(req, packed, limits_); !r) {
      reject(r.error());
      return false;
    }
    return true;
  }

  void start(std::unique_ptr<Pending> p) {
    p->start_ns = now_ns();
    ++outstanding_;
    info_.in_flight.store(outstanding_, std::memory_order_relaxed);
    p_.stats->started();
    Pending* raw = p.get();
    live_.emplace(raw, std::move(p));
    const uint64_t offset = raw->req.sector << kSectorShift;
    auto done = [this, raw](int64_t r) { on_io_done(raw, r); };
    switch (raw->req.op) {
      case Op::read: {
        raw->buf = take_buffer(raw->req.bytes());
        iovec iov{raw->buf.get(), raw->req.bytes()};
        io_->read(offset, {&iov, 1}, done);
        break;
      }
      case Op::write:
      case Op::write_barrier:
        raw->buf = take_buffer(raw->req.bytes());
        gather(*raw);
        pending_writes_.push_back(raw);
        break;
      case Op::flush:
        io_->flush(done);
        break;
      case Op::discard:
        io_->discard(offset, raw->req.bytes(), done);
        break;
    }
  }

  // Write data into the bounce buffer: memcpy from persistent mappings, the rest queued for
  // one batched grant copy in dispatch_writes().
  void gather(Pending& p) {
    if (p_.persistent) cache_.prefetch(p.req.segments);
    size_t off = 0;
    for (const Seg& s : p.req.segments) {
      std::byte* dst = p.buf.get() + off;
      off += s.length;
      if (p_.persistent) {
        auto page = cache_.get(s.gref);
        if (page) {
          std::memcpy(dst, *page + s.offset, s.length);
          continue;
        }
        p.status = BLKIF_RSP_ERROR;  // not granted (or not writable) to us
        continue;
      }
      copy_batch_.push_back({xen::GrantCopySegment::Direction::from_guest, p_.frontend, s.gref, s.offset, s.length, dst});
      copy_owner_.push_back(&p);
    }
    info_.persistent_grants.store(static_cast<uint32_t>(cache_.size()), std::memory_order_relaxed);
  }

  void run_copy_batch() {
    if (copy_batch_.empty()) return;
    const bool attempted = static_cast<bool>(p_.xen->grants().copy(copy_batch_));
    for (size_t i = 0; i < copy_batch_.size(); ++i)
      if (!attempted || copy_batch_[i].status != 0) copy_owner_[i]->status = BLKIF_RSP_ERROR;
    copy_batch_.clear();
    copy_owner_.clear();
  }

  void dispatch_writes() {
    if (pending_writes_.empty()) return;
    run_copy_batch();
    auto writes = std::move(pending_writes_);
    pending_writes_.clear();
    for (Pending* p : writes) {
      if (p->status != BLKIF_RSP_OKAY) {
        PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: request id {:#x}: a segment's grant is not usable", p_.name,
                               p->req.id);
        finished_.push_back(p);
        continue;
      }
      if (p->req.segments.empty()) {  // a barrier without data: only the flush
        on_io_done(p, 0);
        continue;
      }
      iovec iov{p->buf.get(), p->req.bytes()};
      io_->write(p->req.sector << kSectorShift, {&iov, 1}, [this, p](int64_t r) { on_io_done(p, r); });
    }
  }

  // Answers what finished (e.g. writes refused at gather time) and publishes the answers.
  void settle() {
    for (Pending* p : finished_) finish(p);
    finished_.clear();
    push();
  }

  void on_io_done(Pending* p, int64_t r) {
    if (r < 0) {
      PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: I/O error on request id {:#x}: {}", p_.name, p->req.id,
                             errno_name(static_cast<int>(-r)));
      p->status = BLKIF_RSP_ERROR;
    } else if (p->req.op == Op::write_barrier && p->phase == Phase::data) {
      // Flush after: the barrier's data (and everything before it) reaches stable storage.
      p->phase = Phase::flush_after;
      io_->flush([this, p](int64_t r2) { on_io_done(p, r2); });
      return;
    } else if (p->req.op == Op::read) {
      reads_done_.push_back(p);
      return;
    }
    finished_.push_back(p);
  }

  // Read data out to the guest: memcpy into persistent mappings, one batched grant copy for
  // the rest.
  void scatter_reads() {
    if (reads_done_.empty()) return;
    for (Pending* p : reads_done_) {
      if (p_.persistent) cache_.prefetch(p->req.segments);
      size_t off = 0;
      for (const Seg& s : p->req.segments) {
        std::byte* src = p->buf.get() + off;
        off += s.length;
        if (p_.persistent) {
          auto page = cache_.get(s.gref);
          if (page)
            std::memcpy(*page + s.offset, src, s.length);
          else
            p->status = BLKIF_RSP_ERROR;
          continue;
        }
        copy_batch_.push_back({xen::GrantCopySegment::Direction::to_guest, p_.frontend, s.gref, s.offset, s.length, src});
        copy_owner_.push_back(p);
      }
    }
    run_copy_batch();
    finished_.insert(finished_.end(), reads_done_.begin(), reads_done_.end());
    reads_done_.clear();
  }

  void after_completions() {
    if (!ring_map_.valid()) return;
    scatter_reads();
    for (Pending* p : finished_) finish(p);
    finished_.clear();
    if (barrier_ && outstanding_ == 0) {
      if (stopping_)
        fail_barrier("device disconnecting");
      else
        run_barrier();
    }
    io_->submit();
    push();
    check_drained();
    process_ring();
  }

  void finish(Pending* p) {
    auto it = live_.find(p);
    if (it == live_.end()) return;
    const bool ok = p->status == BLKIF_RSP_OKAY;
    p_.stats->completed(stat_class(p->req.op), p->req.bytes(), now_ns() - p->start_ns, ok);
    if (ok && (p->req.op == Op::write || p->req.op == Op::write_barrier))
      p_.stats->wrote_up_to((p->req.sector << kSectorShift) + p->req.bytes());
    p_.stats->finished();
    recycle(std::move(p->buf), p->req.bytes());
    respond(p->req.id, p->req.operation, p->status);
    if (p->req.op == Op::write_barrier) barrier_running_ = false;
    --outstanding_;
    info_.in_flight.store(outstanding_, std::memory_order_relaxed);
    live_.erase(it);
  }

  void run_barrier() {
    // While it runs, nothing else is consumed: the barrier orders what comes after it too.
    barrier_running_ = true;
    auto p = std::move(barrier_);
    barrier_.reset();
    start(std::move(p));
    dispatch_writes();
    io_->submit();
  }

  void fail_barrier(std::string_view why) {
    if (!barrier_) return;
    PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: barrier id {:#x} not run: {}", p_.name, barrier_->req.id, why);
    respond(barrier_->req.id, barrier_->req.operation, BLKIF_RSP_ERROR);
    barrier_.reset();
  }

  // Bounce buffers are reused (per size, a few of each): a fresh one costs a page fault per
  // page on first touch, which showed in profiles of 1 MiB requests.
  Buffer take_buffer(size_t bytes) {
    const size_t rounded = (bytes + kPageSize - 1) / kPageSize * kPageSize;
    auto it = pool_.find(rounded);
    if (it != pool_.end() && !it->second.empty()) {
      Buffer b = std::move(it->second.back());
      it->second.pop_back();
      pooled_bytes_ -= rounded;
      return b;
    }
    return alloc_buffer(rounded);
  }
  void recycle(Buffer b, size_t bytes) {
    if (!b || bytes == 0) return;
    const size_t rounded = (bytes + kPageSize - 1) / kPageSize * kPageSize;
    auto& list = pool_[rounded];
    if (list.size() < kPoolPerSize && pooled_bytes_ + rounded <= kPoolBytes) {
      pooled_bytes_ += rounded;
      list.push_back(std::move(b));
    }
  }

  void respond(uint64_t id, uint8_t operation, int16_t status) {
    if (!ring_map_.valid()) return;
    ring_.write_response(st_.rsp_prod_pvt, make_response(p_.abi, id, operation, status));
    ++st_.rsp_prod_pvt;
  }

  void push() {
    if (!ring_map_.valid()) return;
    if (push_responses(ring_, st_)) {
      info_.notifications_sent.fetch_add(1, std::memory_order_relaxed);
      if (auto r = evtchn_->notify(binding_.port()); !r)
        PVHOST_LOG_RATELIMITED(log::Level::warn, "{}: notify: {}", p_.name, r.error().describe());
    }
  }

  void check_drained() {
    if (paused_ && drained_ && outstanding_ == 0 && !barrier_) std::exchange(drained_, nullptr)();
  }

  void violation(std::string reason) {
    violated_ = true;
    info_.violated.store(true, std::memory_order_relaxed);
    log::error("{}: protocol violation: {}", p_.name, reason);
    if (p_.on_violation) p_.on_violation(Error(EPROTO, std::move(reason)));
  }

  static constexpr size_t kPoolPerSize = 64;
  static constexpr size_t kPoolBytes = 64u << 20;  // per queue, at most
  std::unordered_map<size_t, std::vector<Buffer>> pool_;
  size_t pooled_bytes_ = 0;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  QueueParams& p_;
  QueueInfo& info_;
  EventLoop& loop_;
  Limits limits_;
  bool paused_;
  bool stopping_ = false;
  bool closed_ = false;
  bool violated_ = false;
  bool barrier_running_ = false;
  std::function<void()> drained_;

  xen::GuestMapping ring_map_;
  SharedRing ring_;
  BackRingState st_;
  std::unique_ptr<xen::EventChannels> evtchn_;
  xen::PortBinding binding_;
  EventLoop::Watch watch_;
  std::unique_ptr<block::IoQueue> io_;
  GrantCache cache_;

  uint32_t outstanding_ = 0;  // started, not yet answered
  std::unordered_map<Pending*, std::unique_ptr<Pending>> live_;
  std::unique_ptr<Pending> barrier_;  // waiting for the drain before it
  std::vector<Pending*> pending_writes_;
  std::vector<Pending*> reads_done_;
  std::vector<Pending*> finished_;
  std::vector<xen::GrantCopySegment> copy_batch_;
  std::vector<Pending*> copy_owner_;
};

Result<std::unique_ptr<RingQueue>> RingQueue::start(QueueParams params) {
  std::unique_ptr<RingQueue> q(new RingQueue());
  q->params_ = std::move(params);
  q->thread_ = PVHOST_TRY(LoopThread::start(fmt::format("blk-q{}", q->params_.index)));
  q->worker_ = std::make_unique<Worker>(q->params_, *q->info_, q->thread_->loop());
  Result<void> r;
  q->thread_->run_sync([&] {
    r = q->worker_->open();
    if (r) {
      q->local_port_ = q->worker_->port();
      q->ring_size_ = q->worker_->size();
    }
  });
  if (!r) return std::unexpected(std::move(r).error().add_context(fmt::format("queue {}", q->params_.index)));
  return q;
}

RingQueue::~RingQueue() {
  if (thread_ && worker_) {
    thread_->run_sync([this] {
      worker_->close();
      worker_.reset();
    });
  }
  thread_.reset();
}

void RingQueue::pause(std::function<void()> drained) {
  thread_->loop().post([this, d = std::move(drained)]() mutable { worker_->pause(std::move(d)); });
}

void RingQueue::resume() {
  thread_->loop().post([this] { worker_->resume(); });
}

Result<void> RingQueue::switch_driver(block::BlockDriver* driver) {
  Result<void> r;
  thread_->run_sync([&] { r = worker_->switch_driver(driver); });
  return r;
}

void RingQueue::set_limits(const Limits& limits) {
  thread_->loop().post([this, limits] { worker_->set_limits(limits); });
}

}  // namespace pvhost::blkif
