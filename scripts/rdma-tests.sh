#!/bin/bash
# scripts/rdma-tests.sh - run ferry-verbs' tests against a real RDMA device.
#
# 1. Builds the ferry-verbs test binaries and the end-to-end RDMA migration test
#    (with the ferry and workload VMM binaries it starts) on the HOST (release, --locked):
#    the guest is TCG-emulated and ~50x slower, so nothing is compiled there.
# 2. Boots the SoftRoCE guest (scripts/rxe-vm.sh: rxe0 on lo, repo shared at the
#    same path) and runs every test binary there with FERRY_REQUIRE_RDMA=1,
#    so a missing device is a failure, never a skip.
# Prints each test's name and libtest's `test result:` lines, the wall time
# of each phase, and exits non-zero if any test (or the guest) failed.
#
# Usage: scripts/rdma-tests.sh [extra libtest args, e.g. a test name filter]
# Env:   FERRY_RXE_CACHE, FERRY_RXE_TIMEOUT (see scripts/rxe-vm.sh).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT"
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
T_ALL=$(now)

# --- 1. host build ----------------------------------------------------------
T_BUILD=$(now)
JSON=$(mktemp)
trap 'rm -f "$JSON"' EXIT
cargo test --release --locked -p ferry-verbs -p ferry-ch --no-run --message-format=json-render-diagnostics > "$JSON"
# The end-to-end RDMA migration test starts the real binaries: build them too.
cargo build --release --locked -p ferry-sidecar -p ferry-workload-vmm --features ferry-sidecar/fault-injection
cargo test --release --locked -p ferry-tests --test rdma_migration --no-run \
  --message-format=json-render-diagnostics >> "$JSON"
# Test executables (profile.test) only: the fault-matrix binary also has an "executable". Keep paths under the shared repo.
mapfile -t EXES < <(grep '"reason":"compiler-artifact"' "$JSON" | grep '"profile":{[^}]*"test":true' |
  grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//' | sort -u)
[ ${#EXES[@]} -gt 0 ] || { echo "rdma-tests: no test executables built" >&2; exit 1; }
for e in "${EXES[@]}"; do
  case "$e" in "$ROOT"/*) ;; *) echo "rdma-tests: $e is outside the shared repo $ROOT" >&2; exit 1 ;; esac
done
BUILD_S=$(elapsed "$T_BUILD")
echo "rdma-tests: host build ${BUILD_S}s; test binaries: ${EXES[*]#"$ROOT"/}"

# --- 2. run them in the guest -----------------------------------------------
# The guest script fails if rxe0 is missing, runs every binary (all of them,
# even after a failure) and exits with the number of failed binaries.
GUEST_SCRIPT='
set -u
[ -e /sys/class/infiniband/rxe0 ] || { echo "rdma-tests: no rxe0 in the guest"; exit 100; }
export FERRY_REQUIRE_RDMA=1 RUST_BACKTRACE=1
failed=0
for exe in "$@"; do
  [ -x "$exe" ] || { echo "rdma-tests: $exe missing in the guest"; failed=$((failed + 1)); continue; }
  echo "=== ${exe##*/} ==="
  t0=$(cut -d" " -f1 /proc/uptime)
  "$exe" --test-threads=1 --include-ignored $EXTRA_ARGS || failed=$((failed + 1))
  echo "=== ${exe##*/}: $(awk -v a="$t0" -v b="$(cut -d" " -f1 /proc/uptime)" "BEGIN { printf \"%.1f\", b - a }")s guest time ==="
done
exit $failed
'
T_GUEST=$(now)
set +e
"$ROOT/scripts/rxe-vm.sh" --share "$ROOT" --timeout "${FERRY_RXE_TIMEOUT:-600}" -- \
  bash -c "export EXTRA_ARGS='$*'; $GUEST_SCRIPT" rdma-tests "${EXES[@]}"
RC=$?
set -e
GUEST_S=$(elapsed "$T_GUEST")
echo "rdma-tests: host build ${BUILD_S}s, guest (boot + tests) ${GUEST_S}s, total $(elapsed "$T_ALL")s"
if [ $RC -ne 0 ]; then
  echo "rdma-tests: FAILED (status $RC)" >&2
  exit $RC
fi
echo "rdma-tests: all RDMA tests passed"
