#include <catch2/catch.hpp>

#include "hw/xen/toolstack/devices.h"

using pvhost::toolstack::vbd_number;

TEST_CASE("disk names encode as xen-vbd-interface(7) says") {
  CHECK(*vbd_number("xvda") == 51712u);   // 202 << 8
  CHECK(*vbd_number("xvdb") == 51728u);   // as in the libxl capture
  CHECK(*vbd_number("xvdc") == 51744u);
  CHECK(*vbd_number("xvda1") == 51713u);
  CHECK(*vbd_number("xvdq") == ((1u << 28) | (16u << 8)));  // 17th disk: extended scheme
  CHECK(*vbd_number("xvdaa") == ((1u << 28) | (26u << 8)));
  CHECK(*vbd_number("hda") == (3u << 8));
  CHECK(*vbd_number("hdb") == ((3u << 8) | 64u));
  CHECK(*vbd_number("hdc") == (22u << 8));
  CHECK(*vbd_number("sdb") == ((8u << 8) | 16u));
  CHECK(*vbd_number("51712") == 51712u);
}

TEST_CASE("names that are not disks are refused") {
  for (const char* bad : {"", "xvd", "xvdA", "vda", "xvda-1", "hde", "xvda16x"}) CHECK_FALSE(vbd_number(bad));
}
