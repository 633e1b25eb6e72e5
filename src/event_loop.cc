#include "src/event_loop.h"

#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <future>

#include "src/log.h"

namespace pvhost {

EventLoop::Watch& EventLoop::Watch::operator=(Watch&& o) noexcept {
  if (this != &o) {
    reset();
    loop_ = std::exchange(o.loop_, nullptr);
    id_ = o.id_;
  }
  return *this;
}

void EventLoop::Watch::reset() noexcept {
  if (loop_ != nullptr) std::exchange(loop_, nullptr)->remove(id_);
}

Result<void> EventLoop::Watch::set_events(uint32_t events) {
  if (loop_ == nullptr) return fail(EBADF, "set_events on an inactive watch");
  auto it = loop_->entries_.find(id_);
  if (it == loop_->entries_.end()) return fail(ENOENT, "set_events: watch not found");
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id_;
  if (::epoll_ctl(loop_->epfd_.get(), EPOLL_CTL_MOD, it->second->fd, &ev) != 0)
    return fail_errno("epoll_ctl MOD");
  return {};
}

Result<void> EventLoop::Timer::arm(std::chrono::nanoseconds delay, std::chrono::nanoseconds interval) {
  auto to_ts = [](std::chrono::nanoseconds ns) {
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(ns.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns.count() % 1'000'000'000);
    return ts;
  };
  itimerspec spec{};
  // A zero it_value would disarm; the smallest positive delay fires at once.
  spec.it_value = to_ts(delay.count() > 0 ? delay : std::chrono::nanoseconds(1));
  spec.it_interval = to_ts(interval);
  if (::timerfd_settime(fd_.get(), 0, &spec, nullptr) != 0) return fail_errno("timerfd_settime");
  return {};
}

Result<void> EventLoop::Timer::disarm() {
  itimerspec spec{};
  if (::timerfd_settime(fd_.get(), 0, &spec, nullptr) != 0) return fail_errno("timerfd_settime");
  return {};
}

EventLoop::EventLoop(std::string name, UniqueFd epfd, UniqueFd wakefd)
    : name_(std::move(name)), epfd_(std::move(epfd)), wakefd_(std::move(wakefd)),
      owner_(std::this_thread::get_id()) {}

Result<std::unique_ptr<EventLoop>> EventLoop::create(std::string name) {
  UniqueFd epfd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epfd) return fail_errno("epoll_create1");
  UniqueFd wakefd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wakefd) return fail_errno("eventfd");
  std::unique_ptr<EventLoop> loop(new EventLoop(std::move(name), std::move(epfd), std::move(wakefd)));
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;  // id 0 is the wake-up eventfd
  if (::epoll_ctl(loop->epfd_.get(), EPOLL_CTL_ADD, loop->wakefd_.get(), &ev) != 0)
    return fail_errno("epoll_ctl ADD wakefd");
  return loop;
}

EventLoop::~EventLoop() = default;

Result<EventLoop::Watch> EventLoop::watch_fd(int fd, uint32_t events, FdCallback cb) {
  const uint64_t id = next_id_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id;
  if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
    return fail_errno(fmt::format("epoll_ctl ADD fd {}", fd));
  entries_.emplace(id, std::make_shared<Entry>(Entry{fd, std::move(cb)}));
  return Watch(this, id);
}

void EventLoop::remove(uint64_t id) noexcept {
  auto it = entries_.find(id);
  if (it == entries_.end()) return;
  it->second->live = false;
  // EBADF/ENOENT here means the fd was closed before its watch; the entry is gone either way.
  (void)::epoll_ctl(epfd_.get(), EPOLL_CTL_DEL, it->second->fd, nullptr);
  entries_.erase(it);
}

Result<EventLoop::Timer> EventLoop::make_timer(Callback cb) {
  Timer t;
  t.fd_ = UniqueFd(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!t.fd_) return fail_errno("timerfd_create");
  const int fd = t.fd_.get();
  t.watch_ = PVHOST_TRY(watch_fd(fd, EPOLLIN, [fd, cb = std::move(cb)](uint32_t) {
    uint64_t expirations = 0;
    if (::read(fd, &expirations, sizeof expirations) != sizeof expirations) return;  // spurious
    cb();
  }));
  return t;
}

void EventLoop::defer(Callback cb) { deferred_.push_back(std::move(cb)); }

void EventLoop::post(Callback cb) {
  {
    std::lock_guard lock(posted_mu_);
    posted_.push_back(std::move(cb));
  }
  const uint64_t one = 1;
  // EAGAIN means the counter is saturated: the loop is already due to wake.
  (void)::write(wakefd_.get(), &one, sizeof one);
}

void EventLoop::stop() {
  stop_requested_ = true;
  const uint64_t one = 1;
  (void)::write(wakefd_.get(), &one, sizeof one);  // see post()
}

void EventLoop::drain_posted() {
  uint64_t count = 0;
  (void)::read(wakefd_.get(), &count, sizeof count);  // EAGAIN: nothing pending, fine
  std::vector<Callback> work;
  {
    std::lock_guard lock(posted_mu_);
    work.swap(posted_);
  }
  for (auto& cb : work) cb();
}

void EventLoop::run_deferred() {
  // Deferred calls may defer more; run until quiet, each batch in order.
  while (!deferred_.empty()) {
    std::vector<Callback> batch;
    batch.swap(deferred_);
    for (auto& cb : batch) cb();
  }
}

Result<void> EventLoop::run_once(std::chrono::milliseconds timeout) {
  owner_ = std::this_thread::get_id();
  run_deferred();
  epoll_event events[64];
  const int timeout_ms = deferred_.empty() ? static_cast<int>(timeout.count()) : 0;
  int n = ::epoll_wait(epfd_.get(), events, 64, timeout_ms);
  if (n < 0) {
    if (errno == EINTR) return {};
    return fail_errno("epoll_wait");
  }
  for (int i = 0; i < n; ++i) {
    const uint64_t id = events[i].data.u64;
    if (id == 0) {
      drain_posted();
      continue;
    }
    auto it = entries_.find(id);
    if (it == entries_.end()) continue;  // removed earlier in this round
    std::shared_ptr<Entry> entry = it->second;  // keeps the callback alive while it runs
    if (entry->live) entry->cb(events[i].events);
  }
  run_deferred();
  return {};
}

Result<void> EventLoop::run() {
  stop_requested_ = false;
  while (!stop_requested_) PVHOST_TRY(run_once(std::chrono::milliseconds(-1)));
  run_deferred();
  return {};
}

Result<std::unique_ptr<LoopThread>> LoopThread::start(std::string name) {
  std::unique_ptr<LoopThread> t(new LoopThread());
  t->loop_ = PVHOST_TRY(EventLoop::create(name));
  EventLoop* loop = t->loop_.get();
  t->thread_ = std::thread([loop, name] {
    if (auto r = loop->run(); !r) log::error("loop thread {}: {}", name, r.error().describe());
  });
  return t;
}

LoopThread::~LoopThread() {
  if (thread_.joinable()) {
    loop_->stop();
    thread_.join();
  }
}

void LoopThread::run_sync(const std::function<void()>& fn) {
  std::promise<void> done;
  loop_->post([&] {
    fn();
    done.set_value();
  });
  done.get_future().wait();
}

}  // namespace pvhost
