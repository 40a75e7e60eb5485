#!/usr/bin/env bash
# scripts/test.sh - Ferry's whole test suite, as CI runs it.
#
#  1. installs build dependencies (scripts/deps.sh)
#  2. builds the workspace once (release: binaries, tests, benches)
#  3. checks formatting, clippy -D warnings and rustdoc -D warnings
#  4. runs every test on the host: unit tests, /dev/kvm tests, end-to-end tests
#     (real sidecars and VMMs in network namespaces)
#  5. runs the Cloud Hypervisor tests when it finds CH (FERRY_CH_BIN, PATH, or
#     ../shared/vmm/cloud-hypervisor/bin): without CH they stay listed as ignored
#  6. runs the RDMA tests inside a SoftRoCE guest (scripts/rdma-tests.sh), reusing the
#     host's build over 9p
#  7. fuzzes every decoder target for a bounded slice (scripts/fuzz.sh, FERRY_FUZZ_RUNS
#     executions each, 200000 by default)
# Ends with one line "tests: N passed, N failed" summing every libtest result.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
step() { printf '\n==== %s (%s)\n' "$1" "$(date +%T)"; }
fail=0

step "dependencies"
scripts/deps.sh || exit 1

FEATURES="--features ferry-sidecar/fault-injection"

step "build"
cargo build --release --locked --workspace --all-targets $FEATURES || exit 1

step "lints"
cargo fmt --all -- --check || { echo "lint: cargo fmt found unformatted code"; fail=1; }
(cd fuzz && cargo fmt --all -- --check) || { echo "lint: cargo fmt found unformatted fuzz targets"; fail=1; }
cargo clippy --release --locked --workspace --all-targets $FEATURES -- -D warnings || fail=1
RUSTDOCFLAGS="-D warnings" cargo doc --release --locked --workspace --no-deps -q || fail=1

step "host tests (unit, KVM, end-to-end)"
cargo test --release --locked --workspace $FEATURES 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || fail=1

step "Cloud Hypervisor tests"
CH_BIN=${FERRY_CH_BIN:-$(command -v cloud-hypervisor || true)}
[ -n "$CH_BIN" ] || { [ -x "$ROOT/../shared/vmm/cloud-hypervisor/bin/cloud-hypervisor" ] && CH_BIN=$ROOT/../shared/vmm/cloud-hypervisor/bin/cloud-hypervisor; }
if [ -n "$CH_BIN" ]; then
  echo "Cloud Hypervisor: $CH_BIN ($("$CH_BIN" --version 2>/dev/null | head -n 1))"
  FERRY_CH_BIN=$CH_BIN cargo test --release --locked --workspace $FEATURES --test ch_migration -- --ignored 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || fail=1
else
  echo "Cloud Hypervisor not found (FERRY_CH_BIN, PATH, ../shared/vmm/cloud-hypervisor/bin): its tests stay ignored"
fi

step "RDMA tests in the SoftRoCE guest"
scripts/rdma-tests.sh 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || fail=1

step "fuzzing: a bounded slice of every decoder target"
scripts/fuzz.sh --runs "${FERRY_FUZZ_RUNS:-200000}" || { echo "fuzz: a target crashed or failed to build"; fail=1; }

passed=$(grep -a -o 'test result: [A-Za-z]*\. [0-9]* passed; [0-9]* failed' "$LOG" | awk '{s+=$4} END {print s+0}')
failed=$(grep -a -o 'test result: [A-Za-z]*\. [0-9]* passed; [0-9]* failed' "$LOG" | awk '{s+=$6} END {print s+0}')
[ "$failed" = 0 ] || fail=1
echo
echo "tests: $passed passed, $failed failed"
exit $fail
