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
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

BUILD = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PVHOST_BUILD_DIR", "build"))
XENEMU = os.path.join(BUILD, "hw/xen/emu/broker/pvhost-xenemu")
XL = os.path.join(BUILD, "hw/xen/emu/broker/pvhost-xl")
PVHOST = os.environ.get("PVHOST_BIN", os.path.join(BUILD, "src/app/pvhost"))
BLKFRONT = os.path.join(BUILD, "tests/frontends/blkfront/blkfront")
DISK = 32 << 20


class Qmp:
    """One QMP connection (qmp-spec): commands in order, events kept as they come."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        greeting = self._read(10)
        assert "QMP" in greeting, greeting
        assert self.cmd("qmp_capabilities") == {}

    def _read(self, timeout):
        self.sock.settimeout(timeout)
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)

    def execute(self, command, args=None, timeout=60):
        msg = {"execute": command}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            reply = self._read(timeout)
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def cmd(self, command, args=None):
        reply = self.execute(command, args)
        if "error" in reply:
            raise AssertionError(f"{command} {args}: {reply['error']}")
        return reply["return"]

    def error(self, command, args=None):
        reply = self.execute(command, args)
        assert "error" in reply, f"{command} {args} should have failed: {reply}"
        return reply["error"]["desc"]

    def wait_event(self, name, timeout=60, match=None):
        end = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and (match is None or match(e)):
                    return self.events.pop(i)
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name} event within {timeout} s; saw {[e['event'] for e in self.events]}")
            try:
                self.events.append(self._read(left))
            except (socket.timeout, TimeoutError):
                pass

    def statuses(self, job):
        return [e["data"]["status"] for e in self.events if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job]


class Env:
    """pvhost-xenemu, one guest with one qcow2 disk (xvda), pvhost serving it."""

    def __init__(self, name):
        self.dir = tempfile.mkdtemp(prefix=f"pvhost-snapcommit-{name}-", dir="/var/tmp")  # O_DIRECT-capable
        self.procs = []
        self.pvhost = None
        subprocess.run([XENEMU, "--rundir", self.dir, "--strict", "--daemonize", "--pidfile", self.path("xenemu.pid"),
                        "-D", self.path("xenemu.log")], check=True)
        self.domid = subprocess.run([XL, "--rundir", self.dir, "domain", "create", name, "--memory", "256"],
                                    check=True, capture_output=True, text=True).stdout.strip()
        self.qmp_path = self.path(f"qmp-libxl-{self.domid}")

    def path(self, name):
        return os.path.join(self.dir, name)

    def xs_read(self, key):
        env = dict(os.environ, XENSTORED_PATH=self.path("socket"))
        return subprocess.run(["xenstore-read", key], env=env, capture_output=True, text=True, check=True).stdout.strip()

    def xs_write(self, key, value):
        env = dict(os.environ, XENSTORED_PATH=self.path("socket"))
        subprocess.run(["xenstore-write", key, value], env=env, check=True)

    def add_disk(self, image, fmt):
        subprocess.run([XL, "--rundir", self.dir, "device", "add", "qdisk", self.domid, f"target={image}",
                        f"format={fmt}", "vdev=xvda"], check=True, capture_output=True)

    def start_pvhost(self):
        log = open(self.path("pvhost.log"), "a")
        self.pvhost = subprocess.Popen(
            [PVHOST, "-xen-domid", self.domid, "-no-shutdown",
             "-chardev", f"socket,id=libxl-cmd,path={self.qmp_path},server=on,wait=off",
             "-mon", "chardev=libxl-cmd,mode=control", "-nodefaults", "-no-user-config", "-xen-attach",
             "-name", "snapcommit", "-display", "none", "-machine", "xenpv", "-m", "256",
             f"--xen=emu:{self.dir}"], stdout=log, stderr=subprocess.STDOUT)
        for _ in range(200):
            if os.path.exists(self.qmp_path):
                try:
                    return Qmp(self.qmp_path)
                except OSError:
                    pass
            if self.pvhost.poll() is not None:
                raise AssertionError(f"pvhost exited with {self.pvhost.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        raise AssertionError("pvhost's QMP socket never appeared")

    def stop_pvhost(self, qmp):
        qmp.execute("quit")
        self.pvhost.wait(timeout=20)
        assert self.pvhost.returncode == 0, f"pvhost exited with {self.pvhost.returncode}"

    def blkfront(self, *args):
        # --ops: the workload runs for --seconds (verify mode otherwise stops after its two passes).
        p = subprocess.Popen([BLKFRONT, "--rundir", self.dir, "--domid", self.domid, "--devid", "51712",
                              "--ops", "1000000000", *args],
                             stdout=subprocess.PIPE, stderr=open(self.path("blkfront.log"), "a"), text=True)
        self.procs.append(p)
        return p

    def log_tail(self):
        try:
            return "".join(open(self.path("pvhost.log")).readlines()[-15:])
        except OSError:
            return ""

    def close(self, keep):
        for p in self.procs + ([self.pvhost] if self.pvhost else []):
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            os.kill(int(open(self.path("xenemu.pid")).read()), 15)
        except (OSError, ValueError):
            pass
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def poll(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def finish_blkfront(p, timeout=120):
    out, _ = p.communicate(timeout=timeout)
    r = json.loads(out.strip().splitlines()[-1])
    assert r.get("ok") and r["verify_failures"] == 0 and r["errors"] == 0, f"blkfront: {r}"
    return r


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True)


def check_clean(fmt, image):
    r = qemu_img("check", "-f", fmt, image)
    assert r.returncode == 0, f"qemu-img check {image}: {r.returncode}\n{r.stdout}{r.stderr}"


def chain_files(qmp):
    img = qmp.cmd("query-block")[0]["inserted"]["image"]
    files = [img["filename"]]
    while "backing-image" in img:
        img = img["backing-image"]
        files.append(img["filename"])
    return files


def case_snapshots_then_commit(env):
    """Three snapshots and a commit of the whole chain, all while the guest writes."""
    base = env.path("base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(DISK)], check=True)
    env.add_disk(base, "qcow2")
    qmp = env.start_pvhost()
    guest = env.blkfront("--rw", "verify", "--qd", "16", "--span", str(DISK), "--seconds", "6",
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
    guest = env.blkfront("--rw", "verify", "--qd", "8", "--span", str(DISK), "--seconds", "6",
                         "--expect-out", env.path("expected.raw"))
    time.sleep(0.5)
    mid, top = env.path("mid.qcow2"), env.path("top.qcow2")
    qmp.cmd("blockdev-snapshot-sync", {"device": "xvda", "snapshot-file": mid})
    time.sleep(0.5)
    qmp.cmd("blockdev-snapshot-sync", {"device": "xvda", "snapshot-file": top})
    assert "Can't find" in qmp.error("block-commit", {"device": "xvda", "base": env.path("other.qcow2")})
    assert "only the active layer" in qmp.error("block-commit", {"device": "xvda", "top": mid})
    # Slow enough (64 KiB/s) that it cannot be ready before the cancel.
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


def main():
    for p in (XENEMU, XL, PVHOST, BLKFRONT):
        if not os.access(p, os.X_OK):
            print(f"snapshot_commit_test: {p} is not built", file=sys.stderr)
            return 1
    keep = os.environ.get("PVHOST_KEEP_TEST_DIRS") == "1"
    failed = 0
    cases = (case_snapshots_then_commit, case_commit_into_middle_and_cancel, case_commit_into_raw, case_commit_into_vhd)
    for case in cases:
        env = Env(case.__name__.replace("case_", "")[:12])
        t0 = time.monotonic()
        try:
            what = case(env)
            print(f"ok   {case.__name__} ({time.monotonic() - t0:.1f} s): {what}")
        except Exception:  # noqa: BLE001 - every failure is reported with its logs
            failed += 1
            print(f"FAIL {case.__name__} (logs in {env.dir})\n{traceback.format_exc()}\npvhost.log tail:\n{env.log_tail()}")
            keep_this = True
        else:
            keep_this = keep
        env.close(keep_this)
    print(f"snapshot/commit: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
