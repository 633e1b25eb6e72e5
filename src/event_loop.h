// One epoll event loop per thread (ARCHITECTURE.md "Process model"; STYLE.md rule 11):
// fd handlers, timers (timerfd), deferred calls, and a thread-safe post() through an
// eventfd so other threads can hand work over explicitly.
#pragma once

#include <sys/epoll.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "src/error.h"
#include "src/fd.h"

namespace pvhost {

class EventLoop {
 public:
  using FdCallback = std::function<void(uint32_t events)>;
  using Callback = std::function<void()>;

  // RAII registration of an fd. Destroying it (even from inside its own callback)
  // removes the fd from the loop; the callback is not called again.
  class Watch {
   public:
    Watch() = default;
    Watch(Watch&& o) noexcept : loop_(std::exchange(o.loop_, nullptr)), id_(o.id_) {}
    Watch& operator=(Watch&& o) noexcept;
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;
    ~Watch() { reset(); }
    // Changes the epoll event mask (EPOLLIN, EPOLLOUT, ...).
    [[nodiscard]] Result<void> set_events(uint32_t events);
    void reset() noexcept;
    [[nodiscard]] bool active() const { return loop_ != nullptr; }

   private:
    friend class EventLoop;
    Watch(EventLoop* loop, uint64_t id) : loop_(loop), id_(id) {}
    EventLoop* loop_ = nullptr;
    uint64_t id_ = 0;
  };

  // A timerfd-backed timer; disarmed and removed on destruction.
  class Timer {
   public:
    Timer() = default;
    Timer(Timer&&) noexcept = default;
    Timer& operator=(Timer&&) noexcept = default;
    // Fires once after `delay`, then every `interval` if it is non-zero.
    [[nodiscard]] Result<void> arm(std::chrono::nanoseconds delay,
                                   std::chrono::nanoseconds interval = {});
    [[nodiscard]] Result<void> disarm();
    [[nodiscard]] bool valid() const { return fd_.valid(); }

   private:
    friend class EventLoop;
    UniqueFd fd_;
    Watch watch_;
  };

  [[nodiscard]] static Result<std::unique_ptr<EventLoop>> create(std::string name);
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  [[nodiscard]] Result<Watch> watch_fd(int fd, uint32_t events, FdCallback cb);
  // A timer whose callback runs on this loop; arm it to start.
  [[nodiscard]] Result<Timer> make_timer(Callback cb);
  // Runs `cb` on this loop after the current dispatch round. Loop thread only.
  void defer(Callback cb);
  // Runs `cb` on this loop. Any thread; wakes the loop.
  void post(Callback cb);
  // Runs until stop(). Returns the error that ended it, if any.
  [[nodiscard]] Result<void> run();
  // Dispatches one round, waiting at most `timeout` (negative: forever).
  [[nodiscard]] Result<void> run_once(std::chrono::milliseconds timeout);
  // Makes run() return after the current round. Any thread.
  void stop();
  [[nodiscard]] bool stopping() const { return stop_requested_; }
  [[nodiscard]] const std::string& name() const { return name_; }
  [[nodiscard]] bool in_loop_thread() const { return std::this_thread::get_id() == owner_; }

 private:
  struct Entry {
    int fd;
    FdCallback cb;
    bool live = true;
  };
  EventLoop(std::string name, UniqueFd epfd, UniqueFd wakefd);
  void remove(uint64_t id) noexcept;
  void drain_posted();
  void run_deferred();

  std::string name_;
  UniqueFd epfd_;
  UniqueFd wakefd_;
  std::atomic<std::thread::id> owner_;
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, std::shared_ptr<Entry>> entries_;
  std::vector<Callback> deferred_;
  std::mutex posted_mu_;
  std::vector<Callback> posted_;  // guarded by posted_mu_
  std::atomic<bool> stop_requested_{false};
};

// A thread running its own EventLoop (an I/O thread). Joined on destruction after stop().
class LoopThread {
 public:
  [[nodiscard]] static Result<std::unique_ptr<LoopThread>> start(std::string name);
  ~LoopThread();
  [[nodiscard]] EventLoop& loop() { return *loop_; }
  // Runs `fn` on the thread and waits for it to finish.
  void run_sync(const std::function<void()>& fn);

 private:
  LoopThread() = default;
  std::unique_ptr<EventLoop> loop_;
  std::thread thread_;
};

}  // namespace pvhost
