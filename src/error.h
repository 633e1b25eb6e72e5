// Project-wide error value: an errno-style code, a message, and context added per layer.
// Errors are values (STYLE.md rule 8): functions return Result<T>; nothing throws across
// the event loop or a backend hook.
#pragma once

#include <cerrno>
#include <expected>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace pvhost {

class Error {
 public:
  Error(int code, std::string message) : code_(code), message_(std::move(message)) {}

  // An error from the current errno, e.g. Error::from_errno("open /dev/xen/privcmd").
  static Error from_errno(std::string what) { return Error(errno, std::move(what)); }

  [[nodiscard]] int code() const { return code_; }
  [[nodiscard]] const std::string& message() const { return message_; }
  [[nodiscard]] const std::vector<std::string>& contexts() const { return context_; }

  // Adds an outer layer: "connect" + "reading ring-ref3: ENOENT" -> "connect: reading ...".
  Error& add_context(std::string layer) & {
    context_.push_back(std::move(layer));
    return *this;
  }
  Error&& add_context(std::string layer) && {
    context_.push_back(std::move(layer));
    return std::move(*this);
  }

  // "outer: inner: message: ENOENT" (the errno name is appended when code != 0): for logs.
  [[nodiscard]] std::string describe() const;
  // "outer: inner: message": for people (command-line errors, QMP desc), where the errno
  // name adds nothing to a message that already says what was wrong.
  [[nodiscard]] std::string what() const;

 private:
  int code_;
  std::string message_;
  std::vector<std::string> context_;  // innermost first
};

template <class T>
using Result = std::expected<T, Error>;

// The errno name ("ENOENT"), or "E<number>" for unknown codes.
[[nodiscard]] std::string errno_name(int code);

// Parses an errno name back to its code; 0 when unknown. Used by the xenstore wire
// protocol, where errors travel as names.
[[nodiscard]] int errno_from_name(std::string_view name);

[[nodiscard]] inline std::unexpected<Error> fail(int code, std::string message) {
  return std::unexpected(Error(code, std::move(message)));
}
[[nodiscard]] inline std::unexpected<Error> fail_errno(std::string what) {
  return std::unexpected(Error::from_errno(std::move(what)));
}

// Adds context to the error of a Result, leaving a value untouched:
//   return with_context(read_key(k), "connect");
// (GCC 12's std::expected has no transform_error yet.)
template <class T>
[[nodiscard]] Result<T> with_context(Result<T> r, std::string layer) {
  if (!r) r.error().add_context(std::move(layer));
  return r;
}

}  // namespace pvhost

#define PVHOST_CAT_(a, b) a##b
#define PVHOST_CAT(a, b) PVHOST_CAT_(a, b)

// Unwraps a Result or returns its error from the enclosing function.
// (A GNU statement expression; __extension__ keeps -Wpedantic quiet. __COUNTER__ keeps
// nested uses from shadowing each other.)
#define PVHOST_TRY(expr) PVHOST_TRY_IMPL_(expr, PVHOST_CAT(pvhost_try_r_, __COUNTER__))
#define PVHOST_TRY_IMPL_(expr, r)                                    \
  __extension__({                                                    \
    auto&& r = (expr);                                               \
    if (!r) return std::unexpected(std::move(r).error());            \
    std::move(r).value();                                            \
  })

// Same, adding a context layer to the error on the way out.
#define PVHOST_TRY_CTX(expr, layer) \
  PVHOST_TRY_CTX_IMPL_(expr, layer, PVHOST_CAT(pvhost_try_r_, __COUNTER__))
#define PVHOST_TRY_CTX_IMPL_(expr, layer, r)                                     \
  __extension__({                                                                \
    auto&& r = (expr);                                                           \
    if (!r) return std::unexpected(std::move(r).error().add_context(layer));     \
    std::move(r).value();                                                        \
  })
