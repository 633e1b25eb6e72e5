#include "backends/console/config.h"

#include <charconv>

#include <fmt/format.h>

namespace pvhost::console {

Result<OutputSpec> output_from_chardev(const ChardevOptions& c) {
  if (c.backend == "pty") return PtyOutput{};
  if (c.backend == "null") return NullOutput{};
  if (c.backend == "file") {
    if (!c.path || c.path->empty()) return fail(EINVAL, fmt::format("chardev '{}': file needs path=", c.id));
    return FileOutput{*c.path};
  }
  if (c.backend == "socket") {
    if (!c.path || c.path->empty()) return fail(EINVAL, fmt::format("chardev '{}': socket needs path=", c.id));
    if (!c.server)
      return fail(EINVAL, fmt::format("chardev '{}': a console socket must be server=on (it listens)", c.id));
    return SocketOutput{*c.path};
  }
  return fail(EINVAL, fmt::format("chardev '{}': backend '{}' cannot carry a console (pty, socket, file, null)",
                                  c.id, c.backend));
}

Result<OutputSpec> parse_output(std::string_view text, Trusted trusted,
                                const std::span<const ChardevOptions>* chardevs) {
  if (text.empty() || text == "pty") return PtyOutput{};
  if (text == "null") return NullOutput{};
  const auto colon = text.find(':');
  const std::string_view kind = text.substr(0, colon);
  const std::string_view rest = colon == std::string_view::npos ? std::string_view{} : text.substr(colon + 1);
  if (kind != "file" && kind != "log" && kind != "unix" && kind != "chardev")
    return fail(EINVAL, fmt::format("output '{}': unknown kind (pty, null, file:, log:, unix:, chardev:)", text));
  if (trusted == Trusted::no)
    return fail(EPERM, fmt::format("output '{}': a node the guest can write may only say pty or null", text));
  if (rest.empty()) return fail(EINVAL, fmt::format("output '{}': {}: needs a value", text, kind));
  if (kind == "file") return FileOutput{std::string(rest)};
  if (kind == "log") return LogOutput{std::string(rest)};
  if (kind == "unix") {
    std::string_view path = rest;
    if (path.ends_with(",server")) path.remove_suffix(7);
    else if (path.ends_with(",server=on")) path.remove_suffix(10);
    if (path.empty() || path.find(',') != std::string_view::npos)
      return fail(EINVAL, fmt::format("output '{}': expected unix:PATH[,server]", text));
    return SocketOutput{std::string(path)};
  }
  // chardev:ID
  if (chardevs != nullptr) {
    for (const auto& c : *chardevs)
      if (c.id == rest) return with_context(output_from_chardev(c), fmt::format("output '{}'", text));
  }
  return fail(ENOENT, fmt::format("output '{}': no -chardev with id '{}'", text, rest));
}

Result<size_t> parse_limit(std::optional<std::string_view> text) {
  if (!text || text->empty()) return kDefaultLimit;
  uint64_t v = 0;
  auto [end, ec] = std::from_chars(text->data(), text->data() + text->size(), v);
  if (ec != std::errc() || end != text->data() + text->size())
    return fail(EINVAL, fmt::format("limit '{}' is not an unsigned number", *text));
  if (v == 0) return kDefaultLimit;
  return static_cast<size_t>(std::min<uint64_t>(v, kMaxLimit));
}

}  // namespace pvhost::console
