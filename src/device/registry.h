// The registry of backend types (STYLE.md rule 3): {type name, the backend keys it reads,
// create}, filled by an explicit list (make_registry in src/device/registry.cc, one line
// per backend folder compiled in), never by static-initialiser tricks.
#pragma once

#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "src/device/xen_device.h"

namespace pvhost {

struct BackendKeySpec {
  std::string_view name;
  bool required;
  std::string_view meaning;
};

struct BackendType {
  std::string_view name;         // xenstore backend type: "qdisk", "console", ...
  std::string_view description;  // for -backends help
  std::vector<BackendKeySpec> keys;  // backend keys it reads (others are ignored)
  // Builds the device from its context; parses the keys into the backend's config.
  std::function<Result<std::unique_ptr<XenDevice>>(DeviceContext)> create;
  // Whether this device is one this backend serves (e.g. the console backend serves only
  // consoles whose frontend `type` is "ioemu"). Default: all.
  std::function<bool(xen::XenStore&, const DeviceContext&)> accepts;
};

class Registry {
 public:
  void add(BackendType type);
  [[nodiscard]] const BackendType* find(std::string_view name) const;
  [[nodiscard]] std::vector<std::string_view> names() const;
  [[nodiscard]] std::span<const BackendType> types() const { return types_; }
  // An opt-in type is served only when -backends names it (vbd: on real Xen the kernel's
  // blkback serves vbd devices, and a device model must not take them by default).
  void mark_opt_in(std::string_view name) { opt_in_.emplace_back(name); }
  [[nodiscard]] bool is_opt_in(std::string_view name) const;
  // The types served when -backends is not given.
  [[nodiscard]] std::vector<std::string_view> default_names() const;

 private:
  std::vector<BackendType> types_;
  std::vector<std::string> opt_in_;
};

// The backend types compiled into this binary.
[[nodiscard]] Registry make_registry();

// Checks the required keys of `type` are present, naming the first missing one.
[[nodiscard]] Result<void> check_required_keys(const BackendType& type, const DeviceContext& ctx);

}  // namespace pvhost
