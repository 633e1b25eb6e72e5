#!/usr/bin/env python3
"""Integration suite 'crash': kill -9 pvhost while our blkfront writes and flushes, then
check the image with the real qemu-img (no corruption; leaked clusters are allowed, as
issue #7 says) and check that every write a completed flush covered is there.

Each trial: a fresh image, pvhost serving it, blkfront writing 4 KiB blocks at random
(--rw randwrite, queue depth 16) with a FLUSH_DISKCACHE after every N writes (N random),
pvhost killed after a random number of guest writes; blkfront, told so by SIGUSR1
(--stall-exit), stops and writes its log (--durable-out): per block, the generation a completed
flush made durable and every generation issued to it. `qemu-img convert` reads the image
as QEMU sees it, and `blkfront --check-crash` checks every sector against the log.

A kill -9 is a process crash: what pvhost handed to the kernel survives it, what it kept in
memory (qcow2 L2 tables and refcounts in its caches, a VHD BAT entry not yet written) does
not. Power loss (the page cache lost too) is not simulated here; the unit crash tests in
tests/unit/block_formats stop the writer before each write instead.

  crash_test.py BUILD_DIR     (PVHOST_CRASH_TRIALS=N trials per image kind, default 4)
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pvtest import BLKFRONT, DISK, Env, poll, qemu_img, run_cases  # noqa: E402

TRIALS = int(os.environ.get("PVHOST_CRASH_TRIALS", "4"))


def wr_operations(qmp):
    try:
        return sum(d["stats"]["wr_operations"] for d in qmp.cmd("query-blockstats"))
    except (OSError, RuntimeError):
        return 0


def one_trial(env, rng, kind):
    """One kill; returns what the check saw."""
    image = env.path("disk." + ("vhd" if kind == "vhd" else "raw" if kind == "raw" else "qcow2"))
    if kind == "qcow2":
        qemu_img_ok("create", "-q", "-f", "qcow2", image, str(DISK))
        fmt, check_fmt = "qcow2", "qcow2"
    elif kind == "qcow2-backing":
        # Over an (empty) qcow2 backing file: a 4 KiB write into a 64 KiB cluster copies the
        # rest of the cluster up from the backing layer first.
        base = env.path("base.qcow2")
        qemu_img_ok("create", "-q", "-f", "qcow2", base, str(DISK))
        qemu_img_ok("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", image)
        fmt, check_fmt = "qcow2", "qcow2"
    elif kind == "qcow2-4k":
        # One cluster per write: the most metadata (L2 entries, refcounts) per byte.
        qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", image, str(DISK))
        fmt, check_fmt = "qcow2", "qcow2"
    elif kind == "qcow2-2m":
        qemu_img_ok("create", "-q", "-f", "qcow2", "-o", "cluster_size=2097152", image, str(DISK))
        fmt, check_fmt = "qcow2", "qcow2"
    elif kind == "vhd":
        qemu_img_ok("create", "-q", "-f", "vpc", "-o", "subformat=dynamic", image, str(DISK))
        fmt, check_fmt = "vhd", None  # qemu-img check has no VHD support; convert reads it whole
    else:
        qemu_img_ok("create", "-q", "-f", "raw", image, str(DISK))
        fmt, check_fmt = "raw", None
    env.add_disk(image, fmt)
    qmp = env.start_pvhost()
    log = env.path("durable.json")
    flush_every = rng.choice([4, 16, 64])
    guest = env.blkfront("--rw", "randwrite", "--qd", "16", "--span", str(DISK), "--seconds", "60",
                         "--flush-every", str(flush_every), "--stall-exit", "60", "--durable-out", log,
                         "--seed", str(rng.randrange(1 << 30)))
    kill_after = rng.randrange(50, 4000)
    assert poll(lambda: wr_operations(qmp) >= kill_after or guest.poll() is not None, timeout=60), \
        f"the guest did not reach {kill_after} writes"
    assert guest.poll() is None, f"blkfront ended before the kill: {guest.stdout.read()}"
    time.sleep(rng.random() * 0.05)
    env.pvhost.kill()
    env.pvhost.wait()
    # The backend is dead: tell blkfront (SIGUSR1 ends its workload as a stall does). A
    # timed stall would also fire on a slow disk (O_DIRECT writes and fdatasync on a busy
    # machine take seconds), ending the workload before the kill.
    guest.send_signal(signal.SIGUSR1)
    out, _ = guest.communicate(timeout=60)
    r = json.loads(out.strip().splitlines()[-1])
    assert r.get("stalled"), f"blkfront did not see the backend die: {r}"
    assert r["verify_failures"] == 0 and r["errors"] == 0, r
    leaked = 0
    if check_fmt:
        c = qemu_img("check", "--output=json", "-f", check_fmt, image)
        # 0: clean; 3: leaked clusters only. 2 (corruption) or anything else fails.
        assert c.returncode in (0, 3), f"qemu-img check after the kill: {c.returncode}\n{c.stdout}{c.stderr}"
        info = json.loads(c.stdout)
        assert info.get("corruptions", 0) == 0 and info.get("check-errors", 0) == 0, info
        leaked = info.get("leaks", 0)
    raw = env.path("after.raw")
    qemu_img_ok("convert", "-f", "vpc" if fmt == "vhd" else fmt, "-O", "raw", image, raw)
    chk = subprocess.run([BLKFRONT, "--check-crash", log, "--image", raw], capture_output=True, text=True)
    v = json.loads(chk.stdout.strip().splitlines()[-1])
    assert v.get("ok"), f"after the kill (flush every {flush_every}, killed after {kill_after} writes): {v}"
    return {"writes": r["writes"], "flushes": v["flushes"], "durable_blocks": v["durable_blocks"],
            "newer": v["sectors_newer_than_durable"], "leaked": leaked}


def qemu_img_ok(*args):
    r = qemu_img(*args)
    assert r.returncode == 0, f"qemu-img {' '.join(args)}: {r.stdout}{r.stderr}"


def trials(kind):
    def case(first_env):
        rng = random.Random(int(os.environ.get("PVHOST_CRASH_SEED", str(time.time_ns()))))
        seen = []
        env = first_env
        for i in range(TRIALS):
            if i > 0:
                env = Env(f"crash{i}")
            try:
                seen.append(one_trial(env, rng, kind))
            except Exception:
                if env is not first_env:
                    print(f"(trial {i} kept in {env.dir})", flush=True)
                    env.close(True)
                raise
            if env is not first_env:
                env.close(os.environ.get("PVHOST_KEEP_TEST_DIRS") == "1")
        durable = sum(s["durable_blocks"] for s in seen)
        # The suite proves nothing unless flushes completed before the kills.
        assert durable > 0 and sum(s["flushes"] for s in seen) > 0, seen
        return (f"{TRIALS} kills after {sum(s['writes'] for s in seen)} acknowledged writes and "
                f"{sum(s['flushes'] for s in seen)} flushes: {durable} durable blocks all present, "
                f"{sum(s['newer'] for s in seen)} sectors newer than their flush, "
                f"{sum(s['leaked'] for s in seen)} leaked clusters, no corruption")
    case.__name__ = "case_" + kind.replace("-", "_")
    case.__doc__ = f"kill -9 pvhost under a flushing workload on {kind}"
    return case


def main():
    return run_cases("crash", [trials(k) for k in ("qcow2", "qcow2-backing", "qcow2-4k", "qcow2-2m", "vhd", "raw")])


if __name__ == "__main__":
    sys.exit(main())
