// A minimal backend for the lifecycle conformance suite: no data plane, every step visible
// in xenstore. Registered as `testdev` and `testdev2` (two types, for split-process tests).
//
//   realize:    fails if backend key fail-realize=1; else writes feature-testdev=1
//   connect:    reads frontend ring-ref and event-channel (unsigned integers, required) and
//               echoes them as connected-ring-ref; bad values fail the connect
//   disconnect: counts into the `disconnects` backend key
#include "src/device/registry.h"

namespace pvhost {
namespace {

class TestDevice final : public XenDevice {
 public:
  using XenDevice::XenDevice;

 protected:
  Result<void> realize() override {
    if (backend_key("fail-realize") == "1") return fail(EINVAL, "fail-realize requested");
    return write_backend("feature-testdev", "1");
  }
  Result<void> connect() override {
    uint64_t ring = PVHOST_TRY_CTX(read_frontend_uint("ring-ref"), "reading ring-ref");
    PVHOST_TRY_CTX(read_frontend_uint("event-channel"), "reading event-channel");
    live_ = true;
    return write_backend("connected-ring-ref", std::to_string(ring));
  }
  void disconnect() override {
    if (!live_) return;
    live_ = false;
    ++disconnects_;
    (void)write_backend("disconnects", std::to_string(disconnects_));  // observability only
  }

 private:
  bool live_ = false;
  int disconnects_ = 0;
};

BackendType test_type(std::string_view name) {
  return BackendType{
      name,
      "lifecycle test device (no data plane)",
      {{"frontend", true, "frontend path"}},
      [](DeviceContext ctx) -> Result<std::unique_ptr<XenDevice>> { return std::make_unique<TestDevice>(std::move(ctx)); },
      {},
  };
}

}  // namespace

void register_builtin_backends(Registry& r);  // src/app/builtin_backends.cc

// pvhost-test's registry: the built-in types plus the test types.
Registry make_registry() {
  Registry r;
  register_builtin_backends(r);
  r.add(test_type("testdev"));
  r.add(test_type("testdev2"));
  return r;
}

}  // namespace pvhost
