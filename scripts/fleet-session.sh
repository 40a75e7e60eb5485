#!/usr/bin/env bash
# scripts/fleet-session.sh - a recorded operator session: limits, the queue, a drain,
# status, a live bandwidth change and a cancel, on two hosts (network namespaces).
#
# Host A (10.79.0.1) runs four VMs (workload VMM: memfd RAM dirtied by writer threads)
# next to a sidecar allowing 2 outgoing migrations and 200 MiB/s in all; host B
# (10.79.0.2) allows 2 incoming. The session migrates vm1 alone, then drains the rest
# while showing `ferry status`, changes a cap, cancels one, and prints the metrics.
# Every command is printed with a `$` before its output: docs/fleet-session.md is this
# script's output. Needs root. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "fleet-session: run as root (it creates network namespaces)" >&2; exit 2; }
scripts/deps.sh >&2
cargo build --release --locked -q -p ferry-sidecar -p ferry-workload-vmm >&2
B=$PWD/target/release

NA=ferry-fleet-a NB=ferry-fleet-b
D=$(mktemp -d /tmp/ferry-fleet.XXXXXX)
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
ip link add ffleet-a netns $NA type veth peer name ffleet-b netns $NB
ip -n $NA addr add 10.79.0.1/24 dev ffleet-a; ip -n $NA link set ffleet-a up
ip -n $NB addr add 10.79.0.2/24 dev ffleet-b; ip -n $NB link set ffleet-b up

"$B/ferry" cert ca --out "$D/ca" >/dev/null
"$B/ferry" cert host --ca "$D/ca" --name a --san 10.79.0.1 --out "$D/certs" >/dev/null
"$B/ferry" cert host --ca "$D/ca" --name b --san 10.79.0.2 --out "$D/certs" >/dev/null
cat >"$D/a.toml" <<EOF
socket = "$D/a.sock"
listen = "10.79.0.1:7780"
state_dir = "$D/state-a"
max_outgoing = 2
max_bandwidth_mibps = 200
metrics = "127.0.0.1:9477"
[tls]
ca = "$D/ca/ca.pem"
cert = "$D/certs/a.pem"
key = "$D/certs/a-key.pem"
EOF
cat >"$D/b.toml" <<EOF
socket = "$D/b.sock"
listen = "10.79.0.2:7780"
state_dir = "$D/state-b"
max_incoming = 2
[tls]
ca = "$D/ca/ca.pem"
cert = "$D/certs/b.pem"
key = "$D/certs/b-key.pem"
EOF
ip netns exec $NA "$B/ferry" serve --config "$D/a.toml" 2>"$D/sidecar-a.log" & PIDS+=($!)
ip netns exec $NB "$B/ferry" serve --config "$D/b.toml" 2>"$D/sidecar-b.log" & PIDS+=($!)
for side in a b; do for _ in $(seq 100); do [ -S "$D/$side.sock" ] && break; sleep 0.1; done; done
for vm in vm1 vm2 vm3 vm4; do
  ip netns exec $NA "$B/ferry-workload-vmm" --socket "$D/a.sock" --vm-id $vm --mem-mib 512 \
    --rate-mib 8 --status-file "$D/$vm-a.json" --max-runtime-s 600 2>"$D/vmm-a-$vm.log" & PIDS+=($!)
  ip netns exec $NB "$B/ferry-workload-vmm" --socket "$D/b.sock" --vm-id $vm --incoming \
    --status-file "$D/$vm-b.json" --max-runtime-s 600 2>"$D/vmm-b-$vm.log" & PIDS+=($!)
done
for _ in $(seq 300); do
  n=$("$B/ferry" status --json --socket "$D/a.sock" 2>/dev/null | grep -o '"ram_bytes"' | wc -l || true)
  [ "$n" = 4 ] && break; sleep 0.2
done

# `run HOST CMD...`: print the command as the operator typed it (socket flag left out),
# then run it in that host's namespace with its output.
run() {
  local host=$1; shift
  echo "host-$host\$ ferry $*"
  local ns=$NA; [ "$host" = b ] && ns=$NB
  ip netns exec $ns "$B/ferry" "$@" --socket "$D/$host.sock" 2>&1 || echo "(exit $?)"
  echo
}

run a status
run a migrate vm1 --to 10.79.0.2:7780 --max-bandwidth 150
run a drain --to 10.79.0.2:7780 --priority low >"$D/drain.out" &
DRAIN=$!
sleep 2
run a status
run b status
run a set-bandwidth vm3 60
sleep 1
run a status --json >"$D/status.json"; head -c 1200 "$D/status.json"; echo ' ...'; echo
run a cancel vm4
wait $DRAIN || true
cat "$D/drain.out"
run a status
echo "host-a\$ curl -s 127.0.0.1:9477/metrics | grep -v '^#' | grep -E 'migrations_total|bytes_total|queue|running|downtime_seconds_(sum|count)'"
ip netns exec $NA bash -c 'exec 3<>/dev/tcp/127.0.0.1/9477; printf "GET /metrics HTTP/1.0\r\n\r\n" >&3; cat <&3' \
  | grep -v '^#' | grep -E 'migrations_total|bytes_total|queue|running|downtime_seconds_(sum|count)'
