// The blkif request parser (STYLE.md rule 6): a pure function from one ring entry, already
// copied out of the shared ring, plus the device's limits, to a validated Request or a
// Rejection that says how to answer. No Xen, no I/O: unit-tested and fuzzed over plain
// buffers (tests/unit/backends/block, tests/fuzz/block).
//
// Rules (xen/io/blkif.h): READ/WRITE/WRITE_BARRIER carry 1..11 segments (a barrier may carry
// none: a pure ordering point, as QEMU's qdisk accepts); INDIRECT wraps READ or WRITE with
// 1..feature-max-indirect-segments segments described in granted pages; each segment has
// first_sect <= last_sect < 8 (512-byte units within its 4 KiB page); the request's range
// lies inside the device without overflow and is aligned to sector-size; no writes (or
// barriers, discards) to a read-only device. Unknown operations are answered EOPNOTSUPP,
// invalid ones BLKIF_RSP_ERROR.
#pragma once

#include <cstddef>
#include <cstdint>
#include <expected>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "backends/block/blkif_abi.h"
#include "src/types.h"

namespace pvhost::blkif {

// What requests are checked against.
struct Limits {
  uint64_t sectors = 0;        // device size in 512-byte units
  uint32_t sector_size = 512;  // logical block size (`sector-size`), a power of two >= 512
  bool read_only = false;
  bool discard = false;        // feature-discard advertised
  uint32_t max_indirect_segments = kMaxIndirectSegments;
};

enum class Op { read, write, write_barrier, flush, discard };

// One data segment: a byte range of one granted page.
struct Seg {
  GrantRef gref;
  uint16_t offset = 0;  // first_sect * 512
  uint16_t length = 0;  // (last_sect - first_sect + 1) * 512
};

struct Request {
  uint64_t id = 0;
  uint8_t operation = 0;  // echoed in the response (the wrapped op for INDIRECT, as blkback)
  Op op = Op::read;
  uint64_t sector = 0;      // start, 512-byte units
  uint64_t nr_sectors = 0;  // total length, 512-byte units
  bool secure = false;      // DISCARD with BLKIF_DISCARD_SECURE
  std::vector<Seg> segments;
  // INDIRECT: the granted pages holding `indirect_segments` descriptors, still to be
  // fetched (complete_indirect() fills `segments` from them).
  std::vector<GrantRef> indirect_pages;
  uint16_t indirect_segments = 0;

  [[nodiscard]] bool needs_indirect() const { return !indirect_pages.empty() && segments.empty(); }
  [[nodiscard]] uint64_t bytes() const { return nr_sectors << kSectorShift; }
};

struct Rejection {
  enum class Kind { unsupported, invalid };
  Kind kind = Kind::invalid;
  uint64_t id = 0;
  uint8_t operation = 0;
  std::optional<Op> op;  // the operation class, when known (for per-op counters)
  std::string reason;
  [[nodiscard]] int16_t status() const {
    return kind == Kind::unsupported ? int16_t{BLKIF_RSP_EOPNOTSUPP} : int16_t{BLKIF_RSP_ERROR};
  }
};

using Parsed = std::expected<Request, Rejection>;

// Parses one ring entry (at least entry_size(abi) bytes, a private copy).
[[nodiscard]] Parsed parse_request(std::span<const std::byte> entry, Abi abi, const Limits& limits);

// Second stage of INDIRECT: `descriptors` is a private copy of the first
// `request.indirect_segments` blkif_request_segment entries of the indirect pages.
[[nodiscard]] std::expected<void, Rejection> complete_indirect(Request& request,
                                                               std::span<const std::byte> descriptors,
                                                               const Limits& limits);

// Bytes of indirect descriptors to fetch from each indirect page for `request`.
[[nodiscard]] size_t indirect_bytes_in_page(const Request& request, size_t page_index);

// The response entry, laid out for `abi` (response_size(abi) bytes are meaningful).
struct ResponseBytes {
  std::byte data[16];
  size_t size;
};
[[nodiscard]] ResponseBytes make_response(Abi abi, uint64_t id, uint8_t operation, int16_t status);

}  // namespace pvhost::blkif
