#!/bin/bash
# qdisk-lab.sh - runs INSIDE dom0 of the real-Xen lab (../shared/xen-lab), started by
# tests/lab/run-lab. A Linux PV domU whose qdisk disks are served by pvhost through
# libxl's device_model_override, next to a kernel blkback disk for comparison:
#   xvdb: kernel blkback (phy: a loop device over /scratch/blkback.img)
#   xvdc: pvhost qdisk, raw    (/scratch/qdisk.img)
#   xvdd: pvhost qdisk, qcow2  (/scratch/disk.qcow2, made by qemu-img in dom0)
# In the domU (Linux's xen-blkfront): fio with crc32c verification on xvdc and xvdd, a
# marker written with O_DIRECT that dom0 finds in the image files afterwards, and fio
# numbers on all three. While it runs, dom0 asks pvhost over QMP for query-block and
# query-blockstats and takes a live blockdev-snapshot-sync of xvdd.
# Prints PVLAB-CHECK lines; exits non-zero when one fails.
set -u
JOB=${JOBDIR:-/xenlab/job}
OUT=${OUTDIR:-/tmp/out}; mkdir -p "$OUT"
RT=${FIO_RUNTIME:-8}
NAME=pvlab
fail=0
check() { if eval "$2"; then echo "PVLAB-CHECK $1: OK"; else echo "PVLAB-CHECK $1: FAIL"; fail=1; fi; }
log() { echo "[pvlab $(date +%T)] $*"; }

log "xen $(xl info | awk -F': ' '/^xen_version/{print $2}'), dom0 $(uname -r)"
"$JOB/pvhost-run" --version 2>&1 | head -1 | sed 's/^/pvhost: /'

dd if=/dev/zero of=/scratch/blkback.img bs=1M count=512 status=none
dd if=/dev/zero of=/scratch/qdisk.img bs=1M count=512 status=none
qemu-img() { "$JOB/qemu-img-run" "$@"; }  # the host's, with its libraries (dom0 has none)
if "$JOB/qemu-img-run" --version >/dev/null 2>&1; then
  qemu-img create -q -f qcow2 /scratch/disk.qcow2 512M
  QCOW=yes
else
  log "qemu-img does not run in dom0: the qcow2 disk is left out"
  QCOW=no
fi
LOOP=$(losetup --direct-io=on -f --show /scratch/blkback.img)

mkdir -p /tmp/domu-extra
cat > /tmp/domu-extra/test.sh <<EOS
#!/bin/sh
RT=$RT
EOS
cat >> /tmp/domu-extra/test.sh <<'EOS'
for d in /sys/bus/xen/devices/*; do echo "XENLAB-XENBUS $(basename $d) driver=$(basename $(readlink $d/driver) 2>/dev/null) state=$(cat $d/state 2>/dev/null)"; done
for d in xvdb xvdc xvdd; do
  [ -b /dev/$d ] && echo "XENLAB-DISK $d sectors=$(cat /sys/block/$d/size) max_hw_sectors_kb=$(cat /sys/block/$d/queue/max_hw_sectors_kb) discard_max=$(cat /sys/block/$d/queue/discard_max_bytes) fua=$(cat /sys/block/$d/queue/fua 2>/dev/null) wc=$(cat /sys/block/$d/queue/write_cache)"
done
echo "XENLAB-READY"
sleep 2
# A marker at sector 2048 of each pvhost disk, then fsync (busybox dd has no oflag=direct):
# dom0 reads it back.
for d in xvdc xvdd; do
  [ -b /dev/$d ] || continue
  printf 'PVLAB-MARKER-%s-0123456789' $d > /tmp/m; dd if=/dev/zero bs=512 count=1 2>/dev/null >> /tmp/m
  dd if=/tmp/m of=/dev/$d bs=512 count=1 seek=2048 conv=fsync 2>/dev/null && echo "XENLAB-MARKER $d written"
done
# Verified random writes (fio checks every block it wrote with crc32c).
for d in xvdc xvdd; do
  [ -b /dev/$d ] || continue
  fio --name=verify --filename=/dev/$d --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 \
      --offset=8M --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 > /tmp/fio.out 2>&1
  rc=$?
  echo "XENLAB-VERIFY $d rc=$rc errors=$(grep -c -i 'verify.*fail\|bad magic\|crc32c: verify' /tmp/fio.out)"
  [ $rc = 0 ] || tail -20 /tmp/fio.out
  # discard and flush through the block layer
  blkdiscard -o $((256 << 20)) -l $((16 << 20)) /dev/$d 2>&1 && echo "XENLAB-DISCARD $d ok" || echo "XENLAB-DISCARD $d failed"
done
echo "XENLAB-VERIFY-DONE"
for d in xvdb xvdc xvdd; do
  [ -b /dev/$d ] || continue
  case $d in xvdb) be=blkback;; xvdc) be=pvhost-raw;; xvdd) be=pvhost-qcow2;; esac
  for t in randread-4k-qd32 randwrite-4k-qd32 seqwrite-1m-qd8; do
    case $t in
      randread-4k-qd32)  a="--rw=randread --bs=4k --iodepth=32";;
      randwrite-4k-qd32) a="--rw=randwrite --bs=4k --iodepth=32";;
      seqwrite-1m-qd8)   a="--rw=write --bs=1M --iodepth=8";;
    esac
    fio --name=$t --filename=/dev/$d --direct=1 --ioengine=libaio $a --offset=8M --size=256M --runtime=$RT \
        --time_based --group_reporting > /tmp/fio.out 2>&1
    grep -E '^ +(read|write): IOPS=' /tmp/fio.out | sed "s/^ */XENLAB-FIO backend=$be dev=$d test=$t /"
  done
done
echo "XENLAB-DOMU-DONE"
EOS
chmod +x /tmp/domu-extra/test.sh
xenlab-domu-initrd /tmp/domu-extra/test.sh /tmp/domU-initrd.img "$DOMU_INITRD"

DISKS="'format=raw, vdev=xvdb, access=rw, backendtype=phy, target=$LOOP', 'format=raw, vdev=xvdc, access=rw, backendtype=qdisk, target=/scratch/qdisk.img'"
[ $QCOW = yes ] && DISKS="$DISKS, 'format=qcow2, vdev=xvdd, access=rw, backendtype=qdisk, target=/scratch/disk.qcow2'"
cat > /tmp/$NAME.cfg <<EOF
name = "$NAME"
type = "pv"
kernel = "$DOMU_KERNEL"
ramdisk = "/tmp/domU-initrd.img"
extra = "console=hvc0 loglevel=7"
memory = 512
vcpus = 2
disk = [ $DISKS ]
device_model_override = "$JOB/pvhost-run"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
EOF
cp /tmp/$NAME.cfg "$OUT/"
CONLOG=/var/log/xen/console/guest-$NAME.log
rm -f "$CONLOG"
xl -vvv create /tmp/$NAME.cfg > "$OUT/xl-create.log" 2>&1; rc=$?
check "xl create with pvhost as the device model" "[ $rc = 0 ]"
if [ $rc != 0 ]; then tail -30 "$OUT/xl-create.log"; cp /var/log/xen/*.log "$OUT/" 2>/dev/null; exit 1; fi
DOMID=$(xl domid $NAME)
QMP=/var/run/xen/qmp-libxl-$DOMID
log "domid $DOMID; device model: $(ps -o pid=,args= -C pvhost | cut -c1-200)"

# The guest's console and pvhost's log, live, into the job's output (and the lab's serial log).
tail -F "$CONLOG" 2>/dev/null | sed -u 's/^/[domU] /' &
TAILS=$!
tail -F /var/log/xen/qemu-dm-$NAME.log 2>/dev/null | sed -u 's/^/[pvhost] /' &
TAILS="$TAILS $!"
waitfor() {  # MARKER SECONDS: a wall-clock deadline (each `xl domid` is slow under emulation)
  local end=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt $end ]; do
    grep -q "$1" "$CONLOG" 2>/dev/null && return 0
    xl domid $NAME >/dev/null 2>&1 || return 1
    sleep 1
  done; return 1
}
qmp() {  # one connection per command, as libxl does
  printf '{"execute":"qmp_capabilities"}\r\n%s\r\n' "$1" | timeout 20 socat -t 5 - UNIX-CONNECT:$QMP | tail -n +3
}
diagnose() {  # what pvhost and Xen say when the guest does not get on
  local pid; pid=$(pgrep -x pvhost | head -1)
  log "diagnosing: pvhost pid ${pid:-none}"
  [ -n "$pid" ] && for t in /proc/$pid/task/*; do echo "  task $(basename $t) $(cat $t/comm) wchan=$(cat $t/wchan 2>/dev/null) state=$(awk '{print $3}' $t/stat)"; done
  [ -n "$pid" ] && ls -l /proc/$pid/fd 2>/dev/null | awk '{print "  fd", $(NF-2), $NF}' | head -40
  [ -n "$pid" ] && timeout 5 strace -f -tt -p "$pid" -e trace=!futex 2>&1 | head -60 | sed 's/^/  strace: /'
  xl debug-keys e; xl debug-keys q
  xl dmesg | tail -150 | sed 's/^/  xl-dmesg: /'
  xenstore-ls -f /local/domain/0/backend/qdisk 2>/dev/null | grep -E 'state|ring|event' | sed 's/^/  xs: /'
  xenstore-ls -f /local/domain/$DOMID/device/vbd 2>/dev/null | grep -E 'state|ring-ref|event' | sed 's/^/  xs: /'
}
if waitfor XENLAB-READY 240; then
  echo "PVLAB-CHECK domU booted: OK"
else
  echo "PVLAB-CHECK domU booted: FAIL"; fail=1
  diagnose
fi
xenstore-ls -fp > "$OUT/xenstore-running.txt" 2>&1
qmp '{"execute":"query-block"}' > "$OUT/query-block.json"
check "query-block lists the qdisk disks" "grep -q 'xvdc' \"$OUT/query-block.json\""
if [ $QCOW = yes ]; then
  # A live snapshot of xvdd while the guest writes to it.
  waitfor XENLAB-MARKER 120
  sleep 1
  qmp '{"execute":"blockdev-snapshot-sync","arguments":{"device":"xvdd","snapshot-file":"/scratch/snap.qcow2","format":"qcow2"}}' \
    > "$OUT/snapshot-reply.json"
  check "blockdev-snapshot-sync of xvdd while the guest runs" "grep -q '\"return\"' \"$OUT/snapshot-reply.json\""
fi
waitfor XENLAB-VERIFY-DONE 600
qmp '{"execute":"query-blockstats"}' > "$OUT/query-blockstats.json"
qmp '{"execute":"query-block"}' > "$OUT/query-block-after.json"
check "query-blockstats counts the guest's writes" "grep -q '\"wr_operations\": *[1-9]' \"$OUT/query-blockstats.json\""
i=0; while xl domid $NAME >/dev/null 2>&1 && [ $i -lt 900 ]; do sleep 1; i=$((i+1)); done
xl domid $NAME >/dev/null 2>&1 && { log "domU still running: destroying"; xl destroy $NAME; fail=1; }
sleep 2
cp "$CONLOG" "$OUT/domU-console.log" 2>/dev/null
cp /var/log/xen/qemu-dm-$NAME.log "$OUT/pvhost.log" 2>/dev/null
check "pvhost exited with the domain" "! pgrep -x pvhost >/dev/null"

echo "================ results ================"
grep -a -E 'XENLAB-(XENBUS|DISK|MARKER|VERIFY|DISCARD|FIO|DOMU-DONE)' "$CONLOG" | tr -d '\r'
check "the guest saw xvdc (pvhost raw)" "grep -aq 'XENLAB-DISK xvdc' \"$CONLOG\""
check "fio crc32c verify on xvdc" "grep -aq 'XENLAB-VERIFY xvdc rc=0' \"$CONLOG\""
check "marker in the raw image" "dd if=/scratch/qdisk.img bs=512 skip=2048 count=1 2>/dev/null | grep -aq PVLAB-MARKER-xvdc"
if [ $QCOW = yes ]; then
  check "fio crc32c verify on xvdd (qcow2, snapshot taken mid-run)" "grep -aq 'XENLAB-VERIFY xvdd rc=0' \"$CONLOG\""
  qemu-img check /scratch/disk.qcow2 > "$OUT/check-base.txt" 2>&1; c1=$?
  qemu-img check /scratch/snap.qcow2 > "$OUT/check-snap.txt" 2>&1; c2=$?
  check "qemu-img check of the base and the overlay" "[ $c1 = 0 ] && [ $c2 = 0 ]"
  check "marker through the snapshot chain" "qemu-img dd -f qcow2 if=/scratch/snap.qcow2 of=/tmp/head.raw bs=512 count=2049 >/dev/null 2>&1 && dd if=/tmp/head.raw bs=512 skip=2048 count=1 2>/dev/null | grep -aq PVLAB-MARKER-xvdd"
  qemu-img info --backing-chain /scratch/snap.qcow2 > "$OUT/chain.txt" 2>&1
fi
check "fio numbers for every disk" "[ \$(grep -ac 'XENLAB-FIO backend=.*IOPS=' \"$CONLOG\") -ge 6 ]"
grep -E 'error|warn' "$OUT/pvhost.log" | head -20 | sed 's/^/pvhost.log: /'
kill $TAILS 2>/dev/null
losetup -d $LOOP
exit $fail
