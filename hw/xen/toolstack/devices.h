// The toolstack's device operations, done in xenstore exactly as libxl 4.17 does them for
// a PV guest (shared/reference/libxl-4.17-pv/xenstore-*.txt): backend directory with perms
// [n<backend>, r<frontend>], frontend directory with perms [n<frontend>, r<backend>], both
// written in one transaction with online=1 and state=1; unplug = online=0, state=5, wait
// for the backend to reach Closed (6), remove both. Used by pvhost-xl and the tests; plain
// xenstore, so it works against real xenstored too.
#pragma once

#include <chrono>
#include <map>
#include <string>
#include <vector>

#include "hw/xen/xen.h"

namespace pvhost::toolstack {

// A disk name per xen-vbd-interface(7) ("xvda", "xvdb3", "hda", "sdc", or a number) to its
// virtual-device number.
[[nodiscard]] Result<uint32_t> vbd_number(std::string_view name);

struct DeviceRequest {
  std::string type;      // qdisk, vbd, console, vfb, vkbd, qnic, vif, virtio_disk, or a test type
  DomId frontend;
  DomId backend{0};
  // Per-type settings, key=value as on pvhost-xl's command line:
  //   qdisk/vbd: target=PATH format=raw|qcow2|vhd|nbd vdev=xvda mode=w|r devtype=disk|cdrom
  //              discard=on|off
  //   console:   devid=N (0 = the primary console) output=pty|... name=NAME type=ioemu
  //   vfb:       vnclisten=ADDR vncdisplay=N;  qnic/vif: mac=... bridge=...
  //   any type:  be.KEY=VALUE / fe.KEY=VALUE add raw backend / frontend keys
  std::map<std::string, std::string> settings;
};

struct DeviceAddress {
  std::string type;
  DomId frontend;
  std::string devid;
  std::string backend_path;
  std::string frontend_path;
};

// Writes the device; returns where it is. Refuses an existing devid.
[[nodiscard]] Result<DeviceAddress> device_add(xen::XenStore& xs, const DeviceRequest& req);
// Unplugs as libxl does, waiting up to `timeout` for Closed; then removes both directories
// (also after a timeout, as libxl's forced removal does, reporting it).
[[nodiscard]] Result<void> device_del(xen::XenStore& xs, const DeviceAddress& dev,
                                      std::chrono::milliseconds timeout = std::chrono::seconds(10));
// The devices of `frontend` under backend domain `backend`, every type.
[[nodiscard]] Result<std::vector<DeviceAddress>> device_list(xen::XenStore& xs, DomId backend, DomId frontend);
// Finds one device by type and devid (or vdev name for disks).
[[nodiscard]] Result<DeviceAddress> device_find(xen::XenStore& xs, DomId backend, DomId frontend,
                                                const std::string& type, const std::string& id);

}  // namespace pvhost::toolstack
