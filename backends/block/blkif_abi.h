// The blkif ring entries of both x86 ABIs (xen/io/blkif.h, xen/io/protocols.h), defined
// here because the public header only describes the native layout. A 32-bit frontend
// ("x86_32-abi") packs 64-bit fields at 4-byte alignment: 108-byte requests, 12-byte
// responses; x86_64 ("x86_64-abi", native here) uses natural alignment: 112 and 16.
// These structs are only ever filled by memcpy out of the shared ring (one copy, STYLE.md
// rule 5) or written locally and then copied in; they are never overlaid on shared memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/blkif.h>
#include <xen/io/protocols.h>

namespace pvhost::blkif {

enum class Abi { x86_32, x86_64 };
inline constexpr Abi kNativeAbi = Abi::x86_64;  // XEN_IO_PROTO_ABI_NATIVE on x86_64

// The frontend's `protocol` key (absent = native) to an ABI; nullopt-like false if unknown.
[[nodiscard]] constexpr bool parse_protocol(std::string_view s, Abi& out) {
  if (s == XEN_IO_PROTO_ABI_X86_32) {
    out = Abi::x86_32;
    return true;
  }
  if (s == XEN_IO_PROTO_ABI_X86_64) {
    out = Abi::x86_64;
    return true;
  }
  return false;
}
[[nodiscard]] constexpr std::string_view to_string(Abi a) {
  return a == Abi::x86_32 ? XEN_IO_PROTO_ABI_X86_32 : XEN_IO_PROTO_ABI_X86_64;
}

struct Segment {  // struct blkif_request_segment: same in both ABIs
  uint32_t gref;
  uint8_t first_sect;
  uint8_t last_sect;
  uint16_t pad;
};
static_assert(sizeof(Segment) == 8);

#pragma pack(push, 4)
namespace x86_32 {
struct Request {
  uint8_t operation;
  uint8_t nr_segments;
  uint16_t handle;
  uint64_t id;
  uint64_t sector_number;
  Segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct Discard {
  uint8_t operation;
  uint8_t flag;
  uint16_t handle;
  uint64_t id;
  uint64_t sector_number;
  uint64_t nr_sectors;
};
struct Indirect {
  uint8_t operation;
  uint8_t indirect_op;
  uint16_t nr_segments;
  uint64_t id;
  uint64_t sector_number;
  uint16_t handle;
  uint32_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
  uint64_t pad;
};
struct Response {
  uint64_t id;
  uint8_t operation;
  int16_t status;
};
}  // namespace x86_32
#pragma pack(pop)

namespace x86_64 {
struct Request {
  uint8_t operation;
  uint8_t nr_segments;
  uint16_t handle;
  uint64_t id;
  uint64_t sector_number;
  Segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct Discard {
  uint8_t operation;
  uint8_t flag;
  uint16_t handle;
  uint64_t id;
  uint64_t sector_number;
  uint64_t nr_sectors;
};
struct Indirect {
  uint8_t operation;
  uint8_t indirect_op;
  uint16_t nr_segments;
  uint64_t id;
  uint64_t sector_number;
  uint16_t handle;
  uint32_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};
struct Response {
  uint64_t id;
  uint8_t operation;
  int16_t status;
};
}  // namespace x86_64

static_assert(sizeof(x86_32::Request) == 108 && offsetof(x86_32::Request, id) == 4 &&
              offsetof(x86_32::Request, seg) == 20);
static_assert(sizeof(x86_32::Indirect) == 64 && offsetof(x86_32::Indirect, indirect_grefs) == 24);
static_assert(sizeof(x86_32::Discard) == 28 && offsetof(x86_32::Discard, nr_sectors) == 20);
static_assert(sizeof(x86_32::Response) == 12 && offsetof(x86_32::Response, status) == 10);
static_assert(sizeof(x86_64::Request) == 112 && offsetof(x86_64::Request, id) == 8 &&
              offsetof(x86_64::Request, seg) == 24);
static_assert(sizeof(x86_64::Indirect) == 64 && offsetof(x86_64::Indirect, indirect_grefs) == 28);
static_assert(sizeof(x86_64::Discard) == 32 && offsetof(x86_64::Discard, nr_sectors) == 24);
static_assert(sizeof(x86_64::Response) == 16 && offsetof(x86_64::Response, status) == 10);
// The native layout matches the public header's.
static_assert(sizeof(x86_64::Request) == sizeof(blkif_request_t));
static_assert(sizeof(x86_64::Indirect) == sizeof(blkif_request_indirect_t));
static_assert(offsetof(x86_64::Indirect, indirect_grefs) == offsetof(blkif_request_indirect_t, indirect_grefs));

// A ring slot holds the larger of request and response (DEFINE_RING_TYPES' union).
[[nodiscard]] constexpr size_t entry_size(Abi a) {
  return a == Abi::x86_32 ? sizeof(x86_32::Request) : sizeof(x86_64::Request);
}
[[nodiscard]] constexpr size_t response_size(Abi a) {
  return a == Abi::x86_32 ? sizeof(x86_32::Response) : sizeof(x86_64::Response);
}
inline constexpr size_t kMaxEntrySize = sizeof(x86_64::Request);

// Limits this backend advertises (feature-max-indirect-segments, max-ring-page-order).
inline constexpr uint32_t kMaxIndirectSegments = 256;
inline constexpr uint32_t kMaxRingPageOrder = 4;
inline constexpr uint32_t kSegmentsPerIndirectPage = 4096 / sizeof(Segment);  // 512
inline constexpr uint32_t kSectorShift = 9;  // blkif sector units are 512 bytes
inline constexpr uint32_t kSectorsPerPage = 4096 >> kSectorShift;

}  // namespace pvhost::blkif
