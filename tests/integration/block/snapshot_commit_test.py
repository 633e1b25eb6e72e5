#!/usr/bin/env python3
"""Snapshots and block-commit through QMP while a guest's verified workload runs
(issue #7: "Snapshot during a running verified workload, several times, then commit; the
final image equals the expected data").

Each case runs pvhost-xenemu, pvhost (libxl's argv, a QMP socket) and our blkfront as
separate processes. blkfront checks every read against what it wrote and, at the end,
writes the disk's expected content (--expect-out); `qemu-img compare` holds the committed
image to it and `qemu-img check` finds every layer clean.

    snapshot_commit_test.py [BUILD_DIR]      (default: $PVHOST_BUILD_DIR or build)

Prints one line per case and exits non-zero when any fails.
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pvtest import DISK, chain_files, check_clean, finish_blkfront, poll, qemu_img, run_cases  # noqa: E402


def case_snapshots_then_commit(env):
    """Three snapshots and a commit of the whole chain, all while the guest writes."""
    base = env.path("base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(DISK)], check=True)
    env.add_disk(base, "qcow2")
    qmp = env.start_pvhost()
    guest = env.blkfront("--rw", "verify", "--qd", "16", "--span", str(DISK), "--seconds", "10",
                         "--expect-out", env.path("expected.raw"))
    snaps = []
    for i in range(1, 4):
        time.sleep(0.7)
        snap = env.path(f"snap{i}.qcow2")
        qmp.cmd("blockdev-snapshot-sync", {"device": "xvda", "snapshot-file": snap, "format": "qcow2"})
        snaps.append(snap)
    assert chain_files(qmp)[0] == snaps[-1] and len(chain_files(qmp)) == 4, chain_files(qmp)
    time.sleep(0.5)
    # Commit the active layer into the deepest base (QEMU's default), the guest still writing.
    qmp.cmd("block-commit", {"device": "xvda", "job-id": "commit0"})
    jobs = qmp.cmd("query-block-jobs")
    assert len(jobs) == 1 and jobs[0]["device"] == "commit0" and jobs[0]["type"] == "commit", jobs
    # A second job on the same disk, and the snapshot, are refused while it runs.
    assert "busy" in qmp.error("block-commit", {"device": "xvda", "job-id": "commit1"})
    assert "block-commit" in qmp.error("blockdev-snapshot-sync",
                                       {"device": "xvda", "snapshot-file": env.path("no.qcow2")})
    ready = qmp.wait_event("BLOCK_JOB_READY", match=lambda e: e["data"]["device"] == "commit0")
    # The guest keeps writing, so the base may already be behind again (offset < len).
    assert ready["data"]["type"] == "commit" and 0 < ready["data"]["offset"] <= ready["data"]["len"], ready
    assert guest.poll() is None, "the workload ended before the commit was ready; the test proves nothing"
    assert qmp.cmd("query-block-jobs")[0]["ready"] is True
    qmp.cmd("block-job-complete", {"device": "commit0"})
    done = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"], done
    assert qmp.cmd("query-block-jobs") == []  # (the events before it have arrived with it)
    assert qmp.statuses("commit0") == ["created", "running", "ready", "waiting", "pending", "concluded", "null"], \
        qmp.statuses("commit0")
    assert qmp.cmd("query-block-jobs") == []
    assert chain_files(qmp) == [base], chain_files(qmp)
    assert env.xs_read(f"/local/domain/0/backend/qdisk/{env.domid}/51712/params") == f"qcow2:{base}"
    r = finish_blkfront(guest)
    # The chain survives a restart: pvhost reopens the base the commit recorded in `params`.
    # (pvhost adopts backends in Initialising only, as QEMU's xen-bus does; the state is
    # reset as a toolstack re-attaching the disk would.)
    env.stop_pvhost(qmp)
    env.xs_write(f"/local/domain/0/backend/qdisk/{env.domid}/51712/state", "1")
    qmp = env.start_pvhost()
    assert poll(lambda: qmp.cmd("query-block") != []), "the restarted pvhost did not adopt the disk"
    assert chain_files(qmp) == [base], chain_files(qmp)
    env.stop_pvhost(qmp)
    check_clean("qcow2", base)
    for s in snaps:
        check_clean("qcow2", s)
    cmp = qemu_img("compare", "-f", "raw", "-F", "qcow2", env.path("expected.raw"), base)
    assert cmp.returncode == 0, f"qemu-img compare: {cmp.stdout}{cmp.stderr}"
    return f"{r['ops']} verified ops, 3 snapshots, committed into the base"


def wr_operations(qmp):
    return sum(d["stats"]["wr_operations"] for d in qmp.cmd("query-blockstats"))


def case_commit_into_middle_and_cancel(env):
    """Commit into a middle layer with `base`; cancels before and after READY leave the top."""
    base = env.path("base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(DISK)], check=True)
    env.add_disk(base, "qcow2")
    qmp = env.start_pvhost()
    # Errors first: nothing to commit, unknown base, non-active top, unknown job.
    assert "no backing file" in qmp.error("block-commit", {"device": "xvda"})
    assert "Cannot find device" in qmp.error("block-commit", {"device": "xvdz"})
    assert "not found" in qmp.error("block-job-complete", {"device": "nosuchjob"})
    guest = env.blkfront("--rw", "verify", "--qd", "8", "--span", str(DISK), "--seconds", "8",
                         "--expect-out", env.path("expected.raw"))
    time.sleep(0.5)
    mid, top = env.path("mid.qcow2"), env.path("top.qcow2")
    qmp.cmd("blockdev-snapshot-sync", {"device": "xvda", "snapshot-file": mid})
    time.sleep(0.5)
    qmp.cmd("blockdev-snapshot-sync", {"device": "xvda", "snapshot-file": top})
    assert "Can't find" in qmp.error("block-commit", {"device": "xvda", "base": env.path("other.qcow2")})
    assert "only the active layer" in qmp.error("block-commit", {"device": "xvda", "top": mid})
    # The top must own data before a slow (64 KiB/s) commit starts, or the job is ready at
    # once: wait for the guest to have written at least 32 requests into it (on a loaded
    # machine, under ASan, 0.5 s may see none).
    written = wr_operations(qmp)
    assert poll(lambda: wr_operations(qmp) >= written + 32, timeout=30), "the guest stopped writing"
    qmp.cmd("block-commit", {"device": "xvda", "base": mid, "speed": 65536})
    assert "cannot accept command verb 'complete'" in qmp.error("block-job-complete", {"device": "xvda"})
    qmp.cmd("block-job-pause", {"device": "xvda"})
    assert qmp.cmd("query-block-jobs")[0]["paused"] is True
    qmp.cmd("block-job-resume", {"device": "xvda"})
    qmp.cmd("block-job-cancel", {"device": "xvda"})
    qmp.wait_event("BLOCK_JOB_CANCELLED")
    assert qmp.cmd("query-block-jobs") == []
    assert qmp.statuses("xvda")[-3:] == ["aborting", "concluded", "null"], qmp.statuses("xvda")
    assert chain_files(qmp) == [top, mid, base]
    # Again at full speed; a cancel after READY completes without the switch (QEMU's mirror).
    qmp.events.clear()
    qmp.cmd("block-commit", {"device": "xvda", "base": mid, "job-id": "j2", "auto-dismiss": False})
    qmp.wait_event("BLOCK_JOB_READY")
    qmp.cmd("block-job-cancel", {"device": "j2"})
    qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert chain_files(qmp) == [top, mid, base]
    jobs = qmp.cmd("query-jobs")
    assert jobs[0]["id"] == "j2" and jobs[0]["status"] == "concluded", jobs  # auto-dismiss off
    qmp.cmd("job-dismiss", {"id": "j2"})
    assert qmp.cmd("query-jobs") == []
    # And once more, completed: top is committed into mid; base stays below it.
    qmp.cmd("block-commit", {"device": "xvda", "base": mid, "job-id": "j3"})
    qmp.wait_event("BLOCK_JOB_READY")
    qmp.cmd("block-job-complete", {"device": "j3"})
    qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert chain_files(qmp) == [mid, base], chain_files(qmp)
    r = finish_blkfront(guest)
    env.stop_pvhost(qmp)
    for image in (base, mid, top):
        check_clean("qcow2", image)
    cmp = qemu_img("compare", "-f", "raw", "-F", "qcow2", env.path("expected.raw"), mid)
    assert cmp.returncode == 0, f"qemu-img compare: {cmp.stdout}{cmp.stderr}"
    return f"{r['ops']} verified ops; cancelled before and after READY, then committed into the middle layer"


def commit_into(env, fmt, create):
    base = env.path(f"base.{fmt}")
    subprocess.run(["qemu-img", "create", "-q", *create, base, str(DISK)], check=True)
    size = int(json.loads(qemu_img("info", "--output=json", "-f", fmt, base).stdout)["virtual-size"])
    env.add_disk(base, "vhd" if fmt == "vpc" else "raw")
    qmp = env.start_pvhost()
    guest = env.blkfront("--rw", "verify", "--qd", "8", "--span", str(size // 4096 * 4096), "--seconds", "4",
                         "--expect-out", env.path("expected.raw"))
    time.sleep(0.5)
    qmp.cmd("blockdev-snapshot-sync", {"device": "xvda", "snapshot-file": env.path("top.qcow2")})
    time.sleep(0.5)
    qmp.cmd("block-commit", {"device": "xvda"})
    qmp.wait_event("BLOCK_JOB_READY")
    qmp.cmd("block-job-complete", {"device": "xvda"})
    done = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"], done
    assert chain_files(qmp) == [base], chain_files(qmp)
    assert qmp.cmd("query-block")[0]["inserted"]["drv"] == fmt
    r = finish_blkfront(guest)
    env.stop_pvhost(qmp)
    cmp = qemu_img("compare", "-f", "raw", "-F", fmt, env.path("expected.raw"), base)
    assert cmp.returncode == 0, f"qemu-img compare ({fmt}): {cmp.stdout}{cmp.stderr}"
    # (qemu-img check has no VHD support; compare above read the whole image through QEMU's driver.)
    check_clean("qcow2", env.path("top.qcow2"))
    return f"{r['ops']} verified ops, committed into a {fmt} base"


def case_commit_into_raw(env):
    """A raw base: served by the io_uring driver once the commit switches to it."""
    return commit_into(env, "raw", ["-f", "raw"])


def case_commit_into_vhd(env):
    """A dynamic VHD base (XCP-style chains end in one)."""
    return commit_into(env, "vpc", ["-f", "vpc", "-o", "subformat=dynamic"])


# QEMU 7.2's BlockDeviceStats members that are not optional (qapi/block-core.json).
BLOCK_DEVICE_STATS = {
    "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations", "flush_operations",
    "unmap_operations", "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns", "unmap_total_time_ns",
    "wr_highest_offset", "rd_merged", "wr_merged", "unmap_merged", "failed_rd_operations", "failed_wr_operations",
    "failed_flush_operations", "failed_unmap_operations", "invalid_rd_operations", "invalid_wr_operations",
    "invalid_flush_operations", "invalid_unmap_operations", "account_invalid", "account_failed", "timed_stats",
}


def node_stats(qmp):
    """query-nodes: the format nodes by name, after checking that every file-backed format
    node's "parent" is listed as a node of its own, right after it."""
    entries = qmp.cmd("query-blockstats", {"query-nodes": True})
    formats = {}
    i = 0
    while i < len(entries):
        n = entries[i]
        assert "device" not in n and "backing" not in n, entries
        formats[n["node-name"]] = n
        assert "parent" in n, entries  # every layer in these cases is a file
        assert i + 1 < len(entries) and entries[i + 1]["node-name"] == n["parent"]["node-name"], entries
        assert "parent" not in entries[i + 1], entries
        i += 2
    return formats


def case_blockstats_per_node(env):
    """query-blockstats counts every layer: reads that fall through to the base, the commit's writes."""
    base = env.path("base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(DISK)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", base], check=True, capture_output=True)
    env.add_disk(base, "qcow2")
    qmp = env.start_pvhost()
    root = qmp.cmd("query-blockstats")
    assert len(root) == 1 and root[0]["node-name"] == "xvda-qcow2" and "backing" not in root[0], root
    assert BLOCK_DEVICE_STATS <= set(root[0]["stats"]), BLOCK_DEVICE_STATS - set(root[0]["stats"])
    # The file under the format layer: QEMU's protocol node, as "parent", with file-posix's
    # driver-specific discard counts; opening the image read its header and tables.
    parent = root[0]["parent"]
    assert parent["node-name"].startswith("#block") and BLOCK_DEVICE_STATS <= set(parent["stats"]), parent
    assert parent["driver-specific"] == {"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0,
                                         "discard-bytes-ok": 0}, parent
    assert parent["stats"]["rd_operations"] > 0, parent
    nodes = qmp.cmd("query-blockstats", {"query-nodes": True})
    assert [n["node-name"] for n in nodes] == ["xvda-qcow2", parent["node-name"]], nodes
    assert all("device" not in n for n in nodes) and nodes[0]["parent"]["node-name"] == parent["node-name"], nodes
    # snapshot-node-name: QEMU's checks (block.c bdrv_assign_node_name).
    bad = env.path("bad.qcow2")
    assert "Invalid node-name" in qmp.error("blockdev-snapshot-sync",
                                            {"device": "xvda", "snapshot-file": bad, "snapshot-node-name": "1x"})
    assert "Duplicate nodes" in qmp.error("blockdev-snapshot-sync",
                                          {"device": "xvda", "snapshot-file": bad, "snapshot-node-name": "xvda-qcow2"})
    assert "too long" in qmp.error("blockdev-snapshot-sync",
                                   {"device": "xvda", "snapshot-file": bad, "snapshot-node-name": "n" * 32})
    snap = env.path("snap.qcow2")
    qmp.cmd("blockdev-snapshot-sync", {"device": "xvda", "snapshot-file": snap, "snapshot-node-name": "snap1"})
    assert qmp.cmd("query-block")[0]["inserted"]["node-name"] == "snap1"
    root = qmp.cmd("query-blockstats")[0]
    assert root["device"] == "51712" and root["node-name"] == "snap1", root
    backing = root["backing"]
    name = backing["node-name"]
    assert name.startswith("#block") and "device" not in backing and "backing" not in backing, root
    assert BLOCK_DEVICE_STATS <= set(backing["stats"])
    before = backing["stats"]
    # The guest reads what only the base holds: every read falls through to the base.
    r = finish_blkfront(env.blkfront("--rw", "read", "--no-verify", "--qd", "4", "--span", str(1 << 20), "--ops", "64"))
    root = qmp.cmd("query-blockstats")[0]
    guest, backing = root["stats"], root["backing"]["stats"]
    assert guest["rd_operations"] >= 64, guest
    assert backing["rd_operations"] >= before["rd_operations"] + 64, (before, backing)
    assert backing["rd_bytes"] - before["rd_bytes"] >= guest["rd_bytes"], (guest, backing)
    assert backing["rd_total_time_ns"] > 0 and backing["wr_operations"] == 0, backing
    nodes = node_stats(qmp)
    assert list(nodes) == ["snap1", name] and all("device" not in n for n in nodes.values()), nodes
    assert nodes[name]["stats"]["rd_operations"] == backing["rd_operations"], (nodes, backing)
    # The guest writes into the overlay; a commit into the base (named by base-node) writes there.
    finish_blkfront(env.blkfront("--rw", "write", "--no-verify", "--qd", "4", "--span", str(4 << 20), "--ops", "32"))
    nodes = node_stats(qmp)
    assert nodes["snap1"]["stats"]["wr_operations"] >= 32 and nodes[name]["stats"]["wr_operations"] == 0, nodes
    # The overlay's file took whole clusters (the guest's 4 KiB, the rest copied up from the
    # base): more bytes than the guest wrote, up to the end of the file; the base's file
    # was not written. (The new clusters' tables wait in the cache for a flush.)
    snap_file, snap_fmt = nodes["snap1"]["parent"]["stats"], nodes["snap1"]["stats"]
    assert snap_file["wr_bytes"] > snap_fmt["wr_bytes"], nodes
    assert 0 < snap_file["wr_highest_offset"] <= os.path.getsize(snap), (snap_file, os.path.getsize(snap))
    assert nodes[name]["parent"]["stats"]["wr_operations"] == 0, nodes
    base_file_name = nodes[name]["parent"]["node-name"]
    root = qmp.cmd("query-blockstats")[0]
    assert root["parent"]["node-name"] == nodes["snap1"]["parent"]["node-name"], root
    assert root["backing"]["parent"]["node-name"] == nodes[name]["parent"]["node-name"], root
    base_reads = nodes[name]["stats"]["rd_operations"]
    assert "Cannot find" in qmp.error("block-commit", {"device": "xvda", "base-node": "nosuch"})
    qmp.cmd("block-commit", {"device": "xvda", "base-node": name, "job-id": "c1"})
    qmp.wait_event("BLOCK_JOB_READY")
    qmp.cmd("block-job-complete", {"device": "c1"})
    done = qmp.wait_event("BLOCK_JOB_COMPLETED")
    assert "error" not in done["data"], done
    assert chain_files(qmp) == [base], chain_files(qmp)
    # The base is the active layer, under the device's name; its counters continued.
    nodes = node_stats(qmp)
    assert list(nodes) == ["xvda-qcow2"], nodes
    st = nodes["xvda-qcow2"]["stats"]
    assert st["rd_operations"] >= base_reads and st["wr_operations"] > 0 and st["wr_highest_offset"] > 0, st
    # The job wrote through its own read-write handle on the base: its file node counted
    # that (data, then the tables on the job's flush), under the same name as before.
    base_file = nodes["xvda-qcow2"]["parent"]
    assert base_file["node-name"] == base_file_name, (base_file, base_file_name)
    assert base_file["stats"]["wr_operations"] > 0 and base_file["stats"]["flush_operations"] > 0, base_file
    assert "backing" not in qmp.cmd("query-blockstats")[0]
    # A restarted pvhost names the chain the same way; counters start again, as QEMU's do.
    env.stop_pvhost(qmp)
    env.xs_write(f"/local/domain/0/backend/qdisk/{env.domid}/51712/state", "1")
    qmp = env.start_pvhost()
    assert poll(lambda: qmp.cmd("query-block") != []), "the restarted pvhost did not adopt the disk"
    assert list(node_stats(qmp)) == ["xvda-qcow2"]
    env.stop_pvhost(qmp)
    check_clean("qcow2", base)
    check_clean("qcow2", snap)
    return (f"{r['ops']} guest reads counted on {name}; commit by base-node wrote {st['wr_operations']} "
            "times into the base")


def main():
    return run_cases("snapshot/commit", (case_snapshots_then_commit, case_commit_into_middle_and_cancel,
                                         case_commit_into_raw, case_commit_into_vhd, case_blockstats_per_node))


if __name__ == "__main__":
    sys.exit(main())
