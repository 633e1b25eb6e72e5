// libFuzzer target for the blkif request parser. Input layout:
//   byte 0      ABI (bit 0), read-only (bit 1), discard (bit 2), sector-size shift (bits 3-5)
//   bytes 1-8   device size in sectors (little endian)
//   next 112    the ring entry (zero-padded)
//   the rest    indirect segment descriptors
// Invariants checked on every accepted request: the range lies inside the device, segment
// offsets and lengths stay inside their page, totals add up, read-only is honoured.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "backends/block/request.h"

using namespace pvhost::blkif;

namespace {
void check(bool ok) {
  if (!ok) __builtin_trap();
}

void check_accepted(const Request& r, const Limits& l) {
  check(r.sector <= l.sectors && r.nr_sectors <= l.sectors - r.sector);
  uint64_t total = 0;
  for (const auto& s : r.segments) {
    check(s.length > 0 && s.offset + s.length <= 4096);
    check(s.offset % l.sector_size == 0 && s.length % l.sector_size == 0);
    total += s.length;
  }
  if (r.op == Op::read || r.op == Op::write || r.op == Op::write_barrier) check(total == r.bytes());
  if (l.read_only) check(r.op == Op::read || r.op == Op::flush);
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 9) return 0;
  Limits l;
  const Abi abi = (data[0] & 1) != 0 ? Abi::x86_32 : Abi::x86_64;
  l.read_only = (data[0] & 2) != 0;
  l.discard = (data[0] & 4) != 0;
  l.sector_size = 512u << ((data[0] >> 3) & 3);
  std::memcpy(&l.sectors, data + 1, 8);
  data += 9;
  size -= 9;
  std::vector<std::byte> entry(kMaxEntrySize);
  const size_t n = size < entry.size() ? size : entry.size();
  std::memcpy(entry.data(), data, n);
  data += n;
  size -= n;
  auto parsed = parse_request(entry, abi, l);
  if (!parsed) {
    check(parsed.error().status() == BLKIF_RSP_ERROR || parsed.error().status() == BLKIF_RSP_EOPNOTSUPP);
    return 0;
  }
  Request r = std::move(*parsed);
  if (r.needs_indirect()) {
    size_t want = 0;
    for (size_t i = 0; i < r.indirect_pages.size(); ++i) want += indirect_bytes_in_page(r, i);
    check(want == r.indirect_segments * sizeof(Segment));
    std::vector<std::byte> desc(reinterpret_cast<const std::byte*>(data), reinterpret_cast<const std::byte*>(data) + size);
    if (auto ok = complete_indirect(r, desc, l); !ok) return 0;
    check(r.segments.size() == r.indirect_segments);
  }
  check_accepted(r, l);
  auto resp = make_response(abi, r.id, r.operation, 0);
  check(resp.size == response_size(abi));
  return 0;
}
