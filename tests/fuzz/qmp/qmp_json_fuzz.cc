// libFuzzer target for the QMP input path: JsonFramer over an arbitrary split of the input,
// nlohmann parsing of every frame, argument checking and the built-in handlers through
// Server::execute, the QEMU-style writer (its output must parse back to the same value)
// and the device-state loader. Nothing here may crash, hang or leak.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "qmp/json_framer.h"
#include "qmp/json_writer.h"
#include "qmp/migration_stream.h"
#include "qmp/server.h"

namespace {

using nlohmann::json;
namespace qmp = pvhost::qmp;

struct World {
  World() {
    server->set_shutdown_handler([](std::string_view) {});  // "quit" via HMP must not end anything
  }
  std::unique_ptr<pvhost::EventLoop> loop = std::move(*pvhost::EventLoop::create("fuzz"));
  std::unique_ptr<qmp::Server> server = std::move(*qmp::Server::create(*loop, qmp::ServerInfo{}));
};

World& world() {
  static World w;
  return w;
}

void check_roundtrip(const json& v) {
  const std::string text = qmp::to_json(v);
  json back = json::parse(text, nullptr, false);
  if (back.is_discarded()) __builtin_trap();
  // Strings with invalid UTF-8 cannot come out of the parser, so equality must hold.
  if (back != v && !(v.is_number_float() || back.is_number_float())) __builtin_trap();
}

void handle(const std::string_view message) {
  json req = json::parse(message, nullptr, false);
  if (req.is_discarded()) return;
  check_roundtrip(req);
  if (!req.is_object()) return;
  auto it = req.find("execute");
  if (it == req.end() || !it->is_string()) return;
  const std::string& name = it->get_ref<const std::string&>();
  // Commands with effects outside this process (files, exit) are not run.
  if (name == "quit" || name == "xen-save-devices-state" || name == "xen-load-devices-state") return;
  json args = req.contains("arguments") ? req["arguments"] : json::object();
  bool answered = false;
  world().server->execute(name, args, [&](qmp::CommandResult r) {
    answered = true;
    if (r) check_roundtrip(*r);
  });
  // Every built-in answers synchronously (stop/cont with no hooks registered).
  if (!answered) __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  (void)qmp::check_device_state(in);
  const size_t cut = size == 0 ? 0 : data[0] % (size + 1);
  qmp::JsonFramer framer(qmp::FramerLimits{1u << 16, 64});
  auto sink = [](const qmp::JsonFramer::Frame& f) {
    if (!f.message.empty()) handle(f.message);
  };
  framer.feed(in.substr(0, cut), sink);
  framer.feed(in.substr(cut), sink);
  (void)world().loop->run_once(std::chrono::milliseconds(0));  // deferred work (quit's SHUTDOWN)
  return 0;
}
