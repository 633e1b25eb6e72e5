// The blkif request parser over plain buffers (backends/block/request.h): every invalid
// field, both ABIs, indirect requests, the response layout.
#include <catch2/catch.hpp>

#include <cstring>
#include <vector>

#include "backends/block/request.h"

using namespace pvhost;
using namespace pvhost::blkif;

namespace {

constexpr uint64_t kSectors = 2048;  // a 1 MiB device

Limits limits() {
  Limits l;
  l.sectors = kSectors;
  l.discard = true;
  return l;
}

template <class T>
std::vector<std::byte> bytes_of(const T& v, Abi abi) {
  std::vector<std::byte> out(entry_size(abi));
  std::memcpy(out.data(), &v, sizeof v);
  return out;
}

template <class R>
R rw(uint8_t op, uint8_t nseg, uint64_t sector, uint8_t first = 0, uint8_t last = 7) {
  R r{};
  r.operation = op;
  r.nr_segments = nseg;
  r.id = 0xabcdef0123ULL;
  r.sector_number = sector;
  for (uint8_t i = 0; i < nseg && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; ++i) r.seg[i] = Segment{100u + i, first, last, 0};
  return r;
}

Parsed parse64(const x86_64::Request& r, const Limits& l = limits()) {
  return parse_request(bytes_of(r, Abi::x86_64), Abi::x86_64, l);
}

}  // namespace

TEST_CASE("a native read parses into segments, sectors and the echoed id", "[blkif][parser]") {
  auto p = parse64(rw<x86_64::Request>(BLKIF_OP_READ, 3, 16, 1, 6));
  REQUIRE(p);
  CHECK(p->op == Op::read);
  CHECK(p->id == 0xabcdef0123ULL);
  CHECK(p->operation == BLKIF_OP_READ);
  CHECK(p->sector == 16);
  CHECK(p->nr_sectors == 18);
  REQUIRE(p->segments.size() == 3);
  CHECK(p->segments[0].gref == GrantRef(100));
  CHECK(p->segments[0].offset == 512);
  CHECK(p->segments[0].length == 6 * 512);
}

TEST_CASE("the x86_32 ABI reads id and sector at their packed offsets", "[blkif][parser]") {
  auto r = rw<x86_32::Request>(BLKIF_OP_WRITE, 11, 2048 - 88);
  auto p = parse_request(bytes_of(r, Abi::x86_32), Abi::x86_32, limits());
  REQUIRE(p);
  CHECK(p->op == Op::write);
  CHECK(p->id == 0xabcdef0123ULL);
  CHECK(p->sector == 2048 - 88);
  CHECK(p->segments.size() == 11);
  // The same bytes read as x86_64 put id/sector elsewhere: the ABI matters.
  auto wrong = parse_request(bytes_of(r, Abi::x86_32), Abi::x86_64, limits());
  CHECK((!wrong || wrong->id != 0xabcdef0123ULL));
}

TEST_CASE("an entry shorter than the ABI's request is rejected", "[blkif][parser]") {
  std::vector<std::byte> small(100);
  auto p = parse_request(small, Abi::x86_64, limits());
  REQUIRE_FALSE(p);
  CHECK(p.error().kind == Rejection::Kind::invalid);
}

TEST_CASE("segment counts outside 1..11 are invalid", "[blkif][parser]") {
  for (uint8_t n : {uint8_t{0}, uint8_t{12}, uint8_t{255}}) {
    auto r = rw<x86_64::Request>(BLKIF_OP_READ, 0, 0);
    r.nr_segments = n;
    auto p = parse64(r);
    REQUIRE_FALSE(p);
    CHECK(p.error().status() == BLKIF_RSP_ERROR);
    CHECK(p.error().id == 0xabcdef0123ULL);
    CHECK(p.error().op == Op::read);
  }
}

TEST_CASE("first_sect must not exceed last_sect and last_sect must be < 8", "[blkif][parser]") {
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 0, 5, 4)));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 0, 0, 8)));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 0, 9, 255)));
  CHECK(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 0, 7, 7)));
}

TEST_CASE("the sector range must lie inside the device, without overflow", "[blkif][parser]") {
  CHECK(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, kSectors - 8)));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, kSectors - 7)));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, kSectors)));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, UINT64_MAX)));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, UINT64_MAX - 3)));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, (UINT64_MAX >> 9) + 1)));
}

TEST_CASE("requests must be aligned to a 4096-byte sector-size", "[blkif][parser]") {
  Limits l = limits();
  l.sector_size = 4096;
  CHECK(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 8), l));
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 4), l));         // start
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 8, 0, 3), l));   // length
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 8, 4, 7), l));   // offset in page
}

TEST_CASE("writes, barriers and discards to a read-only device are invalid; reads are fine", "[blkif][parser]") {
  Limits l = limits();
  l.read_only = true;
  CHECK(parse64(rw<x86_64::Request>(BLKIF_OP_READ, 1, 0), l));
  auto w = parse64(rw<x86_64::Request>(BLKIF_OP_WRITE, 1, 0), l);
  REQUIRE_FALSE(w);
  CHECK(w.error().status() == BLKIF_RSP_ERROR);
  CHECK(w.error().op == Op::write);
  CHECK_FALSE(parse64(rw<x86_64::Request>(BLKIF_OP_WRITE_BARRIER, 1, 0), l));
  x86_64::Discard d{};
  d.operation = BLKIF_OP_DISCARD;
  d.nr_sectors = 8;
  CHECK_FALSE(parse_request(bytes_of(d, Abi::x86_64), Abi::x86_64, l));
}

TEST_CASE("unknown operations are answered EOPNOTSUPP with the id echoed", "[blkif][parser]") {
  for (uint8_t op : {uint8_t{BLKIF_OP_RESERVED_1}, uint8_t{7}, uint8_t{200}, uint8_t{255}}) {
    auto r = rw<x86_64::Request>(op, 1, 0);
    auto p = parse64(r);
    REQUIRE_FALSE(p);
    CHECK(p.error().status() == BLKIF_RSP_EOPNOTSUPP);
    CHECK(p.error().operation == op);
    CHECK(p.error().id == r.id);
  }
}

TEST_CASE("flush carries no data; a barrier may carry none", "[blkif][parser]") {
  auto f = parse64(rw<x86_64::Request>(BLKIF_OP_FLUSH_DISKCACHE, 0, 12345678));
  REQUIRE(f);
  CHECK(f->op == Op::flush);
  CHECK(f->bytes() == 0);
  auto b = parse64(rw<x86_64::Request>(BLKIF_OP_WRITE_BARRIER, 0, 0));
  REQUIRE(b);
  CHECK(b->op == Op::write_barrier);
  CHECK(b->segments.empty());
}

TEST_CASE("discard: range checked, secure flag read, EOPNOTSUPP when not advertised", "[blkif][parser]") {
  for (Abi abi : {Abi::x86_32, Abi::x86_64}) {
    std::vector<std::byte> e;
    auto make = [&](uint64_t sector, uint64_t n, uint8_t flag) {
      if (abi == Abi::x86_32) {
        x86_32::Discard d{};
        d.operation = BLKIF_OP_DISCARD;
        d.flag = flag;
        d.id = 7;
        d.sector_number = sector;
        d.nr_sectors = n;
        return bytes_of(d, abi);
      }
      x86_64::Discard d{};
      d.operation = BLKIF_OP_DISCARD;
      d.flag = flag;
      d.id = 7;
      d.sector_number = sector;
      d.nr_sectors = n;
      return bytes_of(d, abi);
    };
    auto ok = parse_request(make(8, 64, BLKIF_DISCARD_SECURE), abi, limits());
    REQUIRE(ok);
    CHECK(ok->op == Op::discard);
    CHECK(ok->secure);
    CHECK(ok->nr_sectors == 64);
    CHECK(ok->id == 7);
    CHECK_FALSE(parse_request(make(kSectors - 1, 2, 0), abi, limits()));
    CHECK_FALSE(parse_request(make(1, UINT64_MAX, 0), abi, limits()));
    Limits nod = limits();
    nod.discard = false;
    auto un = parse_request(make(8, 64, 0), abi, nod);
    REQUIRE_FALSE(un);
    CHECK(un.error().status() == BLKIF_RSP_EOPNOTSUPP);
  }
}

namespace {
template <class I>
I indirect(uint8_t op, uint16_t nseg, uint64_t sector) {
  I r{};
  r.operation = BLKIF_OP_INDIRECT;
  r.indirect_op = op;
  r.nr_segments = nseg;
  r.id = 99;
  r.sector_number = sector;
  for (uint32_t i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; ++i) r.indirect_grefs[i] = 500 + i;
  return r;
}
std::vector<std::byte> descriptors(size_t n, uint8_t first = 0, uint8_t last = 7) {
  std::vector<std::byte> out(n * sizeof(Segment));
  for (size_t i = 0; i < n; ++i) {
    Segment s{static_cast<uint32_t>(1000 + i), first, last, 0};
    std::memcpy(out.data() + i * sizeof s, &s, sizeof s);
  }
  return out;
}
}  // namespace

TEST_CASE("indirect requests wrap READ/WRITE with up to 256 segments in granted pages", "[blkif][parser]") {
  Limits l = limits();
  l.sectors = 1 << 20;
  for (Abi abi : {Abi::x86_32, Abi::x86_64}) {
    auto e = abi == Abi::x86_32 ? bytes_of(indirect<x86_32::Indirect>(BLKIF_OP_WRITE, 256, 64), abi)
                                : bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_WRITE, 256, 64), abi);
    auto p = parse_request(e, abi, l);
    REQUIRE(p);
    CHECK(p->needs_indirect());
    CHECK(p->operation == BLKIF_OP_WRITE);  // the wrapped op is echoed, as blkback does
    CHECK(p->id == 99);
    REQUIRE(p->indirect_pages.size() == 1);
    CHECK(p->indirect_pages[0] == GrantRef(500));
    CHECK(indirect_bytes_in_page(*p, 0) == 256 * 8);
    CHECK(indirect_bytes_in_page(*p, 1) == 0);
    Request req = *p;
    REQUIRE(complete_indirect(req, descriptors(256), l));
    CHECK(req.segments.size() == 256);
    CHECK(req.nr_sectors == 256 * 8);
    CHECK(req.segments[255].gref == GrantRef(1255));
  }
}

TEST_CASE("indirect: bad wrapped op, segment counts and descriptors are invalid", "[blkif][parser]") {
  Limits l = limits();
  auto e = bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_FLUSH_DISKCACHE, 4, 0), Abi::x86_64);
  auto p = parse_request(e, Abi::x86_64, l);
  REQUIRE_FALSE(p);
  CHECK(p.error().status() == BLKIF_RSP_ERROR);
  CHECK(p.error().operation == BLKIF_OP_INDIRECT);
  CHECK_FALSE(parse_request(bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_READ, 0, 0), Abi::x86_64), Abi::x86_64, l));
  CHECK_FALSE(parse_request(bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_READ, 257, 0), Abi::x86_64), Abi::x86_64, l));
  CHECK_FALSE(parse_request(bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_READ, 4096, 0), Abi::x86_64), Abi::x86_64, l));
  Limits ro = l;
  ro.read_only = true;
  CHECK_FALSE(parse_request(bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_WRITE, 4, 0), Abi::x86_64), Abi::x86_64, ro));

  auto ok = parse_request(bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_READ, 4, kSectors - 32), Abi::x86_64),
                          Abi::x86_64, l);
  REQUIRE(ok);
  {
    Request r = *ok;
    CHECK(complete_indirect(r, descriptors(4), l));  // exactly to the end
  }
  {
    Request r = *ok;
    CHECK_FALSE(complete_indirect(r, descriptors(3), l));  // too few bytes
  }
  {
    Request r = *ok;
    CHECK_FALSE(complete_indirect(r, descriptors(4, 3, 2), l));  // first > last
  }
  {
    auto beyond = parse_request(bytes_of(indirect<x86_64::Indirect>(BLKIF_OP_READ, 5, kSectors - 32), Abi::x86_64),
                                Abi::x86_64, l);
    REQUIRE(beyond);
    Request r = *beyond;
    CHECK_FALSE(complete_indirect(r, descriptors(5), l));  // one page past the end
  }
}

TEST_CASE("responses are laid out per ABI: 12 bytes packed, 16 natural", "[blkif][parser]") {
  auto r32 = make_response(Abi::x86_32, 0x1122334455667788ULL, BLKIF_OP_WRITE, BLKIF_RSP_ERROR);
  CHECK(r32.size == 12);
  auto r64 = make_response(Abi::x86_64, 0x1122334455667788ULL, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP);
  CHECK(r64.size == 16);
  blkif_response_t native{};
  std::memcpy(&native, r64.data, sizeof native);
  CHECK(native.id == 0x1122334455667788ULL);
  CHECK(native.operation == BLKIF_OP_WRITE);
  CHECK(native.status == BLKIF_RSP_EOPNOTSUPP);
  int16_t st = 0;
  std::memcpy(&st, r32.data + 10, 2);
  CHECK(st == BLKIF_RSP_ERROR);
  CHECK(std::to_integer<uint8_t>(r32.data[9]) == 0);  // padding is zeroed
}
