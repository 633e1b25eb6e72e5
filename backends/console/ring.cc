#include "backends/console/ring.h"

#include <atomic>
#include <cstring>

#include <fmt/format.h>

// xen io headers need the fixed-width types first.
#include <cstdint>
#include <xen/io/console.h>

namespace pvhost::console {

static_assert(sizeof(xencons_interface::in) == kInSize);
static_assert(sizeof(xencons_interface::out) == kOutSize);
static_assert(offsetof(xencons_interface, in) == kInOffset);
static_assert(offsetof(xencons_interface, out) == kOutOffset);
static_assert(offsetof(xencons_interface, in_cons) == kInConsOffset);
static_assert(offsetof(xencons_interface, in_prod) == kInProdOffset);
static_assert(offsetof(xencons_interface, out_cons) == kOutConsOffset);
static_assert(offsetof(xencons_interface, out_prod) == kOutProdOffset);
static_assert(sizeof(xencons_interface) == kInterfaceSize);

namespace {

// An index in the shared page, accessed only through std::atomic_ref (STYLE.md rule 5).
std::atomic_ref<uint32_t> index_at(const std::byte* page, size_t offset) {
  // The page is writable shared memory; const only says this call does not store.
  auto* p = reinterpret_cast<uint32_t*>(const_cast<std::byte*>(page) + offset);
  return std::atomic_ref<uint32_t>(*p);
}

// Copies `n` bytes starting at ring index `from` out of a ring of `size` bytes at `base`,
// in at most two pieces (the wrap).
void copy_from_ring(const std::byte* base, size_t size, RingIndex from, std::byte* dst, size_t n) {
  const size_t slot = from.slot(static_cast<uint32_t>(size));
  const size_t first = std::min(n, size - slot);
  std::memcpy(dst, base + slot, first);
  std::memcpy(dst + first, base, n - first);
}

void copy_to_ring(std::byte* base, size_t size, RingIndex to, const std::byte* src, size_t n) {
  const size_t slot = to.slot(static_cast<uint32_t>(size));
  const size_t first = std::min(n, size - slot);
  std::memcpy(base + slot, src, first);
  std::memcpy(base, src + first, n - first);
}

}  // namespace

Result<uint32_t> ring_fill(RingIndices idx, size_t size, std::string_view which) {
  const uint32_t fill = idx.prod.since(idx.cons);
  if (fill > size)
    return fail(EPROTO, fmt::format("{} ring: producer {} is {} bytes ahead of consumer {} (the ring holds {})",
                                    which, idx.prod, fill, idx.cons, size));
  return fill;
}

Result<size_t> read_out(std::byte* page, std::span<std::byte> dst) {
  RingIndices idx;
  // acquire: pairs with the guest's write barrier between filling `out` and publishing
  // out_prod, so the bytes below are read after (and are at least as new as) this index.
  idx.prod = RingIndex(index_at(page, kOutProdOffset).load(std::memory_order_acquire));
  // relaxed: out_cons is ours; whatever the guest may have written there is validated next.
  idx.cons = RingIndex(index_at(page, kOutConsOffset).load(std::memory_order_relaxed));
  const uint32_t fill = PVHOST_TRY(ring_fill(idx, kOutSize, "out"));
  const size_t n = std::min<size_t>(fill, dst.size());
  if (n == 0) return 0;
  copy_from_ring(page + kOutOffset, kOutSize, idx.cons, dst.data(), n);
  // release: our reads of the slots complete before the guest sees them free and reuses
  // them (ring.h: a barrier before the consumer index moves).
  index_at(page, kOutConsOffset).store((idx.cons + static_cast<uint32_t>(n)).value(), std::memory_order_release);
  return n;
}

Result<size_t> write_in(std::byte* page, std::span<const std::byte> src) {
  RingIndices idx;
  // acquire: the guest finished reading the slots before it advanced in_cons; our writes
  // into those slots below must not be ordered before we observed that.
  idx.cons = RingIndex(index_at(page, kInConsOffset).load(std::memory_order_acquire));
  // relaxed: in_prod is ours; a value the guest wrote is validated next.
  idx.prod = RingIndex(index_at(page, kInProdOffset).load(std::memory_order_relaxed));
  const uint32_t fill = PVHOST_TRY(ring_fill(idx, kInSize, "in"));
  const size_t n = std::min<size_t>(kInSize - fill, src.size());
  if (n == 0) return 0;
  copy_to_ring(page + kInOffset, kInSize, idx.prod, src.data(), n);
  // release: the bytes are visible to the guest before the index that publishes them.
  index_at(page, kInProdOffset).store((idx.prod + static_cast<uint32_t>(n)).value(), std::memory_order_release);
  return n;
}

Result<size_t> in_space(const std::byte* page) {
  RingIndices idx;
  // acquire: as in write_in (space seen here is space the guest has finished with).
  idx.cons = RingIndex(index_at(page, kInConsOffset).load(std::memory_order_acquire));
  idx.prod = RingIndex(index_at(page, kInProdOffset).load(std::memory_order_relaxed));
  const uint32_t fill = PVHOST_TRY(ring_fill(idx, kInSize, "in"));
  return kInSize - fill;
}

Result<size_t> out_pending(const std::byte* page) {
  RingIndices idx;
  // acquire: as in read_out.
  idx.prod = RingIndex(index_at(page, kOutProdOffset).load(std::memory_order_acquire));
  idx.cons = RingIndex(index_at(page, kOutConsOffset).load(std::memory_order_relaxed));
  return PVHOST_TRY(ring_fill(idx, kOutSize, "out"));
}

Result<size_t> guest_write_out(std::byte* page, std::span<const std::byte> src) {
  RingIndices idx;
  // acquire: the backend finished reading the slots before it advanced out_cons.
  idx.cons = RingIndex(index_at(page, kOutConsOffset).load(std::memory_order_acquire));
  // relaxed: out_prod is the guest's own.
  idx.prod = RingIndex(index_at(page, kOutProdOffset).load(std::memory_order_relaxed));
  const uint32_t fill = PVHOST_TRY(ring_fill(idx, kOutSize, "out"));
  const size_t n = std::min<size_t>(kOutSize - fill, src.size());
  if (n == 0) return 0;
  copy_to_ring(page + kOutOffset, kOutSize, idx.prod, src.data(), n);
  // release: bytes before the index that publishes them (hvc_xen's wmb()).
  index_at(page, kOutProdOffset).store((idx.prod + static_cast<uint32_t>(n)).value(), std::memory_order_release);
  return n;
}

Result<size_t> guest_read_in(std::byte* page, std::span<std::byte> dst) {
  RingIndices idx;
  // acquire: pairs with the backend's release of in_prod.
  idx.prod = RingIndex(index_at(page, kInProdOffset).load(std::memory_order_acquire));
  idx.cons = RingIndex(index_at(page, kInConsOffset).load(std::memory_order_relaxed));
  const uint32_t fill = PVHOST_TRY(ring_fill(idx, kInSize, "in"));
  const size_t n = std::min<size_t>(fill, dst.size());
  if (n == 0) return 0;
  copy_from_ring(page + kInOffset, kInSize, idx.cons, dst.data(), n);
  // release: reads done before the slots are handed back (hvc_xen's mb()).
  index_at(page, kInConsOffset).store((idx.cons + static_cast<uint32_t>(n)).value(), std::memory_order_release);
  return n;
}

RawIndices load_indices(const std::byte* page) {
  return {index_at(page, kInConsOffset).load(std::memory_order_relaxed),
          index_at(page, kInProdOffset).load(std::memory_order_relaxed),
          index_at(page, kOutConsOffset).load(std::memory_order_relaxed),
          index_at(page, kOutProdOffset).load(std::memory_order_relaxed)};
}

void store_indices(std::byte* page, const RawIndices& idx) {
  index_at(page, kInConsOffset).store(idx.in_cons, std::memory_order_relaxed);
  index_at(page, kInProdOffset).store(idx.in_prod, std::memory_order_relaxed);
  index_at(page, kOutConsOffset).store(idx.out_cons, std::memory_order_relaxed);
  // release: a test's index change is seen after anything it wrote into the page before.
  index_at(page, kOutProdOffset).store(idx.out_prod, std::memory_order_release);
}

}  // namespace pvhost::console
