// Move-only RAII handles for file descriptors and memory mappings (STYLE.md rule 10).
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <span>
#include <string>
#include <utility>

#include "src/error.h"

namespace pvhost {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  [[nodiscard]] int get() const { return fd_; }
  [[nodiscard]] bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }
  [[nodiscard]] int release() { return std::exchange(fd_, -1); }
  void reset(int fd = -1) noexcept {
    // close() errors on a descriptor we own carry no actionable information (the fd is
    // gone either way, see close(2)); ignored deliberately.
    if (fd_ >= 0) (void)::close(fd_);
    fd_ = fd;
  }
  [[nodiscard]] Result<UniqueFd> dup() const;

 private:
  int fd_ = -1;
};

// An mmap()ed region, unmapped on destruction.
class Mapping {
 public:
  Mapping() = default;
  Mapping(void* addr, size_t len) : addr_(addr), len_(len) {}
  Mapping(Mapping&& o) noexcept
      : addr_(std::exchange(o.addr_, nullptr)), len_(std::exchange(o.len_, 0)) {}
  Mapping& operator=(Mapping&& o) noexcept {
    if (this != &o) {
      reset();
      addr_ = std::exchange(o.addr_, nullptr);
      len_ = std::exchange(o.len_, 0);
    }
    return *this;
  }
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() { reset(); }

  // mmap(2) of `len` bytes of `fd` at `offset`; MAP_SHARED.
  [[nodiscard]] static Result<Mapping> map(int fd, size_t len, off_t offset, int prot);
  // Anonymous private memory (e.g. a reserved range, bounce buffers).
  [[nodiscard]] static Result<Mapping> anonymous(size_t len, int prot);

  [[nodiscard]] std::byte* data() const { return static_cast<std::byte*>(addr_); }
  [[nodiscard]] size_t size() const { return len_; }
  [[nodiscard]] std::span<std::byte> bytes() const { return {data(), len_}; }
  [[nodiscard]] bool valid() const { return addr_ != nullptr; }
  void reset() noexcept;

 private:
  void* addr_ = nullptr;
  size_t len_ = 0;
};

// Writes all of `data`, retrying on EINTR and short writes (blocking fds only).
[[nodiscard]] Result<void> write_all(int fd, std::span<const std::byte> data);
[[nodiscard]] Result<void> write_all(int fd, std::string_view data);
// Sets O_NONBLOCK and FD_CLOEXEC.
[[nodiscard]] Result<void> set_nonblocking(int fd);

}  // namespace pvhost
