#!/usr/bin/env bash
# scripts/deps.sh - install what building and testing Ferry needs on Debian/Ubuntu.
# Idempotent: installs only missing packages. Needs root (or sudo) for apt-get.
set -euo pipefail

PKGS="build-essential pkg-config clang libclang-dev libibverbs-dev librdmacm-dev
      ibverbs-providers iproute2 iperf3 procps systemd libhwloc-dev libudev-dev"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "deps: installing$missing" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 $missing >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  # Debian's own cargo may be too old for the locked dependencies; try it anyway and
  # say so if the build then fails.
  echo "deps: no cargo found; installing Debian's cargo (needs Rust >= 1.88, the workspace MSRV)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends cargo rustc >/dev/null
fi
[ -e /dev/kvm ] || echo "deps: warning: /dev/kvm is missing; the KVM tests will fail" >&2
exit 0
