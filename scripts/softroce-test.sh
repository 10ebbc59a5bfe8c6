#!/bin/bash
# softroce-test.sh: run farpool's verbs tests on a real Soft-RoCE (rdma_rxe) device.
#
# Hosts without an RDMA NIC (and kernels without InfiniBand support) cannot load rdma_rxe,
# so this boots Debian's stock kernel (linux-image-amd64 ships rdma_rxe.ko) in qemu, with
# this host's root filesystem shared read-only over 9p: the guest runs the very binaries
# built here, at the same paths. Inside the guest it loads rdma_rxe, creates rxe0 on a
# dummy interface (10.11.12.1/24, no route out, no NIC at all: -nic none), and runs the
# verbs conformance suite and an end-to-end test (a controller, two memory nodes started
# with --transport verbs, a client). It prints one plain line `N passed, N failed` and exits non-zero
# when anything failed (or the guest did not report).
#
# Usage: scripts/softroce-test.sh            build the tests, boot the guest, run them
#        scripts/softroce-test.sh --no-build  reuse the last build
#        scripts/softroce-test.sh --perf      also build farpool (release, verbs) and, after the
#            tests, run `farpool bench --transport verbs` (which starts its own controller and
#            verbs memory node) next to perftest's ib_read_bw / ib_write_bw / ib_read_lat on
#            the same rxe0 (figures only; never fails the run)
# Needs: scripts/setup-rdma.sh (qemu-system-x86, linux-image-amd64, busybox-static, rdma-core,
#        cmake/clang for the `verbs` feature). Run as root (qemu reads /boot and /lib/modules).
# Env:   WORK (scratch dir, default ${TMPDIR:-/tmp}/farpool-softroce), MEM (2G), SMP (2),
#        VMTIMEOUT (seconds for the whole VM run, 1200; the conformance suite may use 55% of
#        it and the end-to-end suite 30%, so a hang is reported as such), ACCEL (auto|kvm|tcg; auto uses KVM only where it can run
#        a stock kernel), TEST_THREADS (2), TEST_FILTER (libtest filter, verbs::),
#        CLUSTER_FILTER (libtest filter for the end-to-end tests), GUEST_EXTRA (a command run in the guest before the suite, for experiments; its
#        test lines are shown), CARGO_TARGET_DIR (as for cargo).
set -euo pipefail

VMTIMEOUT=${VMTIMEOUT:-1200}
case $VMTIMEOUT in ''|*[!0-9]*) echo "softroce-test: VMTIMEOUT must be a number of seconds" >&2; exit 2 ;; esac
CONF_TIMEOUT=$((VMTIMEOUT * 55 / 100))
CLUSTER_TIMEOUT=$((VMTIMEOUT * 30 / 100))
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-${TMPDIR:-/tmp}/farpool-softroce}
VM=$WORK/vm
RES=$WORK/results
mkdir -p "$VM" "$RES"
BUILD=1
PERF=0
for arg in "$@"; do
  case $arg in
    --no-build) BUILD=0 ;;
    --perf) PERF=1 ;;
    *) echo "usage: $0 [--no-build] [--perf]" >&2; exit 2 ;;
  esac
done

die() { echo "softroce-test: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

# --- prerequisites --------------------------------------------------------------------
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing; run scripts/setup-rdma.sh"
[ -x /usr/bin/busybox ] || die "busybox missing; run scripts/setup-rdma.sh"
KVER=$(ls /lib/modules 2>/dev/null | sort -V | tail -1 || true)
[ -n "$KVER" ] && [ -f "/boot/vmlinuz-$KVER" ] || die "no Debian kernel in /boot; run scripts/setup-rdma.sh (installs linux-image-amd64)"
modinfo -k "$KVER" -n rdma_rxe >/dev/null 2>&1 || die "kernel $KVER has no rdma_rxe module"

# --- build the test binaries on the host -----------------------------------------------
TESTBIN_FILE=$VM/testbins
if [ "$BUILD" = 1 ]; then
  echo "softroce-test: building the verbs tests (cargo test --features verbs --no-run)" >&2
  (cd "$ROOT" && cargo test -p farpool-rdma -p farpool --features farpool/verbs,farpool-rdma/verbs \
      --test conformance --test verbs_cluster --no-run --message-format=json 2>"$WORK/build.log") \
    | grep -o '"executable":"[^"]*"' | sed 's/"executable":"//; s/"$//' > "$TESTBIN_FILE" \
    || { tail -20 "$WORK/build.log" >&2; die "build failed (see $WORK/build.log)"; }
fi
[ -s "$TESTBIN_FILE" ] || die "no test binary recorded; run without --no-build"
CONFORMANCE=$(grep '/conformance-' "$TESTBIN_FILE" | head -1)
CLUSTER=$(grep '/verbs_cluster-' "$TESTBIN_FILE" | head -1)
[ -x "$CONFORMANCE" ] || die "test binary $CONFORMANCE missing"
[ -x "$CLUSTER" ] || die "test binary $CLUSTER missing"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
FARPOOL_REL=$TARGET_DIR/release/farpool
if [ "$PERF" = 1 ]; then
  if [ "$BUILD" = 1 ]; then
    echo "softroce-test: building farpool --release --features verbs for --perf" >&2
    (cd "$ROOT" && cargo build --release --features verbs --bin farpool 2>>"$WORK/build.log") \
      || die "release build failed (see $WORK/build.log)"
  fi
  [ -x "$FARPOOL_REL" ] || die "$FARPOOL_REL missing; run --perf without --no-build"
fi

# --- tiny initramfs: mount the host root over virtio-9p, switch_root into it -----------
MODS="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci netfs fscache 9pnet 9pnet_virtio 9p"
if [ ! -f "$VM/initrd-$KVER.img" ]; then
  D=$VM/initramfs; rm -rf "$D"; mkdir -p "$D"/{bin,mods,proc,dev,newroot}
  cp /usr/bin/busybox "$D/bin/busybox"
  for m in $MODS; do
    f=$(modinfo -k "$KVER" -n "$m" 2>/dev/null || echo builtin)
    case $f in
      *.ko) cp "$f" "$D/mods/";;
      *.ko.xz) xz -dc "$f" > "$D/mods/$m.ko";;
      *.ko.zst) zstd -qdc "$f" > "$D/mods/$m.ko";;
      *) ;;  # built into the kernel
    esac
  done
  cat > "$D/init" <<EOI
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in $MODS; do [ -f /mods/\$m.ko ] && /bin/busybox insmod /mods/\$m.ko; done
/bin/busybox mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=512000,cache=loose hostroot /newroot \
  || { echo "guest: 9p mount of the host root failed"; echo o > /proc/sysrq-trigger; }
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc
exec /bin/busybox switch_root /newroot \$guestinit
EOI
  chmod +x "$D/init"
  (cd "$D" && find . | cpio -o -H newc --quiet | gzip -1) > "$VM/initrd-$KVER.img.tmp"
  mv "$VM/initrd-$KVER.img.tmp" "$VM/initrd-$KVER.img"
fi

# --- what runs in the guest (PID 1, from the host's root filesystem) --------------------
cat > "$VM/guest-init.sh" <<EOI
#!/bin/bash
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc; mount -t sysfs sys /sys
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /var/tmp
mkdir -p /run/ovl/u /run/ovl/w
# /tmp: the host's /tmp read-only below a tmpfs, so it is writable and host files stay visible.
modprobe overlay && mount -t overlay overlay -o lowerdir=/tmp,upperdir=/run/ovl/u,workdir=/run/ovl/w /tmp \
  || mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mkdir -p "$WORK"; mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 work "$WORK"
ulimit -l unlimited
ip link set lo up
bash "$VM/guest-run.sh" > "$RES/guest.log" 2>&1; echo \$? > "$RES/rc"
cd /; sync; umount "$WORK"
echo o > /proc/sysrq-trigger; sleep 10
EOI
chmod +x "$VM/guest-init.sh"

EXTRA=
if [ -n "${GUEST_EXTRA:-}" ]; then
  EXTRA="echo '--- extra: $GUEST_EXTRA'; ( $GUEST_EXTRA ) 2>&1 | grep -E \"${GUEST_GREP:-^test |test result|panicked|Timeout}\""
fi
cat > "$VM/guest-run.sh" <<EOI
set -u
echo "guest up after \$(cut -d' ' -f1 /proc/uptime)s: kernel \$(uname -r)"
modprobe rdma_rxe || { echo "guest: modprobe rdma_rxe failed"; exit 3; }
ip link add dummy0 type dummy && ip addr add 10.11.12.1/24 dev dummy0 && ip link set dummy0 up \
  && rdma link add rxe0 type rxe netdev dummy0 || { echo "guest: creating rxe0 failed"; exit 3; }
rdma link show
# Memory-window support as the device reports it (the verbs backend uses type-2 windows
# where they exist, else the region rkey; the suites print which).
ibv_devinfo -v -d rxe0 2>/dev/null | grep -E 'max_mw|MEM_WINDOW' | sed 's/^[[:space:]]*/rxe0: /'
cd "$ROOT"
export FARPOOL_VERBS_REQUIRE=1 FARPOOL_RDMA_DEVICE=rxe0 RUST_BACKTRACE=1
$EXTRA
echo "--- verbs conformance suite"
timeout -k 5 $CONF_TIMEOUT "$CONFORMANCE" ${TEST_FILTER:-verbs} --test-threads=${TEST_THREADS:-2} > "$RES/conformance.log" 2>&1
crc=\$?
echo "conformance exit status \$crc"
[ \$crc = 124 ] && echo "guest: the conformance suite ran past its $CONF_TIMEOUT s and was killed"
grep -E '^test |test result' "$RES/conformance.log"
echo "--- end to end: controller, two verbs memory nodes, client (\$(cut -d' ' -f1 /proc/uptime)s)"
timeout -k 5 $CLUSTER_TIMEOUT "$CLUSTER" ${CLUSTER_FILTER:-} --test-threads=1 > "$RES/cluster.log" 2>&1
erc=\$?
echo "end-to-end exit status \$erc"
[ \$erc = 124 ] && echo "guest: the end-to-end suite ran past its $CLUSTER_TIMEOUT s and was killed"
grep -E '^test |test result' "$RES/cluster.log"
if [ "$PERF" = 1 ]; then
  echo "--- perf: farpool bench (verbs) and perftest on rxe0 (\$(cut -d' ' -f1 /proc/uptime)s)"
  FP="$FARPOOL_REL"
  # farpool bench starts its own controller and verbs memory node per measurement
  # (--transport verbs), so blocks of the last one do not fill the region.
  # "rk": the same with the memory node on the region rkey (no memory windows), for the
  # cost of windows in the same run.
  for spec in "read 4KiB 1" "read 4KiB 32" "read 4KiB 128" "read 8 1" "write 4KiB 32" \
      "read 4KiB 32 rk" "read 8 1 rk"; do
    set -- \$spec
    nomw=0; [ "\${4:-}" = rk ] && nomw=1
    echo "farpool bench --transport verbs --op \$1 --size \$2 --depth \$3 (memory windows: \$([ \$nomw = 1 ] && echo off || echo on)):"
    FARPOOL_NO_MEMORY_WINDOWS=\$nomw RUST_LOG=error timeout 180 "\$FP" bench --transport verbs \
      --op \$1 --size \$2 --depth \$3 --duration 5s --warmup 1s --json --no-progress 2>&1 | tail -2
  done
  # farpool status of a verbs memory node: device and isolation mode.
  RUST_LOG=error "\$FP" controller --listen 127.0.0.1:0 > /tmp/ctl.out 2>&1 & CTLPID=\$!
  for _ in \$(seq 100); do grep -q '^listening ' /tmp/ctl.out && break; sleep 0.1; done
  CTL=\$(sed -n 's/^listening //p' /tmp/ctl.out | head -1)
  RUST_LOG=error "\$FP" memnode --controller "\$CTL" --capacity 64MiB --transport verbs > /tmp/mn.out 2>&1 & MNPID=\$!
  for _ in \$(seq 100); do grep -q '^listening ' /tmp/mn.out && break; sleep 0.1; done
  sleep 3  # the first heartbeat carries the data-plane details
  echo "farpool status:"; timeout 30 "\$FP" status --controller "\$CTL" | sed -n '1,/^USAGE/p'
  kill \$MNPID \$CTLPID 2>/dev/null; wait \$MNPID \$CTLPID 2>/dev/null
  pair() { # name addr perftest-args...
    local name=\$1 addr=\$2; shift 2
    timeout 120 "\$@" > /tmp/\$name.srv 2>&1 & local sp=\$!
    # The server may take a while to listen on a loaded host: retry refused connects.
    local try
    for try in 1 2 3 4 5 6 7 8 9 10; do
      sleep 1
      timeout 120 "\$@" "\$addr" > /tmp/\$name.cli 2>&1 && break
      grep -q "Couldn't connect" /tmp/\$name.cli || break
    done
    grep -q '#bytes' /tmp/\$name.cli || { echo "\$name: client failed"; tail -3 /tmp/\$name.cli; }
    wait \$sp
    printf '%-14s %s\\n' "\$name" "\$(grep -A1 '#bytes' /tmp/\$name.cli | tail -1)"
  }
  echo "perftest (lat: #bytes #iter t_min t_max t_typical t_avg t_stdev p99 p99.9 us; bw: #bytes #iter BWpeak BWavg MB/s Mpps):"
  pair read_bw_4k 127.0.0.1 ib_read_bw -d rxe0 -x 1 -F -s 4096 -D 5
  pair write_bw_4k 127.0.0.1 ib_write_bw -d rxe0 -x 1 -F -s 4096 -D 5
  pair read_lat_8 127.0.0.1 ib_read_lat -d rxe0 -x 1 -F -s 8 -n 5000
fi
echo "guest done after \$(cut -d' ' -f1 /proc/uptime)s"
[ \$crc = 0 ] && exit \$erc
exit \$crc
EOI

# --- boot ---------------------------------------------------------------------------------
ACCEL=${ACCEL:-auto}
if [ "$ACCEL" = auto ]; then
  ACCEL=tcg
  # kvm-pvm (a /dev/kvm that only runs specially built guest kernels) cannot boot Debian's.
  if [ -w /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] && grep -qE 'vmx|svm' /proc/cpuinfo; then
    ACCEL=kvm
  fi
fi
A="-accel tcg,thread=multi -cpu max"
[ "$ACCEL" = kvm ] && A="-accel kvm -cpu host"
boot() {
  rm -f "$RES"/*
  # shellcheck disable=SC2086
  timeout -k 10 "$VMTIMEOUT" qemu-system-x86_64 -M q35 $A -smp "${SMP:-2}" -m "${MEM:-2G}" \
    -nodefaults -no-user-config -display none -nic none -serial stdio -no-reboot \
    -kernel "/boot/vmlinuz-$KVER" -initrd "$VM/initrd-$KVER.img" \
    -append "console=ttyS0 quiet loglevel=1 panic=-1 clocksource=tsc tsc=reliable guestinit=$VM/guest-init.sh" \
    -fsdev local,id=root,path=/,readonly=on,security_model=none,multidevs=remap \
    -device virtio-9p-pci,fsdev=root,mount_tag=hostroot \
    -fsdev local,id=work,path="$WORK",security_model=none,multidevs=remap \
    -device virtio-9p-pci,fsdev=work,mount_tag=work </dev/null > "$WORK/console.log" 2>&1
}
echo "softroce-test: booting $KVER in qemu ($ACCEL), running the suite (this takes minutes under tcg)" >&2
start=$(date +%s)
qrc=0; boot || qrc=$?
# qemu under TCG has been seen to crash (SIGSEGV) once in a while before the guest ran
# anything: boot once more in that case, never after a run that reported.
if [ ! -f "$RES/guest.log" ] && [ "$qrc" -ne 124 ]; then
  echo "softroce-test: qemu exited with status $qrc before the guest reported; booting again" >&2
  qrc=0; boot || qrc=$?
fi
echo "softroce-test: guest ran $(( $(date +%s) - start )) s (qemu status $qrc)" >&2

[ -f "$RES/guest.log" ] || { tail -20 "$WORK/console.log" >&2; die "the guest did not report (console: $WORK/console.log)"; }
cat "$RES/guest.log" >&2
if [ "$qrc" = 124 ] || [ "$qrc" = 137 ]; then
  echo "softroce-test: the VM ran past VMTIMEOUT=${VMTIMEOUT}s and was stopped; last lines of the suites:" >&2
  for suite in conformance cluster; do
    [ -f "$RES/$suite.log" ] && { echo "--- $suite (tail)"; tail -15 "$RES/$suite.log"; } >&2
  done
fi
# The failures' own output (panic messages), so a CI log says what broke.
for suite in conformance cluster; do
  if grep -q '^failures:' "$RES/$suite.log" 2>/dev/null; then
    echo "--- $suite: failures" >&2
    sed -n '/^failures:/,/^test result:/p' "$RES/$suite.log" | head -200 >&2
  fi
done
passed=0; failed=0
for suite in conformance cluster; do
  line=$(grep -E '^test result:' "$RES/$suite.log" 2>/dev/null | tail -1 || true)
  if [ -z "$line" ]; then
    failed=$((failed + 1)); echo "softroce-test: the $suite suite did not finish (see $RES/$suite.log)" >&2
    continue
  fi
  p=$(sed -n 's/.* \([0-9][0-9]*\) passed.*/\1/p' <<<"$line")
  f=$(sed -n 's/.* \([0-9][0-9]*\) failed.*/\1/p' <<<"$line")
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
done
guest_rc=$(cat "$RES/rc" 2>/dev/null || echo 255)
if [ "$guest_rc" != 0 ] && [ "$failed" = 0 ]; then failed=1; fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ] && [ "$passed" -gt 0 ]
