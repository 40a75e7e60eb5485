#!/usr/bin/env bash
# scripts/demo.sh - live-migrate a running VM between two hosts with Ferry.
#
# Two network namespaces stand in for two hosts ("ferry-demo-a" 10.78.0.1 and
# "ferry-demo-b" 10.78.0.2, joined by a veth pair). Each runs a `ferry serve`
# sidecar; host A runs a real KVM guest (64-bit, 2 vCPUs, CPL3 on /dev/kvm) that keeps
# dirtying memory and stamping pages, host B a VMM waiting for it. The sidecars
# authenticate each other with TLS 1.3 certificates from one fleet CA (made with
# `ferry cert`); `ferry migrate` moves the VM over TLS-encrypted TCP with 4 streams,
# shows progress, prints the summary, then the demo shows the guest carrying on at B.
#
# Options: --mem-mib N (1024)  --rate-mib N (64, guest dirtying rate)
#          --streams N (4)     --vmm kvm|workload (kvm; workload = memfd writer threads)
# Needs root (network namespaces). Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
MEM=1024 RATE=64 STREAMS=4 VMM=kvm
while [ $# -gt 0 ]; do
  case "$1" in
    --mem-mib) MEM=$2; shift 2;;
    --rate-mib) RATE=$2; shift 2;;
    --streams) STREAMS=$2; shift 2;;
    --vmm) VMM=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "demo: run as root (it creates network namespaces)" >&2; exit 2; }

scripts/deps.sh
echo "demo: building (release)..." >&2
cargo build --release --locked -q -p ferry-sidecar -p ferry-workload-vmm -p ferry-kvm-vmm
B=$PWD/target/release

NA=ferry-demo-a NB=ferry-demo-b
D=$(mktemp -d /tmp/ferry-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del $NA 2>/dev/null || true
  ip netns del $NB 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
ip netns del $NA 2>/dev/null || true
ip netns del $NB 2>/dev/null || true
ip netns add $NA; ip netns add $NB
ip -n $NA link set lo up; ip -n $NB link set lo up
ip link add fdemo-a netns $NA type veth peer name fdemo-b netns $NB
ip -n $NA addr add 10.78.0.1/24 dev fdemo-a; ip -n $NA link set fdemo-a up
ip -n $NB addr add 10.78.0.2/24 dev fdemo-b; ip -n $NB link set fdemo-b up

"$B/ferry" cert ca --out "$D/ca" >/dev/null
"$B/ferry" cert host --ca "$D/ca" --name a --san 10.78.0.1 --out "$D/certs" >/dev/null
"$B/ferry" cert host --ca "$D/ca" --name b --san 10.78.0.2 --out "$D/certs" >/dev/null
for side in a b; do
  ns=$NA; addr=10.78.0.1; [ $side = b ] && { ns=$NB; addr=10.78.0.2; }
  ip netns exec $ns "$B/ferry" serve --socket "$D/$side.sock" --listen $addr:7780 \
    --tls-ca "$D/ca/ca.pem" --tls-cert "$D/certs/$side.pem" --tls-key "$D/certs/$side-key.pem" \
    --state-dir "$D/state-$side" 2>"$D/sidecar-$side.log" &
  PIDS+=($!)
done
for side in a b; do for _ in $(seq 100); do [ -S "$D/$side.sock" ] && break; sleep 0.1; done; done

if [ "$VMM" = kvm ]; then
  # --rate is pages per second per vCPU: RATE MiB/s over 2 vCPUs.
  ip netns exec $NA "$B/ferry-kvm-vmm" source --sidecar "$D/a.sock" --vm-id vm1 --ram-mib "$MEM" \
    --vcpus 2 --regions 2 --rate $((RATE * 256 / 2)) --ballast \
    --status-file "$D/vm-a.json" --max-runtime-s 900 2>"$D/vmm-a.log" &
  PIDS+=($!)
  ip netns exec $NB "$B/ferry-kvm-vmm" dest --sidecar "$D/b.sock" --vm-id vm1 \
    --status-file "$D/vm-b.json" --max-runtime-s 900 2>"$D/vmm-b.log" &
  PIDS+=($!)
else
  ip netns exec $NA "$B/ferry-workload-vmm" --socket "$D/a.sock" --vm-id vm1 --mem-mib "$MEM" \
    --rate-mib "$RATE" --status-file "$D/vm-a.json" --max-runtime-s 900 2>"$D/vmm-a.log" &
  PIDS+=($!)
  ip netns exec $NB "$B/ferry-workload-vmm" --socket "$D/b.sock" --vm-id vm1 --incoming \
    --status-file "$D/vm-b.json" --max-runtime-s 900 2>"$D/vmm-b.log" &
  PIDS+=($!)
fi
echo "demo: waiting for the VM (${MEM} MiB) to register..." >&2
for _ in $(seq 600); do
  "$B/ferry" status --json --socket "$D/a.sock" 2>/dev/null | grep -q '"vm_id":"vm1"' && break; sleep 0.2
done
"$B/ferry" status --json --socket "$D/a.sock" | grep -q '"vm_id":"vm1"' || { echo "demo: VM did not register"; cat "$D"/*.log; exit 1; }
sleep 1
echo "demo: source guest: $(cat "$D/vm-a.json")"
echo "demo: migrating vm1 from host A (10.78.0.1) to host B (10.78.0.2) over TCP, $STREAMS streams"
rc=0
ip netns exec $NA "$B/ferry" migrate vm1 --to 10.78.0.2:7780 --socket "$D/a.sock" \
  --streams "$STREAMS" --downtime-ms 300 --verify strict || rc=$?
sleep 1
echo "demo: destination guest: $(cat "$D/vm-b.json" 2>/dev/null)"
sleep 1
echo "demo: destination guest one second later: $(cat "$D/vm-b.json" 2>/dev/null)"
echo "demo: source: $(cat "$D/vm-a.json" 2>/dev/null)"
[ $rc = 0 ] || { echo "demo: migration did not commit (exit $rc); logs:"; tail -n 20 "$D"/*.log; }
exit $rc
