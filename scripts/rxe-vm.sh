#!/bin/bash
# scripts/rxe-vm.sh - run one command inside a throw-away QEMU (TCG) guest that has a
# real SoftRoCE device, and exit with that command's status.
#
# Why a guest: the hosts Ferry is developed and tested on have no RDMA in their
# kernel (no CONFIG_INFINIBAND, no modules; see docs/platform.md). Debian's generic
# `linux-image-<ver>-amd64` package (not the `cloud` flavour) ships `rdma_rxe`,
# so we unpack it with dpkg-deb (never install it), build a busybox initramfs
# around it, boot it under TCG and create `rxe0` on the guest's `lo`. On rxe
# over `lo`, GID index 1 is the RoCE v2 GID ::ffff:127.0.0.1; rdma_cm does NOT
# work there, plain verbs do (Ferry exchanges QP numbers over its own TCP).
#
# The repository (or --share DIR) is shared into the guest over 9p at the SAME
# absolute path and is the command's working directory, so binaries the host
# already built under target/ run in the guest unmodified: build on the host,
# never inside the guest (TCG is ~50x slower). The initramfs carries the host's
# own libibverbs + rxe provider + libc/libgcc_s/libstdc++ etc., so a host-built
# Rust binary dynamically linked to Debian's libibverbs runs as is.
#
# Usage:
#   scripts/rxe-vm.sh [options] -- CMD [ARGS...]   run CMD (exec'd by bash, as root)
#   scripts/rxe-vm.sh [options] -- 'shell snippet' a single argument is a bash script
#   scripts/rxe-vm.sh --build-only                 build/refresh the cached image only
# Options:
#   --share DIR     host directory shared at the same path (default: repo root)
#   --timeout SECS  wall-clock limit for the whole guest run (default 600, or
#                   $FERRY_RXE_TIMEOUT); on expiry: console printed, exit 124
#   --mem MB        guest RAM (default 2048)     --cpus N  guest vCPUs (default 2)
#   --rebuild       rebuild the cached image even if it looks current
# Environment:
#   FERRY_RXE_CACHE  image cache (default $HOME/.cache/ferry-rxe)
#   FERRY_RXE_KEEP=1 keep the per-run directory (console.log, out.log)
# In the guest: RXE_DEV=rxe0 RXE_GID_INDEX=1 RXE_IP=127.0.0.1 RXE_PORT=1.
#
# Exit status: CMD's status; 124 on timeout; 125 if the guest never reported
# a status (boot failure); 126 if the guest could not set up rxe0 or the share.
# On any non-zero status the guest console is printed to stderr.
#
# Needs root (apt-get, and depmod into a scratch tree). Works on a fresh
# Debian 12 x86_64 machine: missing packages are installed (apt-get update first).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd -P)
CACHE=${FERRY_RXE_CACHE:-${HOME:-/root}/.cache/ferry-rxe}
SHARE=$REPO_ROOT
TIMEOUT=${FERRY_RXE_TIMEOUT:-600}
MEM=2048
CPUS=2
REBUILD=0
BUILD_ONLY=0

usage() { sed -n '2,40p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --share) SHARE=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --mem) MEM=$2; shift 2 ;;
    --cpus) CPUS=$2; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    --build-only) BUILD_ONLY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "rxe-vm: unknown option '$1' (use -- before the command)" >&2; exit 2 ;;
  esac
done
if [ "$BUILD_ONLY" = 0 ] && [ $# -eq 0 ]; then usage >&2; exit 2; fi
SHARE=$(cd "$SHARE" && pwd -P)

log() { echo "[rxe-vm $(date +%T)] $*" >&2; }
die() { log "error: $*"; exit 126; }

# Host packages: qemu + what the initramfs is assembled from.
HOST_PKGS="qemu-system-x86 busybox-static kmod cpio zstd iproute2 libibverbs1 ibverbs-providers ibverbs-utils perftest libgcc-s1 libstdc++6 coreutils libhwloc15"

ensure_host_pkgs() {
  local missing="" p
  for p in $HOST_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    log "installing host packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -o DPkg::Lock::Timeout=600 $missing >/dev/null
  fi
}

# Kernel modules the guest loads (dependencies resolved with modprobe --show-depends).
GUEST_MODS="rdma_rxe ib_uverbs crc32_generic 9p 9pnet_virtio virtio_pci"
# Host binaries copied into the guest (plus their shared-library closure);
# ib_read_bw (perftest) is the reference `ferry-bench rdma` measures against.
GUEST_BINS="/usr/bin/bash /usr/bin/env /usr/bin/timeout /usr/bin/rdma /usr/bin/ip /usr/bin/ibv_devices /usr/bin/ibv_devinfo /usr/bin/ibv_rc_pingpong /usr/bin/ib_read_bw"
# Libraries for host-built binaries run from the share (Rust test binaries link
# libibverbs, libgcc_s, libc, libm; librxe is dlopened by libibverbs; `ferry` links
# libhwloc for its topology).
MULTIARCH=/usr/lib/x86_64-linux-gnu
GUEST_LIBS="$MULTIARCH/libibverbs.so.1 $MULTIARCH/libibverbs/librxe-rdmav34.so $MULTIARCH/libhwloc.so.15
 $MULTIARCH/libgcc_s.so.1 $MULTIARCH/libstdc++.so.6 $MULTIARCH/libm.so.6 $MULTIARCH/libdl.so.2
 $MULTIARCH/libpthread.so.0 $MULTIARCH/librt.so.1 $MULTIARCH/libc.so.6 /lib64/ld-linux-x86-64.so.2"

# Guest layout is merged-/usr (/bin, /lib, /lib64 are symlinks into /usr), so a
# host path like /lib64/ld-linux-x86-64.so.2 is stored under /usr/lib64/.
guest_path() {
  case "$1" in
    /bin/* | /sbin/* | /lib/* | /lib64/*) echo "/usr$1" ;;
    *) echo "$1" ;;
  esac
}

# Copy files into root $1 together with their ldd closure, at the paths the
# dynamic loader will look them up under (symlink targets copied as files).
copy_with_closure() {
  local root=$1 f l g
  shift
  for f in "$@"; do
    [ -e "$f" ] || die "host file $f missing (package not installed?)"
    for l in "$f" $({ ldd "$f" 2>/dev/null || true; } | awk '$2=="=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
      g=$(guest_path "$l")
      [ -e "$root$g" ] && continue
      mkdir -p "$root$(dirname "$g")"
      cp -L "$l" "$root$g"
    done
  done
}

build_image() {
  local img=$CACHE/image t kver r ko rel
  t=$CACHE/image.tmp
  rm -rf "$t"
  mkdir -p "$t/deb"

  kver=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {sub("linux-image-","",$2); print $2; exit}')
  if [ -z "$kver" ]; then
    apt-get update -qq
    kver=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {sub("linux-image-","",$2); print $2; exit}')
  fi
  [ -n "$kver" ] || die "cannot resolve linux-image-amd64 to a versioned kernel package"
  log "guest kernel: linux-image-$kver (download + unpack)"
  # apt-get download drops privileges to _apt: give it a directory it may write.
  chmod 0777 "$t/deb"
  (cd "$t/deb" && apt-get download -qq "linux-image-$kver" 2>&1 | grep -v -i 'unsandboxed' >&2 || true)
  ls "$t"/deb/linux-image-"$kver"_*.deb >/dev/null 2>&1 || die "apt-get download linux-image-$kver failed"
  dpkg-deb -x "$t"/deb/linux-image-"$kver"_*.deb "$t/k"
  depmod -b "$t/k" "$kver"
  cp "$t/k/boot/vmlinuz-$kver" "$t/vmlinuz"

  r=$t/root
  mkdir -p "$r"/{usr/bin,usr/sbin,usr/lib,usr/lib64,etc/ferry-rxe,proc,sys,dev,tmp,run,root,ctl}
  ln -s usr/bin "$r/bin"
  ln -s usr/sbin "$r/sbin"
  ln -s usr/lib "$r/lib"
  ln -s usr/lib64 "$r/lib64"

  # Kernel modules, in dependency order, into the initramfs.
  mkdir -p "$r/usr/lib/modules/$kver"
  : > "$r/etc/ferry-rxe/modules"
  for m in $GUEST_MODS; do modprobe -d "$t/k" -S "$kver" --show-depends "$m"; done |
    awk '$1=="insmod" && !seen[$2]++ {print $2}' | while read -r ko; do
      rel=${ko#"$t/k/"}
      rel=/usr/${rel#usr/}
      mkdir -p "$r$(dirname "$rel")"
      cp "$ko" "$r$rel"
      echo "$rel" >> "$r/etc/ferry-rxe/modules"
    done
  [ -s "$r/etc/ferry-rxe/modules" ] || die "no kernel modules resolved"
  grep -q rdma_rxe "$r/etc/ferry-rxe/modules" || die "kernel $kver has no rdma_rxe"

  # Userspace: host binaries + libraries (closure), busybox for the rest.
  copy_with_closure "$r" $GUEST_BINS $GUEST_LIBS
  mkdir -p "$r/etc/libibverbs.d"
  cp /etc/libibverbs.d/rxe.driver "$r/etc/libibverbs.d/"
  cp /bin/busybox "$r/usr/bin/busybox"
  for a in $("$r/usr/bin/busybox" --list); do
    [ -e "$r/usr/bin/$a" ] || [ -L "$r/usr/bin/$a" ] || ln -s busybox "$r/usr/bin/$a"
  done
  cp -a /etc/ld.so.conf /etc/ld.so.conf.d "$r/etc/"
  ldconfig -r "$r"
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$r/etc/passwd"
  printf 'root:x:0:\n' > "$r/etc/group"
  printf '127.0.0.1 localhost\n::1 localhost\n' > "$r/etc/hosts"

  cat > "$r/init" <<'EOF'
#!/bin/sh
# PID 1 of the Ferry rxe guest: modules, rxe0 on lo, 9p share, run /ctl/cmd.sh.
export PATH=/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp; mount -t tmpfs tmpfs /run
ulimit -l unlimited
SHARE=
for a in $(cat /proc/cmdline); do case "$a" in ferryrxe.share=*) SHARE=${a#*=};; esac; done
say() { echo "ferry-rxe-init: $*" > /dev/console; }
fail() { say "$*"; echo 126 > /ctl/rc 2>/dev/null; sync; poweroff -f; }
while read -r m; do insmod "$m" || say "insmod $m failed"; done < /etc/ferry-rxe/modules
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 ctl /ctl || fail "mount ctl failed"
/usr/bin/ip link set lo up || fail "lo up failed"
/usr/bin/rdma link add rxe0 type rxe netdev lo || fail "rdma link add rxe0 netdev lo failed"
[ -e /sys/class/infiniband/rxe0/ports/1/gids/1 ] || fail "rxe0 has no GID 1"
say "rxe0 on lo ready at uptime $(cut -d' ' -f1 /proc/uptime)s"
mkdir -p "$SHARE"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none host0 "$SHARE" || fail "mount share $SHARE failed"
stty -F /dev/ttyS1 raw -echo 2>/dev/null
export RXE_DEV=rxe0 RXE_PORT=1 RXE_GID_INDEX=1 RXE_IP=127.0.0.1
cd "$SHARE" && /usr/bin/bash /ctl/cmd.sh < /dev/null > /dev/ttyS1 2>&1
rc=$?
echo "$rc" > /ctl/rc
say "command exited $rc at uptime $(cut -d' ' -f1 /proc/uptime)s"
sync
umount "$SHARE" 2>/dev/null
poweroff -f
EOF
  chmod +x "$r/init"
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc --quiet | zstd -q -T0 -10 > "$t/initrd.img")
  echo "$kver" > "$t/kver"
  echo "$STAMP" > "$t/stamp"
  rm -rf "$t/deb" "$t/k" "$t/root"
  rm -rf "$img"
  mv "$t" "$img"
  log "image ready: $img (initrd $(du -sh "$img/initrd.img" | cut -f1), kernel $kver)"
}

mkdir -p "$CACHE"
# The image is rebuilt whenever anything above this line (package lists, module
# list, build_image, the guest's /init) changes.
STAMP=$(sed -n '1,/^mkdir -p "\$CACHE"$/p' "$0" | sha256sum | cut -c1-16)
ensure_host_pkgs
# One builder at a time; concurrent runs wait for the image instead of racing.
exec 9> "$CACHE/.lock"
flock 9
if [ "$REBUILD" = 1 ] || [ ! -s "$CACHE/image/initrd.img" ] || [ "$(cat "$CACHE/image/stamp" 2>/dev/null)" != "$STAMP" ]; then
  TB=$(date +%s)
  build_image
  log "image build took $(( $(date +%s) - TB ))s"
fi
flock -u 9
[ "$BUILD_ONLY" = 1 ] && exit 0

RUN=$(mktemp -d "$CACHE/run.XXXXXX")
mkdir -p "$RUN/ctl"
if [ $# -eq 1 ]; then
  printf '%s\n' "$1" > "$RUN/ctl/cmd.sh"
else
  { printf 'exec '; printf '%q ' "$@"; printf '\n'; } > "$RUN/ctl/cmd.sh"
fi
: > "$RUN/out.log"
: > "$RUN/console.log"
QPID=
TPID=
cleanup() {
  [ -n "$QPID" ] && kill "$QPID" 2>/dev/null
  [ -n "$TPID" ] && kill "$TPID" 2>/dev/null
  if [ "${FERRY_RXE_KEEP:-0}" = 1 ]; then log "kept $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT

log "booting guest (TCG, $CPUS vCPUs, ${MEM} MiB), share $SHARE, timeout ${TIMEOUT}s"
T0=$(date +%s.%N)
set +e
timeout --kill-after=5 "$TIMEOUT" qemu-system-x86_64 -accel tcg,thread=multi -cpu max \
  -m "$MEM" -smp "$CPUS" -nodefaults -no-user-config -display none -no-reboot \
  -kernel "$CACHE/image/vmlinuz" -initrd "$CACHE/image/initrd.img" \
  -append "console=ttyS0 quiet loglevel=4 panic=-1 ferryrxe.share=$SHARE" \
  -serial "file:$RUN/console.log" -serial "file:$RUN/out.log" \
  -virtfs "local,path=$SHARE,mount_tag=host0,security_model=none,id=host0" \
  -virtfs "local,path=$RUN/ctl,mount_tag=ctl,security_model=none,id=ctl" &
QPID=$!
tail -n +1 -f --pid=$QPID "$RUN/out.log" &
TPID=$!
wait "$QPID"
QRC=$?
QPID=
wait "$TPID" 2>/dev/null
TPID=
set -e
WALL=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
READY=$(grep -o 'ready at uptime [0-9.]*' "$RUN/console.log" | awk '{print $4}' || true)

print_console() { log "guest console:"; sed 's/^/  | /' "$RUN/console.log" >&2; }
if [ "$QRC" = 124 ] || [ "$QRC" = 137 ]; then
  log "TIMEOUT after ${TIMEOUT}s (qemu wall ${WALL}s)"
  print_console
  exit 124
fi
if [ ! -s "$RUN/ctl/rc" ]; then
  log "guest did not report an exit status (qemu exit $QRC, wall ${WALL}s)"
  print_console
  exit 125
fi
RC=$(cat "$RUN/ctl/rc")
log "guest command exit status $RC; rxe0 ready at guest uptime ${READY:-?}s; qemu wall ${WALL}s"
[ "$RC" = 0 ] || print_console
exit "$RC"
