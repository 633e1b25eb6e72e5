// The console ring over a plain page (xen/io/console.h): both directions, wrap-around of the
// byte rings and of the 32-bit indices, full rings, and hostile indices.
#include <catch2/catch.hpp>

#include <array>
#include <numeric>
#include <random>
#include <vector>

#include "backends/console/ring.h"

using namespace pvhost;
using namespace pvhost::console;

namespace {

struct Page {
  alignas(4096) std::array<std::byte, 4096> bytes{};
  std::byte* data() { return bytes.data(); }
};

std::vector<std::byte> pattern(size_t n, uint32_t seed) {
  std::vector<std::byte> v(n);
  std::mt19937 rng(seed);
  for (auto& b : v) b = static_cast<std::byte>(rng());
  return v;
}

}  // namespace

TEST_CASE("ring layout matches struct xencons_interface") {
  CHECK(kInSize == 1024);
  CHECK(kOutSize == 2048);
  CHECK(kInterfaceSize == 3088);
}

TEST_CASE("guest output is copied once, in order, across the wrap of the out ring") {
  Page p;
  // Start near the end of the byte ring and near 2^32 so both wraps happen.
  const uint32_t start = 0xFFFFFFFFu - 100;
  store_indices(p.data(), {0, 0, start, start});
  auto data = pattern(10000, 1);
  std::vector<std::byte> got;
  size_t sent = 0;
  std::mt19937 rng(7);
  while (got.size() < data.size()) {
    const size_t chunk = std::min<size_t>(rng() % 3000 + 1, data.size() - sent);
    auto w = guest_write_out(p.data(), std::span(data).subspan(sent, chunk));
    REQUIRE(w);
    sent += *w;
    std::array<std::byte, kOutSize> buf{};
    const size_t want = rng() % kOutSize + 1;
    auto r = read_out(p.data(), std::span(buf).first(want));
    REQUIRE(r);
    got.insert(got.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(*r));
  }
  CHECK(got == data);
  auto idx = load_indices(p.data());
  CHECK(idx.out_cons == idx.out_prod);
  CHECK(idx.out_prod == static_cast<uint32_t>(start + data.size()));  // wrapped past 2^32
}

TEST_CASE("host input fills only the free space of in, then the guest reads it in order") {
  Page p;
  const uint32_t start = 0xFFFFFF00u;
  store_indices(p.data(), {start, start, 0, 0});
  auto data = pattern(5000, 2);
  // A full ring takes nothing more.
  auto w = write_in(p.data(), data);
  REQUIRE(w);
  CHECK(*w == kInSize);
  CHECK(*in_space(p.data()) == 0);
  auto w2 = write_in(p.data(), std::span(data).subspan(*w));
  REQUIRE(w2);
  CHECK(*w2 == 0);
  std::vector<std::byte> got(300);
  auto r = guest_read_in(p.data(), got);
  REQUIRE(r);
  CHECK(*r == 300);
  CHECK(std::equal(got.begin(), got.end(), data.begin()));
  CHECK(*in_space(p.data()) == 300);
  // Drive the rest through with uneven pieces.
  size_t sent = *w;
  std::vector<std::byte> all(data.begin(), data.begin() + 300);
  std::mt19937 rng(3);
  while (all.size() < data.size()) {
    auto n = write_in(p.data(), std::span(data).subspan(sent, std::min<size_t>(rng() % 700 + 1, data.size() - sent)));
    REQUIRE(n);
    sent += *n;
    std::vector<std::byte> buf(rng() % 900 + 1);
    auto m = guest_read_in(p.data(), buf);
    REQUIRE(m);
    all.insert(all.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(*m));
  }
  CHECK(all == data);
}

TEST_CASE("an out producer more than a ring ahead is a protocol violation and nothing moves") {
  Page p;
  store_indices(p.data(), {0, 0, 100, 100 + kOutSize + 1});
  std::array<std::byte, kOutSize> buf{};
  auto r = read_out(p.data(), buf);
  REQUIRE_FALSE(r);
  CHECK(r.error().code() == EPROTO);
  CHECK(load_indices(p.data()).out_cons == 100);  // not consumed
  CHECK_FALSE(out_pending(p.data()));
}

TEST_CASE("an out producer exactly a ring ahead is a full ring, not a violation") {
  Page p;
  store_indices(p.data(), {0, 0, 5, 5 + kOutSize});
  std::array<std::byte, kOutSize> buf{};
  auto r = read_out(p.data(), buf);
  REQUIRE(r);
  CHECK(*r == kOutSize);
}

TEST_CASE("an out producer behind its consumer is a protocol violation") {
  Page p;
  store_indices(p.data(), {0, 0, 1000, 999});
  std::array<std::byte, 16> buf{};
  CHECK_FALSE(read_out(p.data(), buf));
}

TEST_CASE("an in consumer ahead of our producer (guest rewound in_cons) is a protocol violation") {
  Page p;
  store_indices(p.data(), {50, 10, 0, 0});  // in_prod - in_cons wraps to ~2^32
  std::array<std::byte, 4> src{};
  auto w = write_in(p.data(), src);
  REQUIRE_FALSE(w);
  CHECK(w.error().code() == EPROTO);
  CHECK(load_indices(p.data()).in_prod == 10);
  CHECK_FALSE(in_space(p.data()));
}

TEST_CASE("ring_fill names the ring and the distance") {
  auto r = ring_fill({RingIndex(0), RingIndex(5000)}, kOutSize, "out");
  REQUIRE_FALSE(r);
  CHECK(r.error().what().find("out ring") != std::string::npos);
  CHECK(r.error().what().find("5000") != std::string::npos);
  CHECK(*ring_fill({RingIndex(0xFFFFFFFFu), RingIndex(3)}, kOutSize, "out") == 4u);
}
