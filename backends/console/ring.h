// The console ring (xen/io/console.h `struct xencons_interface`): two byte rings in one
// shared page, `out` (guest -> host, 2048 bytes) and `in` (host -> guest, 1024 bytes), each
// with a free-running consumer and producer index (XENCONS_RING_IDX, wrapping at 2^32).
//
// These functions are the whole data-path contract with the guest, written over a plain
// `std::byte*` so the unit tests drive them with ordinary buffers (STYLE.md rules 5, 6, 14):
//   * every index is read once per call, with an explicit atomic and a stated reason;
//   * the copied indices are validated before any byte moves: a producer more than a ring
//     ahead of its consumer is a protocol violation (EPROTO) and nothing is touched;
//   * bytes are copied out of (or into) the page exactly once; no reference into the page
//     survives a call.
// The guest owns out_prod and in_cons, the backend owns out_cons and in_prod. A guest can
// scribble on any of them; the masks keep every access inside the page whatever it writes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

#include "src/error.h"
#include "src/types.h"

namespace pvhost::console {

// Layout of struct xencons_interface, checked against the Xen header in ring.cc.
inline constexpr size_t kInSize = 1024;
inline constexpr size_t kOutSize = 2048;
inline constexpr size_t kInOffset = 0;
inline constexpr size_t kOutOffset = kInOffset + kInSize;
inline constexpr size_t kInConsOffset = kOutOffset + kOutSize;
inline constexpr size_t kInProdOffset = kInConsOffset + 4;
inline constexpr size_t kOutConsOffset = kInProdOffset + 4;
inline constexpr size_t kOutProdOffset = kOutConsOffset + 4;
inline constexpr size_t kInterfaceSize = kOutProdOffset + 4;

// A snapshot of one direction's indices, copied once.
struct RingIndices {
  RingIndex cons;
  RingIndex prod;
};

// Validates a copied index pair of a ring of `size` bytes: prod may be at most `size` ahead
// of cons (equal means full). Returns the number of bytes in the ring.
[[nodiscard]] Result<uint32_t> ring_fill(RingIndices idx, size_t size, std::string_view which);

// Guest output: copies what the guest produced in `out` (at most `dst.size()` bytes) into
// `dst`, then publishes the new out_cons. Returns the number of bytes copied; an EPROTO
// error (nothing consumed) when the indices are hostile.
[[nodiscard]] Result<size_t> read_out(std::byte* page, std::span<std::byte> dst);

// Host input: copies as much of `src` as `in` has room for, then publishes the new
// in_prod. Returns the number of bytes written (0 when the ring is full); EPROTO when the
// indices are hostile.
[[nodiscard]] Result<size_t> write_in(std::byte* page, std::span<const std::byte> src);

// Free space in `in` right now (for flow control of the host fd); EPROTO when hostile.
[[nodiscard]] Result<size_t> in_space(const std::byte* page);

// Bytes waiting in `out` right now; EPROTO when hostile.
[[nodiscard]] Result<size_t> out_pending(const std::byte* page);

// --- the guest's side, for frontends (consfront) and tests ---------------------------
// The same rules with the roles swapped: the guest produces into `out` and consumes `in`.
[[nodiscard]] Result<size_t> guest_write_out(std::byte* page, std::span<const std::byte> src);
[[nodiscard]] Result<size_t> guest_read_in(std::byte* page, std::span<std::byte> dst);

// Raw index access for tests that play a hostile guest (relaxed; not for the data path).
struct RawIndices {
  uint32_t in_cons, in_prod, out_cons, out_prod;
};
[[nodiscard]] RawIndices load_indices(const std::byte* page);
void store_indices(std::byte* page, const RawIndices& idx);

}  // namespace pvhost::console
