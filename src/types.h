// Strong types for the identifiers that cross the Xen interface (STYLE.md rule 12), and the
// wrapping ring index of xen/io/ring.h.
#pragma once

#include <compare>
#include <cstdint>
#include <functional>

#include <fmt/format.h>

namespace pvhost {

template <class Tag, class Rep>
class StrongId {
 public:
  using rep = Rep;
  constexpr StrongId() = default;
  constexpr explicit StrongId(Rep v) : v_(v) {}
  [[nodiscard]] constexpr Rep value() const { return v_; }
  friend constexpr auto operator<=>(StrongId, StrongId) = default;

 private:
  Rep v_{};
};

using DomId = StrongId<struct DomIdTag, uint16_t>;        // domid_t
using Port = StrongId<struct PortTag, uint32_t>;          // evtchn_port_t
using GrantRef = StrongId<struct GrantRefTag, uint32_t>;  // grant_ref_t
using Gfn = StrongId<struct GfnTag, uint64_t>;            // guest frame number

inline constexpr DomId kDom0{0};
inline constexpr DomId kDomidSelf{0x7FF0};  // DOMID_SELF (xen.h)
inline constexpr size_t kPageSize = 4096;   // XC_PAGE_SIZE: grants and rings are 4 KiB pages

// A free-running ring index (RING_IDX in ring.h): it wraps at 2^32 and only differences
// and masked values are meaningful.
class RingIndex {
 public:
  constexpr RingIndex() = default;
  constexpr explicit RingIndex(uint32_t v) : v_(v) {}
  [[nodiscard]] constexpr uint32_t value() const { return v_; }
  // Distance from `older` forward to this index, modulo 2^32.
  [[nodiscard]] constexpr uint32_t since(RingIndex older) const { return v_ - older.v_; }
  // Slot in a ring of `size` entries (a power of two).
  [[nodiscard]] constexpr uint32_t slot(uint32_t size) const { return v_ & (size - 1); }
  constexpr RingIndex& operator++() {
    ++v_;
    return *this;
  }
  constexpr RingIndex operator+(uint32_t n) const { return RingIndex(v_ + n); }
  friend constexpr bool operator==(RingIndex, RingIndex) = default;

 private:
  uint32_t v_ = 0;
};

}  // namespace pvhost

template <class Tag, class Rep>
struct std::hash<pvhost::StrongId<Tag, Rep>> {
  size_t operator()(pvhost::StrongId<Tag, Rep> id) const noexcept {
    return std::hash<Rep>{}(id.value());
  }
};

template <class Tag, class Rep>
struct fmt::formatter<pvhost::StrongId<Tag, Rep>> : fmt::formatter<Rep> {
  auto format(pvhost::StrongId<Tag, Rep> id, format_context& ctx) const {
    return fmt::formatter<Rep>::format(id.value(), ctx);
  }
};
template <>
struct fmt::formatter<pvhost::RingIndex> : fmt::formatter<uint32_t> {
  auto format(pvhost::RingIndex i, format_context& ctx) const {
    return fmt::formatter<uint32_t>::format(i.value(), ctx);
  }
};
