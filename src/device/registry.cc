#include "src/device/registry.h"

#include <algorithm>

#include <fmt/format.h>

namespace pvhost {

void Registry::add(BackendType type) { types_.push_back(std::move(type)); }

const BackendType* Registry::find(std::string_view name) const {
  for (const auto& t : types_)
    if (t.name == name) return &t;
  return nullptr;
}

std::vector<std::string_view> Registry::names() const {
  std::vector<std::string_view> out;
  for (const auto& t : types_) out.push_back(t.name);
  return out;
}

bool Registry::is_opt_in(std::string_view name) const {
  return std::find(opt_in_.begin(), opt_in_.end(), name) != opt_in_.end();
}

std::vector<std::string_view> Registry::default_names() const {
  std::vector<std::string_view> out;
  for (const auto& t : types_)
    if (!is_opt_in(t.name)) out.push_back(t.name);
  return out;
}

Result<void> check_required_keys(const BackendType& type, const DeviceContext& ctx) {
  for (const auto& k : type.keys)
    if (k.required && !ctx.backend_keys.contains(std::string(k.name)))
      return fail(EINVAL, fmt::format("backend key '{}' ({}) is missing", k.name, k.meaning));
  return {};
}

}  // namespace pvhost
