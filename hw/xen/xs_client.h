// XenStore over the real libxenstore. Used in both modes: under emulation only the socket
// path differs (ARCHITECTURE.md: "XenStore is always the real libxenstore").
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>

#include "hw/xen/xen.h"

struct xs_handle;

namespace pvhost::xen {

class XsClient final : public XenStore {
 public:
  // Opens libxenstore. With `socket_path` set, connects to that unix socket only
  // (XENSTORED_PATH); otherwise the default socket or /dev/xen/xenbus.
  [[nodiscard]] static Result<std::unique_ptr<XsClient>> open(std::optional<std::string> socket_path);
  ~XsClient() override;

  Result<std::string> read(Transaction t, std::string_view path) override;
  Result<void> write(Transaction t, std::string_view path, std::string_view value) override;
  Result<std::vector<std::string>> directory(Transaction t, std::string_view path) override;
  Result<void> mkdir(Transaction t, std::string_view path) override;
  Result<void> rm(Transaction t, std::string_view path) override;
  Result<std::vector<Permission>> get_permissions(Transaction t, std::string_view path) override;
  Result<void> set_permissions(Transaction t, std::string_view path, std::span<const Permission> perms) override;
  Result<Transaction> transaction_start() override;
  Result<void> transaction_end(Transaction t, bool abort) override;
  Result<Watch> watch(std::string_view path, WatchCallback cb) override;
  Result<std::string> get_domain_path(DomId domid) override;
  Result<void> attach(EventLoop& loop) override;

  // Dispatches queued watch events (called from the loop when the fd is readable).
  void dispatch_watches();

 protected:
  void unwatch(uint64_t id) noexcept override;

 private:
  explicit XsClient(struct xs_handle* h) : h_(h) {}
  struct Registration {
    std::string path;
    std::shared_ptr<WatchCallback> cb;
  };
  struct xs_handle* h_;
  uint64_t next_id_ = 1;
  std::map<uint64_t, Registration> watches_;
  EventLoop::Watch fd_watch_;
};

}  // namespace pvhost::xen
