#include "src/block/nbd/nbd_image.h"

#include <libnbd.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "src/log.h"

// NBD through libnbd's synchronous API (one handle per image, serialised by a mutex; the
// protocol allows concurrent requests, libnbd's synchronous calls issue one at a time per
// caller). Reconnection: when a request fails because the connection is gone (the server
// restarted, the socket broke), the handle is closed, a new one connects with backoff for
// up to kReconnectBudget, and the request is sent again. Every NBD command we use (READ,
// WRITE, FLUSH, TRIM) is idempotent, so resending is safe. A server restart loses what it
// had not made durable: writes completed before the restart but not yet covered by a
// completed flush may be lost, exactly as with a crash of a local disk's cache.

namespace pvhost::block {
namespace {

constexpr auto kReconnectBudget = std::chrono::seconds(15);
// qemu-nbd and nbdkit accept requests of up to 32 MiB; stay below.
constexpr uint64_t kMaxRequest = 16u << 20;

struct Target {
  std::string unix_path;  // nbd:unix:...
  std::string host, port;  // nbd:HOST:PORT
  std::string uri;        // nbd://..., nbd+unix://...
  std::string export_name;
  std::string describe() const {
    if (!uri.empty()) return uri;
    if (!unix_path.empty()) return fmt::format("nbd:unix:{}{}", unix_path, export_name.empty() ? "" : ":exportname=" + export_name);
    return fmt::format("nbd:{}:{}", host, port);
  }
};

Result<Target> parse_spec(std::string_view spec) {
  Target t;
  if (spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") || spec.starts_with("nbds://") ||
      spec.starts_with("nbd+tcp://")) {
    t.uri = std::string(spec);
    return t;
  }
  if (!spec.starts_with("nbd:")) return fail(EINVAL, fmt::format("'{}' is not an NBD spec (nbd:unix:PATH or nbd://HOST/EXPORT)", spec));
  std::string rest(spec.substr(4));
  if (const auto e = rest.find(":exportname="); e != std::string::npos) {
    t.export_name = rest.substr(e + 12);
    rest.resize(e);
  }
  if (rest.starts_with("unix:")) {
    t.unix_path = rest.substr(5);
    if (t.unix_path.empty()) return fail(EINVAL, "nbd:unix: needs a socket path");
    return t;
  }
  const auto colon = rest.rfind(':');
  if (colon == std::string::npos || colon == 0) return fail(EINVAL, fmt::format("'{}': expected nbd:HOST:PORT", spec));
  t.host = rest.substr(0, colon);
  t.port = rest.substr(colon + 1);
  return t;
}

struct HandleClose {
  void operator()(nbd_handle* h) const noexcept { nbd_close(h); }
};
using Handle = std::unique_ptr<nbd_handle, HandleClose>;

Error nbd_error(const std::string& what) {
  const int e = nbd_get_errno();
  const char* msg = nbd_get_error();
  return Error(e != 0 ? e : EIO, fmt::format("{}: {}", what, msg ? msg : "unknown libnbd error"));
}

Result<Handle> connect(const Target& t) {
  Handle h(nbd_create());
  if (!h) return std::unexpected(nbd_error("nbd_create"));
  if (!t.uri.empty()) {
    if (nbd_connect_uri(h.get(), t.uri.c_str()) < 0) return std::unexpected(nbd_error(fmt::format("connecting to {}", t.uri)));
    return h;
  }
  if (nbd_set_export_name(h.get(), t.export_name.c_str()) < 0) return std::unexpected(nbd_error("nbd_set_export_name"));
  if (!t.unix_path.empty()) {
    if (nbd_connect_unix(h.get(), t.unix_path.c_str()) < 0)
      return std::unexpected(nbd_error(fmt::format("connecting to {}", t.describe())));
  } else if (nbd_connect_tcp(h.get(), t.host.c_str(), t.port.c_str()) < 0) {
    return std::unexpected(nbd_error(fmt::format("connecting to {}", t.describe())));
  }
  return h;
}

class NbdImage final : public Image {
 public:
  NbdImage(Target t, Handle h, DriverInfo info) : target_(std::move(t)), name_(target_.describe()), h_(std::move(h)), info_(info) {}

  [[nodiscard]] DriverInfo info() const override { return info_; }
  [[nodiscard]] const std::string& path() const override { return name_; }
  [[nodiscard]] ImageDetails details() const override {
    ImageDetails d;
    d.format = "nbd";
    d.virtual_size = info_.size_bytes;
    return d;
  }

  Result<void> read_at(uint64_t offset, std::span<std::byte> buf) override {
    PVHOST_TRY(check_range(offset, buf.size()));
    for (uint64_t done = 0; done < buf.size();) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size() - done, kMaxRequest));
      PVHOST_TRY(with_retry("read", [&](nbd_handle* h) { return nbd_pread(h, buf.data() + done, n, offset + done, 0); }));
      done += n;
    }
    return {};
  }
  Result<void> write_at(uint64_t offset, std::span<const std::byte> buf) override {
    if (info_.read_only) return fail(EROFS, fmt::format("{} is read-only", name_));
    PVHOST_TRY(check_range(offset, buf.size()));
    for (uint64_t done = 0; done < buf.size();) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size() - done, kMaxRequest));
      PVHOST_TRY(with_retry("write", [&](nbd_handle* h) { return nbd_pwrite(h, buf.data() + done, n, offset + done, 0); }));
      done += n;
    }
    return {};
  }
  Result<void> flush_all() override {
    if (info_.read_only) return {};
    return with_retry("flush", [&](nbd_handle* h) { return nbd_can_flush(h) == 1 ? nbd_flush(h, 0) : 0; });
  }
  Result<void> discard_at(uint64_t offset, uint64_t length) override {
    if (info_.read_only) return fail(EROFS, fmt::format("{} is read-only", name_));
    PVHOST_TRY(check_range(offset, length));
    for (uint64_t done = 0; done < length;) {
      const uint64_t n = std::min<uint64_t>(length - done, kMaxRequest);
      PVHOST_TRY(with_retry("discard", [&](nbd_handle* h) {
        // The contract is "reads as zeroes afterwards": WRITE_ZEROES (punching holes when
        // the server can) gives that; TRIM alone would not.
        if (nbd_can_zero(h) == 1) return nbd_zero(h, n, offset + done, 0);
        const std::vector<std::byte> zero(static_cast<size_t>(n));
        return nbd_pwrite(h, zero.data(), zero.size(), offset + done, 0);
      }));
      done += n;
    }
    return {};
  }

 private:
  static bool connection_lost(nbd_handle* h, int err) {
    if (nbd_aio_is_dead(h) == 1 || nbd_aio_is_closed(h) == 1) return true;
    switch (err) {
      case ENOTCONN:
      case ECONNRESET:
      case EPIPE:
      case ESHUTDOWN:
      case ECONNREFUSED:
        return true;
      default:
        return false;
    }
  }

  template <class Fn>
  Result<void> with_retry(const char* what, Fn&& fn) {
    std::lock_guard lock(mu_);
    const auto deadline = std::chrono::steady_clock::now() + kReconnectBudget;
    auto delay = std::chrono::milliseconds(20);
    for (;;) {
      if (h_ && fn(h_.get()) == 0) return {};
      Error err = h_ ? nbd_error(fmt::format("{}: {}", name_, what)) : Error(ENOTCONN, fmt::format("{}: not connected", name_));
      if (h_ && !connection_lost(h_.get(), err.code())) return std::unexpected(std::move(err));
      // Reconnect, then resend (see the comment at the top).
      h_.reset();
      while (!h_) {
        if (std::chrono::steady_clock::now() >= deadline)
          return std::unexpected(std::move(err).add_context("reconnecting gave up"));
        std::this_thread::sleep_for(delay);
        delay = std::min(delay * 2, std::chrono::milliseconds(500));
        auto h = connect(target_);
        if (!h) continue;
        const int64_t size = nbd_get_size(h->get());
        if (size < 0 || static_cast<uint64_t>(size) != info_.size_bytes) {
          return fail(EIO, fmt::format("{}: the export came back with another size ({} instead of {})", name_, size,
                                       info_.size_bytes));
        }
        h_ = std::move(*h);
        log::info("{}: reconnected", name_);
      }
    }
  }

  Target target_;
  std::string name_;
  std::mutex mu_;  // guards h_
  Handle h_;
  DriverInfo info_;
};

}  // namespace

Result<std::unique_ptr<Image>> open_nbd(std::string_view spec, ReadOnly read_only) {
  Target t = PVHOST_TRY(parse_spec(spec));
  Handle h = PVHOST_TRY(connect(t));
  const int64_t size = nbd_get_size(h.get());
  if (size < 0) return std::unexpected(nbd_error("nbd_get_size"));
  DriverInfo info;
  info.format = "nbd";
  info.size_bytes = static_cast<uint64_t>(size);
  info.read_only = read_only == ReadOnly::yes || nbd_is_read_only(h.get()) == 1;
  info.discard = !info.read_only;
  return std::unique_ptr<Image>(std::make_unique<NbdImage>(std::move(t), std::move(h), info));
}

}  // namespace pvhost::block
