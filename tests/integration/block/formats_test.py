#!/usr/bin/env python3
"""Every image format served to our blkfront through qdisk (issue #7's test list): images
made by qemu-img (qcow2 at 4 KiB, 64 KiB and 2 MiB clusters, qcow2 over a backing file,
dynamic VHD), a differencing VHD made by pvhost's own writer, and NBD through qemu-nbd
with the server restarted mid-workload.

For each: blkfront runs a verified workload (every read checked against what it wrote)
and writes the expected disk content; `qemu-img compare` holds the image to it (pvhost's
view equals qemu-img's), then a second run exercises flush, barrier and discard, and
`qemu-img check` must find the image clean.

    formats_test.py [BUILD_DIR]      (default: $PVHOST_BUILD_DIR or build)
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pvtest import BUILD, check_clean, finish_blkfront, qemu_img, run_cases  # noqa: E402

MAKE_VHD_DIFF = os.path.join(BUILD, "tests/integration/block/make-vhd-diff")
SIZE = 16 << 20


def compare(env, fmt, image):
    """The image as qemu-img reads it equals the expected content."""
    cmp = qemu_img("compare", "-f", "raw", "-F", fmt, env.path("expected.raw"), image)
    assert cmp.returncode == 0, f"qemu-img compare: {cmp.stdout}{cmp.stderr}"


def verified_then_extras(env, image, fmt, params_fmt, check_fmt, span=SIZE, rest=b""):
    """Adds the disk; a verified workload over `span` bytes, then qemu-img compare with the
    guest stopped (expected: what blkfront wrote, then `rest`); then flush, barrier and
    discard; qemu-img check once pvhost has closed the image."""
    env.add_disk(image, params_fmt)
    qmp = env.start_pvhost()
    inserted = qmp.cmd("query-block")[0]["inserted"]
    assert inserted["drv"] == fmt, inserted
    r = finish_blkfront(env.blkfront("--rw", "verify", "--qd", "16", "--span", str(span), "--seconds", "2",
                                     "--expect-out", env.path("expected.raw")))
    # pvhost holds qcow2 metadata until a flush or close: compare with the disk quiesced.
    with open(env.path("expected.raw"), "ab") as f:
        f.write(rest)
    qmp.cmd("stop")
    compare(env, fmt, image)
    qmp.cmd("cont")
    extras = finish_blkfront(env.blkfront("--rw", "randrw", "--qd", "4", "--span", str(span), "--ops", "300",
                                          "--extras"))["extras"]
    assert extras["flush"] == 0 and extras["barrier_data_ok"], extras
    if "discard" in extras:
        assert extras["discard"] == 0 and extras["discard_zeroes"], extras
    env.stop_pvhost(qmp)
    if check_fmt:
        check_clean(check_fmt, image)
    return f"{r['ops']} verified ops" + (", discard" if "discard" in extras else "")


def qcow2_case(cluster):
    def case(env):
        image = env.path("disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", image, str(SIZE)],
                       check=True)
        return verified_then_extras(env, image, "qcow2", "qcow2", "qcow2") + f", {cluster}-byte clusters"
    case.__name__ = f"case_qcow2_cluster_{cluster}"
    return case


def case_qcow2_over_backing(env):
    """A qcow2 over a raw backing file full of data: unwritten parts come from it, and it
    is never written."""
    base = env.path("base.raw")
    with open(base, "wb") as f:
        f.write(os.urandom(SIZE))
    before = open(base, "rb").read()
    image = env.path("top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", image], check=True)
    # The guest writes the first half; the second half reads from the backing file.
    what = verified_then_extras(env, image, "qcow2", "qcow2", "qcow2", span=SIZE // 2, rest=before[SIZE // 2:])
    assert open(base, "rb").read() == before, "the backing file changed"
    return what + ", over half the disk (the rest from the backing file)"


def case_vhd_dynamic(env):
    image = env.path("disk.vhd")
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", image, str(SIZE)],
                   check=True)
    # (qemu-img check has no VHD support; compare reads the whole image through QEMU's driver.)
    return verified_then_extras(env, image, "vpc", "vhd", None)


def case_vhd_differencing(env):
    """XCP-style chains: a differencing VHD over a dynamic parent with data."""
    parent = env.path("parent.vhd")
    seed = env.path("seed.raw")
    with open(seed, "wb") as f:
        f.write(os.urandom(SIZE))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", seed, parent],
                   check=True)
    parent_before = open(parent, "rb").read()
    child = env.path("child.vhd")
    subprocess.run([MAKE_VHD_DIFF, child, parent], check=True)
    env.add_disk(child, "vhd")
    qmp = env.start_pvhost()
    img = qmp.cmd("query-block")[0]["inserted"]["image"]
    assert img["backing-image"]["filename"] == parent, img
    # Half the disk is written; the other half must still read as the parent's data.
    r = finish_blkfront(env.blkfront("--rw", "verify", "--qd", "16", "--span", str(SIZE // 2), "--seconds", "2",
                                     "--expect-out", env.path("expected.raw")))
    env.stop_pvhost(qmp)
    assert open(parent, "rb").read() == parent_before, "the parent changed"
    with open(env.path("expected.raw"), "ab") as f:
        f.write(open(seed, "rb").read()[SIZE // 2:])
    # QEMU's vpc driver ignores a differencing disk's parent, so only the half the guest
    # wrote (the child's own sectors) can be compared through qemu-img; blkfront's verified
    # reads covered pvhost's view of the whole chain.
    out = env.path("child-view.raw")
    view = qemu_img("convert", "-f", "vpc", "-O", "raw", child, out)
    assert view.returncode == 0, view.stderr
    got = open(out, "rb").read()
    want = open(env.path("expected.raw"), "rb").read()
    assert got[: SIZE // 2] == want[: SIZE // 2], "the child's blocks do not hold what the guest wrote"
    return f"{r['ops']} verified ops over half the disk; parent untouched"


def case_nbd_restart(env):
    """NBD (qemu-nbd serving a qcow2 on a unix socket), the server restarted mid-workload:
    no request fails."""
    image = env.path("disk.qcow2")
    sock = env.path("nbd.sock")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE)], check=True)

    def start_server():
        p = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock, "--persistent", "--shared=4", "--cache=none", image],
                             stderr=open(env.path("qemu-nbd.log"), "a"))
        for _ in range(200):
            if os.path.exists(sock):
                return p
            time.sleep(0.02)
        raise AssertionError("qemu-nbd did not start")

    server = start_server()
    env.procs.append(server)
    env.add_disk(f"unix:{sock}", "nbd")
    qmp = env.start_pvhost()
    assert qmp.cmd("query-block")[0]["inserted"]["drv"] == "nbd"
    guest = env.blkfront("--rw", "verify", "--qd", "8", "--span", str(SIZE), "--seconds", "4",
                         "--expect-out", env.path("expected.raw"))
    time.sleep(1.5)
    server.terminate()
    server.wait()
    os.unlink(sock) if os.path.exists(sock) else None
    time.sleep(0.5)
    server = start_server()
    env.procs.append(server)
    r = finish_blkfront(guest)
    env.stop_pvhost(qmp)
    server.terminate()
    server.wait()
    compare(env, "qcow2", image)
    check_clean("qcow2", image)
    return f"{r['ops']} verified ops across a qemu-nbd restart"


def main():
    return run_cases("formats", (qcow2_case(4096), qcow2_case(65536), qcow2_case(2 << 20), case_qcow2_over_backing,
                                 case_vhd_dynamic, case_vhd_differencing, case_nbd_restart))


if __name__ == "__main__":
    sys.exit(main())
