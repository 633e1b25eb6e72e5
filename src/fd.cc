#include "src/fd.h"

#include <fcntl.h>

#include "src/log.h"

namespace pvhost {

Result<UniqueFd> UniqueFd::dup() const {
  int fd = ::fcntl(fd_, F_DUPFD_CLOEXEC, 0);
  if (fd < 0) return fail_errno("dup");
  return UniqueFd(fd);
}

Result<Mapping> Mapping::map(int fd, size_t len, off_t offset, int prot) {
  void* p = ::mmap(nullptr, len, prot, MAP_SHARED, fd, offset);
  if (p == MAP_FAILED) return fail_errno("mmap");
  return Mapping(p, len);
}

Result<Mapping> Mapping::anonymous(size_t len, int prot) {
  void* p = ::mmap(nullptr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return fail_errno("mmap anonymous");
  return Mapping(p, len);
}

void Mapping::reset() noexcept {
  if (addr_ != nullptr && ::munmap(addr_, len_) != 0)
    log::error("munmap {} bytes: {}", len_, errno_name(errno));
  addr_ = nullptr;
  len_ = 0;
}

Result<void> write_all(int fd, std::span<const std::byte> data) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("write");
    }
    data = data.subspan(static_cast<size_t>(n));
  }
  return {};
}

Result<void> write_all(int fd, std::string_view data) {
  return write_all(fd, std::as_bytes(std::span(data.data(), data.size())));
}

Result<void> set_nonblocking(int fd) {
  int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return fail_errno("fcntl O_NONBLOCK");
  int fdfl = ::fcntl(fd, F_GETFD);
  if (fdfl < 0 || ::fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) < 0) return fail_errno("fcntl FD_CLOEXEC");
  return {};
}

}  // namespace pvhost
