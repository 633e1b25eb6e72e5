// Console configuration, parsed at the edge into typed values (STYLE.md rule 4).
//
// Keys (docs/misc/console.txt; libxl writes them, shared/reference/libxl-4.17-pv):
//   frontend  type      "ioemu" (ours) or "xenconsoled" (never touched, see register.cc)
//             output    where the console goes, see OutputSpec below (libxl writes "pty")
//             limit     bytes of unsent guest output held host-side (libxl: 1048576)
//             name      the console's name (channels), used as its chardev label
//             ring-ref  primary: a guest frame (gfn); secondary: a grant reference
//             port      the guest's unbound event channel
//             tty       written by us: the pty path, for `xl console`
//   backend   protocol  "vt100" (the only one there is)
//             output    overrides the frontend's (toolstack-owned, so any kind is allowed)
//             log       optional extra file where the guest's output is kept, one
//                       timestamped line per line ("[2026-11-22 04:05:06.123] text")
//
// Output kinds (the `output` value):
//   pty                a fresh pty in raw mode; its path goes into the frontend `tty` node
//   null               guest output discarded, no input
//   file:PATH          guest output appended to PATH, no input
//   log:PATH           guest output appended to PATH as timestamped lines, no input
//   unix:PATH,server   a listening unix socket; one client at a time, reconnectable; the
//                      ",server" suffix is optional (a console always listens)
//   chardev:ID         a `-chardev` from the command line: pty, socket (path, server), file,
//                      null (as libxl passes `-chardev pty,id=libxl-channelN` for channels)
//
// Trust: a secondary console's frontend directory belongs to the guest, which can rewrite
// `output`. An output read from a node the guest owns may only be `pty` or `null`; paths and
// command-line chardevs must come from a node the toolstack owns (the backend directory, or
// the primary console's directory, which dom0 owns).
#pragma once

#include <cstddef>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>

#include "src/cli.h"
#include "src/error.h"

namespace pvhost::console {

inline constexpr size_t kDefaultLimit = 1048576;  // libxl's default `limit`
inline constexpr size_t kMaxLimit = 64u << 20;    // a hostile `limit` cannot make us hoard more

struct PtyOutput {
  friend bool operator==(const PtyOutput&, const PtyOutput&) = default;
};
struct NullOutput {
  friend bool operator==(const NullOutput&, const NullOutput&) = default;
};
struct FileOutput {
  std::string path;
  friend bool operator==(const FileOutput&, const FileOutput&) = default;
};
struct LogOutput {
  std::string path;
  friend bool operator==(const LogOutput&, const LogOutput&) = default;
};
struct SocketOutput {
  std::string path;
  friend bool operator==(const SocketOutput&, const SocketOutput&) = default;
};
using OutputSpec = std::variant<PtyOutput, NullOutput, FileOutput, LogOutput, SocketOutput>;

enum class Trusted { no, yes };

// Parses an `output` value. `chardevs` resolves chardev:ID (nullptr: none were given).
// An untrusted value may only name pty or null.
[[nodiscard]] Result<OutputSpec> parse_output(std::string_view text, Trusted trusted,
                                              const std::span<const ChardevOptions>* chardevs);
// A -chardev as an output.
[[nodiscard]] Result<OutputSpec> output_from_chardev(const ChardevOptions& c);

// Parses `limit`: absent or 0 -> kDefaultLimit; clamped to kMaxLimit.
[[nodiscard]] Result<size_t> parse_limit(std::optional<std::string_view> text);

}  // namespace pvhost::console
