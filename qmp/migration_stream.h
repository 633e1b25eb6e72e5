// The device-state stream of xen-save-devices-state / xen-load-devices-state
// (migration/savevm.c qemu_save_device_state, qemu_loadvm_state).
//
// A PV device model keeps no device state: every backend reconnects from xenstore after a
// restore. What QEMU writes for such a machine is a QEMU migration stream with no device
// sections:
//
//   be32 QEMU_VM_FILE_MAGIC   0x5145564D ("QEVM")
//   be32 QEMU_VM_FILE_VERSION 0x00000003
//   u8   QEMU_VM_EOF          0x00
//
// (9 bytes). No configuration section: QEMU's Xen accelerator calls
// savevm_skip_configuration() (accel/xen/xen-all.c), and qemu_save_device_state never
// writes one anyway. Section footers are off for Xen too (savevm_skip_section_footers).
// A stock QEMU also saves its emulated-CPU "timer" section here; a PV device model has no
// emulated CPU clock, so pvhost writes none.
//
// The loader accepts that stream, and also what a stock xenpv QEMU writes (a "timer"
// section, version 1 or 2, optionally followed by a footer; a configuration section if
// present), so `xl restore` of an image saved with QEMU works; any other section is an
// error, as QEMU reports an unknown section.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "src/error.h"

namespace pvhost::qmp {

inline constexpr uint32_t kQemuVmFileMagic = 0x5145564D;
inline constexpr uint32_t kQemuVmFileVersion = 3;

[[nodiscard]] std::string empty_device_state();
[[nodiscard]] Result<void> check_device_state(std::string_view bytes);

// QEMU opens with O_WRONLY | O_CREAT | O_TRUNC, mode 0660 (migration/savevm.c).
[[nodiscard]] Result<void> save_device_state_file(const std::string& path);
[[nodiscard]] Result<void> load_device_state_file(const std::string& path);

}  // namespace pvhost::qmp
