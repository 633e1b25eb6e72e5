#include <catch2/catch.hpp>

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "src/event_loop.h"

using namespace pvhost;
using namespace std::chrono_literals;

TEST_CASE("fd handlers run when the fd is readable") {
  auto loop = *EventLoop::create("t");
  UniqueFd efd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  int calls = 0;
  auto w = *loop->watch_fd(efd.get(), EPOLLIN, [&](uint32_t ev) {
    CHECK((ev & EPOLLIN) != 0);
    uint64_t v;
    REQUIRE(::read(efd.get(), &v, 8) == 8);
    ++calls;
  });
  REQUIRE(loop->run_once(0ms));
  CHECK(calls == 0);
  uint64_t one = 1;
  REQUIRE(::write(efd.get(), &one, 8) == 8);
  REQUIRE(loop->run_once(100ms));
  CHECK(calls == 1);
}

TEST_CASE("a watch may destroy itself inside its own callback") {
  auto loop = *EventLoop::create("t");
  UniqueFd efd(::eventfd(1, EFD_NONBLOCK | EFD_CLOEXEC));
  int calls = 0;
  EventLoop::Watch w;
  w = *loop->watch_fd(efd.get(), EPOLLIN, [&](uint32_t) {
    ++calls;
    w.reset();  // the fd stays readable; the callback must not run again
  });
  REQUIRE(loop->run_once(10ms));
  REQUIRE(loop->run_once(10ms));
  CHECK(calls == 1);
  CHECK_FALSE(w.active());
}

TEST_CASE("timers fire once, or periodically") {
  auto loop = *EventLoop::create("t");
  int once = 0, periodic = 0;
  auto t1 = *loop->make_timer([&] { ++once; });
  auto t2 = *loop->make_timer([&] { ++periodic; });
  REQUIRE(t1.arm(1ms));
  REQUIRE(t2.arm(1ms, 2ms));
  auto deadline = std::chrono::steady_clock::now() + 2s;
  while (periodic < 3 && std::chrono::steady_clock::now() < deadline) REQUIRE(loop->run_once(50ms));
  CHECK(once == 1);
  CHECK(periodic >= 3);
  REQUIRE(t2.disarm());
  int before = periodic;
  REQUIRE(loop->run_once(20ms));
  CHECK(periodic == before);
}

TEST_CASE("posts from other threads run on the loop thread, in order") {
  auto loop = *EventLoop::create("t");
  std::vector<int> seen;
  const auto loop_thread = std::this_thread::get_id();
  std::thread producer([&] {
    for (int i = 0; i < 100; ++i)
      loop->post([&, i] {
        CHECK(std::this_thread::get_id() == loop_thread);
        seen.push_back(i);
        if (i == 99) loop->stop();
      });
  });
  REQUIRE(loop->run());
  producer.join();
  REQUIRE(seen.size() == 100);
  for (int i = 0; i < 100; ++i) CHECK(seen[static_cast<size_t>(i)] == i);
}

TEST_CASE("deferred calls run after the current round, including ones they defer") {
  auto loop = *EventLoop::create("t");
  std::vector<int> order;
  loop->defer([&] {
    order.push_back(1);
    loop->defer([&] { order.push_back(3); });
  });
  loop->defer([&] { order.push_back(2); });
  REQUIRE(loop->run_once(0ms));
  CHECK(order == std::vector<int>{1, 2, 3});
}

TEST_CASE("a loop thread runs work synchronously and stops on destruction") {
  auto t = *LoopThread::start("io");
  std::atomic<int> v{0};
  std::thread::id where;
  t->run_sync([&] {
    v = 5;
    where = std::this_thread::get_id();
  });
  CHECK(v == 5);
  CHECK(where != std::this_thread::get_id());
  t.reset();  // joins
}
