#include "backends/block/request.h"

#include <cstring>

#include <fmt/format.h>

namespace pvhost::blkif {
namespace {

template <class T>
T load(std::span<const std::byte> bytes) {
  T v;
  std::memcpy(&v, bytes.data(), sizeof v);
  return v;
}

std::unexpected<Rejection> invalid(uint64_t id, uint8_t operation, std::optional<Op> op, std::string reason) {
  return std::unexpected(Rejection{Rejection::Kind::invalid, id, operation, op, std::move(reason)});
}

// The ABIs' layouts as template arguments.
struct Abi32 {
  using Request = x86_32::Request;
  using Discard = x86_32::Discard;
  using Indirect = x86_32::Indirect;
};
struct Abi64 {
  using Request = x86_64::Request;
  using Discard = x86_64::Discard;
  using Indirect = x86_64::Indirect;
};

// The ABI-independent view of the three request shapes.
struct Common {
  uint8_t operation;
  uint8_t byte1;  // nr_segments / flag / indirect_op
  uint64_t id;
  uint64_t sector_number;
};

template <class Ns>
Common common_of(std::span<const std::byte> entry) {
  auto r = load<typename Ns::Request>(entry);
  return Common{r.operation, r.nr_segments, r.id, r.sector_number};
}

// Segments: first_sect <= last_sect < 8, alignment to sector-size, range inside the device.
std::expected<void, Rejection> check_segments(Request& req, std::span<const Segment> segs, const Limits& l) {
  const uint32_t ss = l.sector_size;
  uint64_t total = 0;
  req.segments.clear();
  req.segments.reserve(segs.size());
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.first_sect > s.last_sect || s.last_sect >= kSectorsPerPage)
      return invalid(req.id, req.operation, req.op,
                     fmt::format("segment {}: first_sect {} last_sect {} (need first <= last < 8)", i, s.first_sect,
                                 s.last_sect));
    const uint16_t off = static_cast<uint16_t>(s.first_sect << kSectorShift);
    const uint16_t len = static_cast<uint16_t>((s.last_sect - s.first_sect + 1) << kSectorShift);
    if (off % ss != 0 || len % ss != 0)
      return invalid(req.id, req.operation, req.op,
                     fmt::format("segment {}: offset {} length {} not aligned to sector-size {}", i, off, len, ss));
    total += static_cast<uint64_t>(s.last_sect - s.first_sect + 1);
    req.segments.push_back(Seg{GrantRef(s.gref), off, len});
  }
  req.nr_sectors = total;
  if (req.sector > l.sectors || total > l.sectors - req.sector)
    return invalid(req.id, req.operation, req.op,
                   fmt::format("sectors {}+{} beyond the device's {}", req.sector, total, l.sectors));
  return {};
}

std::expected<void, Rejection> check_start(const Request& req, const Limits& l) {
  if (((req.sector << kSectorShift) % l.sector_size) != 0 || req.sector > (UINT64_MAX >> kSectorShift))
    return invalid(req.id, req.operation, req.op,
                   fmt::format("sector {} not aligned to sector-size {}", req.sector, l.sector_size));
  return {};
}

template <class Ns>
Parsed parse_abi(std::span<const std::byte> entry, const Limits& l) {
  const Common c = common_of<Ns>(entry);
  Request req;
  req.id = c.id;
  req.operation = c.operation;
  req.sector = c.sector_number;
  switch (c.operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_WRITE_BARRIER: {
      req.op = c.operation == BLKIF_OP_READ    ? Op::read
               : c.operation == BLKIF_OP_WRITE ? Op::write
                                                : Op::write_barrier;
      if (req.op != Op::read && l.read_only)
        return invalid(req.id, req.operation, req.op, "write to a read-only device");
      const auto r = load<typename Ns::Request>(entry);
      const bool empty_ok = req.op == Op::write_barrier;
      if ((r.nr_segments == 0 && !empty_ok) || r.nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST)
        return invalid(req.id, req.operation, req.op,
                       fmt::format("nr_segments {} (need 1..{})", r.nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST));
      if (auto ok = check_start(req, l); !ok) return std::unexpected(ok.error());
      if (auto ok = check_segments(req, std::span<const Segment>(r.seg, r.nr_segments), l); !ok)
        return std::unexpected(ok.error());
      return req;
    }
    case BLKIF_OP_FLUSH_DISKCACHE:
      req.op = Op::flush;
      req.sector = 0;
      return req;
    case BLKIF_OP_DISCARD: {
      req.op = Op::discard;
      if (!l.discard)
        return std::unexpected(Rejection{Rejection::Kind::unsupported, req.id, req.operation, req.op,
                                         "discard not advertised"});
      if (l.read_only) return invalid(req.id, req.operation, req.op, "discard on a read-only device");
      const auto d = load<typename Ns::Discard>(entry);
      // BLKIF_DISCARD_SECURE is "ignored if discard-secure=0" (blkif.h); we never advertise it.
      req.secure = (d.flag & BLKIF_DISCARD_SECURE) != 0;
      req.nr_sectors = d.nr_sectors;
      if (auto ok = check_start(req, l); !ok) return std::unexpected(ok.error());
      // (req fields, not the packed x86_32 struct's: no references to misaligned members)
      if (req.sector > l.sectors || req.nr_sectors > l.sectors - req.sector)
        return invalid(req.id, req.operation, req.op,
                       fmt::format("discard {}+{} beyond the device's {} sectors", req.sector, req.nr_sectors, l.sectors));
      if (((req.nr_sectors << kSectorShift) % l.sector_size) != 0)
        return invalid(req.id, req.operation, req.op, "discard length not aligned to sector-size");
      return req;
    }
    case BLKIF_OP_INDIRECT: {
      const auto ind = load<typename Ns::Indirect>(entry);
      if (ind.indirect_op != BLKIF_OP_READ && ind.indirect_op != BLKIF_OP_WRITE)
        return invalid(req.id, req.operation, std::nullopt,
                       fmt::format("indirect operation {} (need READ or WRITE)", ind.indirect_op));
      req.operation = ind.indirect_op;
      req.op = ind.indirect_op == BLKIF_OP_READ ? Op::read : Op::write;
      req.id = ind.id;
      req.sector = ind.sector_number;
      if (req.op == Op::write && l.read_only)
        return invalid(req.id, req.operation, req.op, "write to a read-only device");
      if (ind.nr_segments == 0 || ind.nr_segments > l.max_indirect_segments)
        return invalid(req.id, req.operation, req.op,
                       fmt::format("indirect nr_segments {} (need 1..{})", ind.nr_segments, l.max_indirect_segments));
      const size_t pages = (ind.nr_segments + kSegmentsPerIndirectPage - 1) / kSegmentsPerIndirectPage;
      if (pages > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
        return invalid(req.id, req.operation, req.op, "too many indirect pages");
      if (auto ok = check_start(req, l); !ok) return std::unexpected(ok.error());
      req.indirect_segments = ind.nr_segments;
      for (size_t i = 0; i < pages; ++i) req.indirect_pages.emplace_back(ind.indirect_grefs[i]);
      return req;
    }
    default:
      return std::unexpected(Rejection{Rejection::Kind::unsupported, req.id, req.operation, std::nullopt,
                                       fmt::format("unknown operation {}", c.operation)});
  }
}

}  // namespace

Parsed parse_request(std::span<const std::byte> entry, Abi abi, const Limits& limits) {
  if (entry.size() < entry_size(abi))
    return invalid(0, 0, std::nullopt, fmt::format("entry of {} bytes (need {})", entry.size(), entry_size(abi)));
  if (limits.sector_size < 512 || (limits.sector_size & (limits.sector_size - 1)) != 0)
    return invalid(0, 0, std::nullopt, "bad sector size limit");
  return abi == Abi::x86_32 ? parse_abi<Abi32>(entry, limits) : parse_abi<Abi64>(entry, limits);
}

size_t indirect_bytes_in_page(const Request& request, size_t page_index) {
  const size_t first = page_index * kSegmentsPerIndirectPage;
  if (first >= request.indirect_segments) return 0;
  const size_t n = std::min<size_t>(kSegmentsPerIndirectPage, request.indirect_segments - first);
  return n * sizeof(Segment);
}

std::expected<void, Rejection> complete_indirect(Request& request, std::span<const std::byte> descriptors,
                                                 const Limits& limits) {
  const size_t n = request.indirect_segments;
  if (n == 0 || descriptors.size() < n * sizeof(Segment))
    return invalid(request.id, request.operation, request.op, "indirect descriptors missing");
  std::vector<Segment> segs(n);
  std::memcpy(segs.data(), descriptors.data(), n * sizeof(Segment));
  return check_segments(request, segs, limits);
}

ResponseBytes make_response(Abi abi, uint64_t id, uint8_t operation, int16_t status) {
  ResponseBytes out{};
  if (abi == Abi::x86_32) {
    x86_32::Response r;
    std::memset(&r, 0, sizeof r);  // no stray padding bytes into guest memory
    r.id = id;
    r.operation = operation;
    r.status = status;
    std::memcpy(out.data, &r, sizeof r);
    out.size = sizeof r;
  } else {
    x86_64::Response r;
    std::memset(&r, 0, sizeof r);
    r.id = id;
    r.operation = operation;
    r.status = status;
    std::memcpy(out.data, &r, sizeof r);
    out.size = sizeof r;
  }
  return out;
}

}  // namespace pvhost::blkif
