// The xenstore wire protocol (xen/io/xs_wire.h, docs/misc/xenstore.txt) as pure
// functions: bytes -> framed message or typed error, message -> decoded request, and the
// encoding of replies. Nothing here touches a socket, so it is unit-tested and fuzzed on
// plain buffers (STYLE.md rule 6).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include <xen/io/xs_wire.h>

namespace pvhost::xenemu {

inline constexpr size_t kHeaderSize = sizeof(xsd_sockmsg);  // 16 bytes
inline constexpr size_t kPayloadMax = XENSTORE_PAYLOAD_MAX;  // 4096, both directions
inline constexpr size_t kAbsPathMax = XENSTORE_ABS_PATH_MAX;
inline constexpr size_t kRelPathMax = XENSTORE_REL_PATH_MAX;

// One framed message as it came off the wire (header fields in host order: the socket
// protocol is host-endian, as libxenstore writes the struct directly).
struct WireMessage {
  uint32_t type = 0;
  uint32_t req_id = 0;
  uint32_t tx_id = 0;
  std::string payload;  // exactly header.len bytes
};

// Framing errors: the stream cannot be resynchronised, so the connection is closed
// (xenstore.txt: "If a client exceeds the limit, its xenstored connection will be
// immediately killed").
enum class FrameError { payload_too_long };
[[nodiscard]] const char* describe(FrameError e);

// Incremental framer: feed() bytes as they arrive, then take messages with next().
// Buffered input never exceeds one header plus kPayloadMax bytes beyond what next()
// has not yet consumed.
class MessageReader {
 public:
  void feed(std::span<const std::byte> bytes);
  void feed(std::string_view bytes);
  // A complete message, nothing (need more bytes), or a fatal framing error.
  [[nodiscard]] std::variant<std::monostate, WireMessage, FrameError> next();
  [[nodiscard]] size_t buffered() const { return buf_.size() - pos_; }

 private:
  std::string buf_;
  size_t pos_ = 0;
};

// A request's arguments: the payload split at NUL bytes (xenstore.txt notation).
// Each operation decodes its own shape; a payload that does not match gives EINVAL
// (C xenstored answers EINVAL, it does not close the connection), an unknown or
// server-only type ENOSYS.
enum class Op : uint32_t {
  control = XS_CONTROL,
  directory = XS_DIRECTORY,
  read = XS_READ,
  get_perms = XS_GET_PERMS,
  watch = XS_WATCH,
  unwatch = XS_UNWATCH,
  transaction_start = XS_TRANSACTION_START,
  transaction_end = XS_TRANSACTION_END,
  introduce = XS_INTRODUCE,
  release = XS_RELEASE,
  get_domain_path = XS_GET_DOMAIN_PATH,
  write = XS_WRITE,
  mkdir = XS_MKDIR,
  rm = XS_RM,
  set_perms = XS_SET_PERMS,
  is_domain_introduced = XS_IS_DOMAIN_INTRODUCED,
  resume = XS_RESUME,
  set_target = XS_SET_TARGET,
  reset_watches = XS_RESET_WATCHES,
  directory_part = XS_DIRECTORY_PART,
};
[[nodiscard]] const char* op_name(uint32_t type);

struct Request {
  Op op = Op::read;
  uint32_t req_id = 0;
  uint32_t tx_id = 0;
  // Decoded arguments. For WRITE: args[0] = path, `value` = the rest (binary, may
  // contain NULs). For SET_PERMS: args[0] = path, args[1..] = perm strings.
  std::vector<std::string> args;
  std::string value;
  // Set when the payload does not have the operation's shape: answered EINVAL after the
  // privilege and transaction checks, in xenstored's order.
  const char* invalid = nullptr;
};

// Why a message is not a request at all: an errno to answer with (ENOSYS).
struct RequestError {
  int code;
  const char* why;
};

[[nodiscard]] std::variant<Request, RequestError> decode_request(const WireMessage& m);

// Splits `payload` into its NUL-terminated strings; bytes after the last NUL are
// returned in `tail` (get_strings() in xenstored ignores them).
struct SplitStrings {
  std::vector<std::string_view> strings;
  std::string_view tail;
};
[[nodiscard]] SplitStrings split_strings(std::string_view payload);

// Serialises header + payload. The caller guarantees payload.size() <= kPayloadMax.
[[nodiscard]] std::string encode_message(uint32_t type, uint32_t req_id, uint32_t tx_id,
                                         std::string_view payload);
// "ENOENT\0" etc.; codes not in xs_wire.h's xsd_errors table become EINVAL, as in
// xenstored's send_error().
[[nodiscard]] std::string error_payload(int code);

}  // namespace pvhost::xenemu
