// Ring index logic (backends/block/ring.h): sizes, wrap-around, the "more than a ring ahead"
// rule, response placement and notification suppression, over a plain buffer.
#include <catch2/catch.hpp>

#include <cstring>
#include <vector>

#include "backends/block/ring.h"

using namespace pvhost;
using namespace pvhost::blkif;

TEST_CASE("ring sizes are __RING_SIZE: the largest power of two that fits", "[blkif][ring]") {
  CHECK(ring_entries(4096, entry_size(Abi::x86_64)) == 32);
  CHECK(ring_entries(4096, entry_size(Abi::x86_32)) == 32);
  CHECK(ring_entries(4096 * 2, 112) == 64);
  CHECK(ring_entries(4096 * 16, 112) == 512);
  CHECK(ring_entries(64, 112) == 0);
  // The public header agrees for the native ABI.
  CHECK(ring_entries(4096, 112) == __CONST_RING_SIZE(blkif, 4096));
}

TEST_CASE("request window: differences modulo 2^32, wrap-around included", "[blkif][ring]") {
  CHECK(request_window(RingIndex(5), RingIndex(5), 32).available == 0);
  CHECK(request_window(RingIndex(37), RingIndex(5), 32).available == 32);
  auto w = request_window(RingIndex(3), RingIndex(0xFFFFFFF0u), 32);
  CHECK_FALSE(w.violation);
  CHECK(w.available == 19);
}

TEST_CASE("a producer more than a ring ahead of the consumer is a protocol violation", "[blkif][ring]") {
  CHECK(request_window(RingIndex(38), RingIndex(5), 32).violation);
  CHECK(request_window(RingIndex(20), RingIndex(0xFFFFFFF0u), 32).violation);
  // Producer behind the consumer = 2^32 - k ahead: also a violation.
  CHECK(request_window(RingIndex(4), RingIndex(5), 32).violation);
}

TEST_CASE("consumption stops when every slot holds a request we still owe", "[blkif][ring]") {
  CHECK(consumable(RingIndex(0), RingIndex(0), 32) == 32);
  CHECK(consumable(RingIndex(32), RingIndex(0), 32) == 0);
  CHECK(consumable(RingIndex(40), RingIndex(10), 32) == 2);
  CHECK(consumable(RingIndex(5), RingIndex(0xFFFFFFF0u), 32) == 11);
}

TEST_CASE("notify only when rsp_event lies in (old, new]", "[blkif][ring]") {
  CHECK(needs_notify(RingIndex(0), RingIndex(3), RingIndex(1)));
  CHECK(needs_notify(RingIndex(0), RingIndex(3), RingIndex(3)));
  CHECK_FALSE(needs_notify(RingIndex(0), RingIndex(3), RingIndex(4)));
  CHECK_FALSE(needs_notify(RingIndex(3), RingIndex(5), RingIndex(3)));
  CHECK(needs_notify(RingIndex(0xFFFFFFFEu), RingIndex(2), RingIndex(0)));
}

namespace {
struct TestRing {
  alignas(4096) std::byte page[4096]{};
  SharedRing ring{page, sizeof page, Abi::x86_64};
  void set(size_t off, uint32_t v) { std::memcpy(page + off, &v, 4); }
  uint32_t get(size_t off) const {
    uint32_t v;
    std::memcpy(&v, page + off, 4);
    return v;
  }
};
}  // namespace

TEST_CASE("requests are copied from slot index mod size; responses placed at rsp_prod_pvt", "[blkif][ring]") {
  TestRing t;
  // Slot 1 of 32 is where index 33 and index 0xFFFFFFE1 land.
  std::byte* slot1 = t.page + 64 + 112;
  for (int i = 0; i < 112; ++i) slot1[i] = std::byte(i);
  std::array<std::byte, 112> out{};
  t.ring.copy_request(RingIndex(33), out);
  CHECK(std::to_integer<int>(out[111]) == 111);
  BackRingState st;
  st.rsp_prod_pvt = RingIndex(0xFFFFFFE1u);
  st.rsp_pushed = st.rsp_prod_pvt;
  t.ring.write_response(st.rsp_prod_pvt, make_response(Abi::x86_64, 42, 0, 0));
  uint64_t id = 0;
  std::memcpy(&id, slot1, 8);
  CHECK(id == 42);
}

TEST_CASE("push publishes rsp_prod once and suppresses notifications as ring.h intends", "[blkif][ring]") {
  TestRing t;
  BackRingState st;
  CHECK_FALSE(push_responses(t.ring, st));  // nothing new
  t.set(12, 1);                             // frontend: wake me at response 1
  st.rsp_prod_pvt = RingIndex(2);
  CHECK(push_responses(t.ring, st));
  CHECK(t.get(8) == 2);
  st.rsp_prod_pvt = RingIndex(4);
  CHECK_FALSE(push_responses(t.ring, st));  // rsp_event 1 is already behind us
  CHECK(t.get(8) == 4);
  t.set(12, 5);
  st.rsp_prod_pvt = RingIndex(5);
  CHECK(push_responses(t.ring, st));
}

TEST_CASE("final check re-arms req_event and sees requests that raced in", "[blkif][ring]") {
  TestRing t;
  BackRingState st;
  st.req_cons = RingIndex(7);
  t.set(0, 7);
  CHECK_FALSE(final_check_for_requests(t.ring, st));
  CHECK(t.get(4) == 8);  // req_event = cons + 1
  t.set(0, 9);
  CHECK(final_check_for_requests(t.ring, st));
}
