// What the console devices of one pvhost process share: the `-chardev` list from the
// command line (for `output = chardev:ID`) and the chardev registry that QMP's
// `query-chardev` reads ({label, filename, frontend-open} per console, QEMU's ChardevInfo).
//
// Glue (src/app/main.cc, once, before the BackendHost starts):
//   console::process_console_host().set_chardevs(options.chardevs);
// and, with a QMP server:
//   console::process_console_host().set_sink(
//       [&server](std::string label, std::function<std::string()> filename, std::function<bool()> open) {
//         auto reg = std::make_shared<qmp::Registration>(server.add_chardev(std::move(label), std::move(filename), open()));
//         return std::function<void()>([reg] { reg->reset(); });
//       });
// or simply answer query-chardev with process_console_host().rows() appended.
// Everything here runs on the main loop's thread.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "src/cli.h"

namespace pvhost::console {

struct ChardevRow {
  std::string label;
  std::string filename;  // "pty:/dev/pts/3"
  bool frontend_open = false;
};

class ConsoleHost {
 public:
  using FilenameFn = std::function<std::string()>;
  using OpenFn = std::function<bool()>;
  // Mirrors one entry elsewhere (QMP); returns the undo, called when the console goes.
  using Sink = std::function<std::function<void()>(std::string label, FilenameFn filename, OpenFn frontend_open)>;

  // A registry entry; removes itself on destruction.
  class Entry {
   public:
    Entry() = default;
    Entry(Entry&& o) noexcept : host_(std::exchange(o.host_, nullptr)), id_(o.id_) {}
    Entry& operator=(Entry&& o) noexcept {
      if (this != &o) {
        reset();
        host_ = std::exchange(o.host_, nullptr);
        id_ = o.id_;
      }
      return *this;
    }
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;
    ~Entry() { reset(); }
    void reset() noexcept;

   private:
    friend class ConsoleHost;
    Entry(ConsoleHost* h, uint64_t id) : host_(h), id_(id) {}
    ConsoleHost* host_ = nullptr;
    uint64_t id_ = 0;
  };

  void set_chardevs(std::vector<ChardevOptions> chardevs) { chardevs_ = std::move(chardevs); }
  [[nodiscard]] const std::vector<ChardevOptions>& chardevs() const { return chardevs_; }
  [[nodiscard]] bool has_chardevs() const { return !chardevs_.empty(); }

  [[nodiscard]] Entry add(std::string label, FilenameFn filename, OpenFn frontend_open);
  // The rows in registration order, evaluated now.
  [[nodiscard]] std::vector<ChardevRow> rows() const;
  // Installs the sink and replays the entries that exist already.
  void set_sink(Sink sink);

 private:
  struct Item {
    std::string label;
    FilenameFn filename;
    OpenFn frontend_open;
    std::function<void()> undo;
  };
  void remove(uint64_t id) noexcept;

  std::vector<ChardevOptions> chardevs_;
  std::map<uint64_t, Item> items_;
  uint64_t next_id_ = 1;
  Sink sink_;
};

// The process's ConsoleHost, used by register_console_backends(Registry&). Configured once
// at start-up before devices exist (like the log sink); tests make their own ConsoleHost.
[[nodiscard]] ConsoleHost& process_console_host();

}  // namespace pvhost::console
