// The back end of a xen/io/ring.h shared ring, written as C++ over indices copied out of the
// shared page (STYLE.md rule 5). The pure functions below are the whole ring policy and are
// unit-tested over plain numbers; SharedRing is the only code that touches the page.
//
// Page layout (DEFINE_RING_TYPES): req_prod, req_event, rsp_prod, rsp_event (RING_IDX each),
// 4 bytes private, 44 bytes padding, then the entries from byte 64, their count the largest
// power of two that fits (__RING_SIZE).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "backends/block/request.h"
#include "src/types.h"

namespace pvhost::blkif {

inline constexpr size_t kRingHeaderBytes = 64;

// __RING_SIZE: entries in a ring of `bytes` with `entry` bytes per slot (0 if none fit).
[[nodiscard]] constexpr uint32_t ring_entries(size_t bytes, size_t entry) {
  if (bytes <= kRingHeaderBytes || entry == 0) return 0;
  size_t n = (bytes - kRingHeaderBytes) / entry;
  uint32_t p = 1;
  if (n == 0) return 0;
  while (static_cast<size_t>(p) * 2 <= n) p *= 2;
  return p;
}

// How many new requests the frontend has published, or `violation` when its producer index
// is more than a ring ahead of our consumer index (Linux blkback: "bogus ring requests";
// a protocol violation that closes the device).
struct RequestWindow {
  uint32_t available = 0;
  bool violation = false;
};
[[nodiscard]] constexpr RequestWindow request_window(RingIndex req_prod, RingIndex req_cons, uint32_t size) {
  const uint32_t n = req_prod.since(req_cons);
  if (n > size) return {0, true};
  return {n, false};
}

// RING_REQUEST_CONS_OVERFLOW turned around: how many more requests may be consumed before
// the slots we would read are ones we still owe responses in (cons - rsp_prod_pvt in flight).
[[nodiscard]] constexpr uint32_t consumable(RingIndex req_cons, RingIndex rsp_prod_pvt, uint32_t size) {
  const uint32_t owed = req_cons.since(rsp_prod_pvt);
  return owed >= size ? 0 : size - owed;
}

// RING_PUSH_RESPONSES_AND_CHECK_NOTIFY's test: notify iff the frontend's rsp_event lies in
// (old, new], i.e. it asked to be woken for one of the responses just published.
[[nodiscard]] constexpr bool needs_notify(RingIndex old_prod, RingIndex new_prod, RingIndex event) {
  return new_prod.since(event) < new_prod.since(old_prod);
}

// Accessors for one mapped ring. Index fields are read and written as 32-bit atomics; the
// entries are only memcpy'd, once per request.
class SharedRing {
 public:
  SharedRing() = default;
  SharedRing(std::byte* base, size_t bytes, Abi abi)
      : base_(base), abi_(abi), size_(ring_entries(bytes, entry_size(abi))) {}

  [[nodiscard]] uint32_t size() const { return size_; }
  [[nodiscard]] Abi abi() const { return abi_; }

  // Acquire: pairs with the frontend's wmb() before it bumps req_prod, so the entries it
  // published are visible before we copy them.
  [[nodiscard]] RingIndex req_prod() const { return RingIndex(field(0).load(std::memory_order_acquire)); }
  [[nodiscard]] RingIndex rsp_event() const { return RingIndex(field(12).load(std::memory_order_relaxed)); }
  [[nodiscard]] RingIndex rsp_prod() const { return RingIndex(field(8).load(std::memory_order_relaxed)); }
  // Relaxed store: the full fence the caller issues next orders it before the re-read of
  // req_prod (RING_FINAL_CHECK_FOR_REQUESTS).
  void set_req_event(RingIndex v) { field(4).store(v.value(), std::memory_order_relaxed); }
  // Release: the response entries written before must be visible before the index that
  // publishes them (the wmb() of RING_PUSH_RESPONSES).
  void set_rsp_prod(RingIndex v) { field(8).store(v.value(), std::memory_order_release); }

  // One copy of the request in slot `i` (RING_COPY_REQUEST).
  void copy_request(RingIndex i, std::span<std::byte> out) const {
    const size_t n = entry_size(abi_);
    std::memcpy(out.data(), slot(i), n < out.size() ? n : out.size());
  }
  void write_response(RingIndex i, const ResponseBytes& r) { std::memcpy(slot(i), r.data, r.size); }

 private:
  [[nodiscard]] std::atomic_ref<uint32_t> field(size_t offset) const {
    // The header is 4-byte aligned at the start of a page.
    return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(base_ + offset));
  }
  [[nodiscard]] std::byte* slot(RingIndex i) const {
    return base_ + kRingHeaderBytes + static_cast<size_t>(i.slot(size_)) * entry_size(abi_);
  }

  std::byte* base_ = nullptr;
  Abi abi_ = kNativeAbi;
  uint32_t size_ = 0;
};

// Our private side of the back ring (BACK_RING's req_cons and rsp_prod_pvt), plus the
// index we last published, so a round publishes once and notifies at most once.
struct BackRingState {
  RingIndex req_cons;
  RingIndex rsp_prod_pvt;
  RingIndex rsp_pushed;
};

// Publishes the responses written since the last push; returns whether to notify
// (RING_PUSH_RESPONSES_AND_CHECK_NOTIFY).
[[nodiscard]] inline bool push_responses(SharedRing& ring, BackRingState& st) {
  if (st.rsp_prod_pvt == st.rsp_pushed) return false;
  const RingIndex old = st.rsp_pushed;
  ring.set_rsp_prod(st.rsp_prod_pvt);
  st.rsp_pushed = st.rsp_prod_pvt;
  // Full fence: our rsp_prod store must be visible before we read rsp_event, or we could
  // miss a frontend that just re-armed it (xen_mb() in ring.h).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return needs_notify(old, st.rsp_prod_pvt, ring.rsp_event());
}

// RING_FINAL_CHECK_FOR_REQUESTS: re-arms req_event and reports whether requests arrived
// meanwhile (then the caller keeps consuming instead of sleeping).
[[nodiscard]] inline bool final_check_for_requests(SharedRing& ring, const BackRingState& st) {
  if (ring.req_prod() != st.req_cons) return true;
  ring.set_req_event(st.req_cons + 1);
  // Full fence: the req_event store must be visible before we look at req_prod again, or a
  // frontend that checked req_event just before our store would not notify us.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return ring.req_prod() != st.req_cons;
}

}  // namespace pvhost::blkif
