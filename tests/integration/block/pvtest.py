"""Shared pieces of the Python integration suites for qdisk (snapshot_commit_test.py,
formats_test.py): a QMP client, an environment with pvhost-xenemu, one guest, pvhost and
our blkfront as separate processes, and qemu-img helpers.
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


def run_cases(suite, cases):
    """Runs each case in an Env of its own; prints one line per case; the exit status."""
    for p in (XENEMU, XL, PVHOST, BLKFRONT):
        if not os.access(p, os.X_OK):
            print(f"{suite}: {p} is not built", file=sys.stderr)
            return 1
    keep = os.environ.get("PVHOST_KEEP_TEST_DIRS") == "1"
    failed = 0
    for case in cases:
        env = Env(case.__name__.replace("case_", "")[:12])
        t0 = time.monotonic()
        try:
            what = case(env)
            print(f"ok   {case.__name__} ({time.monotonic() - t0:.1f} s): {what}", flush=True)
            keep_this = keep
        except Exception:  # noqa: BLE001 - every failure is reported with its logs
            failed += 1
            print(f"FAIL {case.__name__} (logs in {env.dir})\n{traceback.format_exc()}\n"
                  f"pvhost.log tail:\n{env.log_tail()}", flush=True)
            keep_this = True
        env.close(keep_this)
    print(f"{suite}: {len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0
