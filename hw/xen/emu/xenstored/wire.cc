#include "hw/xen/emu/xenstored/wire.h"

#include <cerrno>
#include <cstring>

namespace pvhost::xenemu {

const char* describe(FrameError e) {
  switch (e) {
    case FrameError::payload_too_long:
      return "payload length exceeds XENSTORE_PAYLOAD_MAX";
  }
  return "unknown framing error";
}

void MessageReader::feed(std::span<const std::byte> bytes) {
  feed(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
}

void MessageReader::feed(std::string_view bytes) {
  // Compact lazily so a long-lived connection does not grow its buffer without bound.
  if (pos_ > 0 && pos_ >= buf_.size() / 2) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  buf_.append(bytes);
}

std::variant<std::monostate, WireMessage, FrameError> MessageReader::next() {
  const size_t avail = buf_.size() - pos_;
  if (avail < kHeaderSize) return std::monostate{};
  xsd_sockmsg hdr;
  std::memcpy(&hdr, buf_.data() + pos_, kHeaderSize);
  // Checked before waiting for the payload: an oversized length is fatal at once, as in
  // xenstored's handle_input().
  if (hdr.len > kPayloadMax) return FrameError::payload_too_long;
  if (avail - kHeaderSize < hdr.len) return std::monostate{};
  WireMessage m;
  m.type = hdr.type;
  m.req_id = hdr.req_id;
  m.tx_id = hdr.tx_id;
  m.payload.assign(buf_, pos_ + kHeaderSize, hdr.len);
  pos_ += kHeaderSize + hdr.len;
  if (pos_ == buf_.size()) {
    buf_.clear();
    pos_ = 0;
  }
  return m;
}

const char* op_name(uint32_t type) {
  static constexpr const char* kNames[] = {
      "CONTROL",     "DIRECTORY",  "READ",        "GET_PERMS",      "WATCH",
      "UNWATCH",     "TRANSACTION_START",          "TRANSACTION_END", "INTRODUCE",
      "RELEASE",     "GET_DOMAIN_PATH",            "WRITE",          "MKDIR",
      "RM",          "SET_PERMS",  "WATCH_EVENT", "ERROR",          "IS_DOMAIN_INTRODUCED",
      "RESUME",      "SET_TARGET", "RESTRICT",    "RESET_WATCHES",  "DIRECTORY_PART",
  };
  if (type < std::size(kNames)) return kNames[type];
  return "UNKNOWN";
}

SplitStrings split_strings(std::string_view payload) {
  SplitStrings out;
  size_t start = 0;
  for (size_t i = 0; i < payload.size(); ++i) {
    if (payload[i] == '\0') {
      out.strings.push_back(payload.substr(start, i - start));
      start = i + 1;
    }
  }
  out.tail = payload.substr(start);
  return out;
}

namespace {

Request einval(Request r, const char* why) {
  r.invalid = why;
  r.args.clear();
  r.value.clear();
  return r;
}

}  // namespace

std::variant<Request, RequestError> decode_request(const WireMessage& m) {
  Request r;
  r.req_id = m.req_id;
  r.tx_id = m.tx_id;
  const std::string_view p = m.payload;
  SplitStrings s = split_strings(p);
  auto take = [&](size_t n) {
    for (size_t i = 0; i < n && i < s.strings.size(); ++i) r.args.emplace_back(s.strings[i]);
  };
  // onearg() in xenstored: exactly one NUL, at the end.
  auto one_arg = [&]() -> bool {
    if (s.strings.size() != 1 || !s.tail.empty()) return false;
    take(1);
    return true;
  };

  switch (m.type) {
    case XS_READ:
    case XS_DIRECTORY:
    case XS_GET_PERMS:
    case XS_MKDIR:
    case XS_RM:
    case XS_GET_DOMAIN_PATH:
    case XS_IS_DOMAIN_INTRODUCED:
    case XS_RELEASE:
    case XS_RESUME:
    case XS_TRANSACTION_END:
      r.op = static_cast<Op>(m.type);
      if (!one_arg()) return einval(std::move(r), "expected exactly one NUL-terminated argument");
      return r;
    case XS_WRITE: {
      r.op = Op::write;
      // <path>|<value|>: the value is binary and runs to the end of the payload.
      const size_t nul = p.find('\0');
      if (nul == std::string_view::npos) return einval(std::move(r), "WRITE without NUL after the path");
      r.args.emplace_back(p.substr(0, nul));
      r.value.assign(p.substr(nul + 1));
      return r;
    }
    case XS_DIRECTORY_PART:
      r.op = Op::directory_part;
      if (s.strings.size() != 2) return einval(std::move(r), "DIRECTORY_PART needs <path>|<offset>|");
      take(2);
      return r;
    case XS_SET_PERMS:
      r.op = Op::set_perms;
      if (s.strings.size() < 2) return einval(std::move(r), "SET_PERMS needs <path>|<perm>|+");
      take(s.strings.size());
      return r;
    case XS_WATCH:
    case XS_UNWATCH:
      r.op = static_cast<Op>(m.type);
      if (s.strings.size() != 2) return einval(std::move(r), "expected <path>|<token>|");
      take(2);
      return r;
    case XS_TRANSACTION_START:
      r.op = Op::transaction_start;  // payload reserved ("" by every client)
      return r;
    case XS_RESET_WATCHES:
      r.op = Op::reset_watches;
      return r;
    case XS_INTRODUCE:
      r.op = Op::introduce;
      if (s.strings.size() < 3) return einval(std::move(r), "INTRODUCE needs <domid>|<gfn>|<evtchn>|");
      take(3);
      return r;
    case XS_SET_TARGET:
      r.op = Op::set_target;
      if (s.strings.size() < 2) return einval(std::move(r), "SET_TARGET needs <domid>|<tdomid>|");
      take(2);
      return r;
    case XS_CONTROL:
      r.op = Op::control;
      if (s.strings.empty()) return einval(std::move(r), "CONTROL without a command");
      take(s.strings.size());
      return r;
    default:
      // WATCH_EVENT and ERROR are server-to-client only; RESTRICT was removed;
      // GET/SET_FEATURE and GET/SET_QUOTA are optional (xenstore.txt): ENOSYS.
      return RequestError{ENOSYS, "unsupported message type"};
  }
}

std::string encode_message(uint32_t type, uint32_t req_id, uint32_t tx_id,
                           std::string_view payload) {
  xsd_sockmsg hdr{};
  hdr.type = type;
  hdr.req_id = req_id;
  hdr.tx_id = tx_id;
  hdr.len = static_cast<uint32_t>(payload.size());
  std::string out(kHeaderSize + payload.size(), '\0');
  std::memcpy(out.data(), &hdr, kHeaderSize);
  std::memcpy(out.data() + kHeaderSize, payload.data(), payload.size());
  return out;
}

std::string error_payload(int code) {
  for (const auto& e : xsd_errors) {
    if (e.errnum == code) return std::string(e.errstring) + '\0';
  }
  return std::string("EINVAL") + '\0';
}

}  // namespace pvhost::xenemu
