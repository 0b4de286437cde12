#!/usr/bin/env bash
# Emulated multi-node cluster on one Linux host: hierarchical vs flat all-to-all over shaped "NIC" links.
#
# Every node is a network namespace running RANKS_PER_NODE gloo ranks (torchrun, one per node). Ranks of one
# node talk over the namespace's loopback (the "NVLink"); nodes talk over veth links shaped with tc (the
# "NICs"): RAILS links per node, one per local rank by default (rail-optimised, like one NIC per GPU), rail r
# of every node joined by a bridge in a separate "switch" namespace. Each link is shaped in both directions
# to RATE (tbf), plus DELAY of one-way latency when the kernel has netem. The benchmark
# (python -m piper_ds.bench.alltoall) counts the bytes that left through the node links (/proc/net/dev tx
# of r*, per namespace) next to the model's payload bytes, and writes JSON to OUT.
#
# Needs root (network namespaces), iproute2 (ip, tc) and this repository's Python environment. Everything
# it creates is named $PREFIX* and removed on exit; addresses are 10.231.<rail>.<node+1>/24 inside those
# namespaces only. Bounded: each node's run is killed after TIMEOUT seconds.
#
#   sudo NODES=2 RANKS_PER_NODE=2 RATE=1gbit scripts/emulated_cluster.sh
#   sudo NODES=4 RANKS_PER_NODE=2 RATE=500mbit SIZES=16KB,256KB,4MB OUT=a2a_4x2.json scripts/emulated_cluster.sh
#
# Extra arguments go to the benchmark (e.g. --planned, --tiers, --uneven).
set -euo pipefail

NODES=${NODES:-2}
RANKS_PER_NODE=${RANKS_PER_NODE:-2}
RAILS=${RAILS:-$RANKS_PER_NODE}
RATE=${RATE:-1gbit}
DELAY=${DELAY:-}
SIZES=${SIZES:-64KB,256KB,1MB,4MB,16MB}
HIDDEN=${HIDDEN:-1024}
ITERS=${ITERS:-5}
WARMUP=${WARMUP:-1}
TIMEOUT=${TIMEOUT:-900}
PREFIX=${PREFIX:-pdsemu}
PORT=${PORT:-29533}
OUT=${OUT:-$PWD/emulated_cluster.json}
LOGDIR=${LOGDIR:-$(mktemp -d /tmp/${PREFIX}.XXXXXX)}
mkdir -p "$LOGDIR"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python}

die() { echo "emulated_cluster: $*" >&2; exit 2; }
[[ $(id -u) == 0 ]] || die "needs root (network namespaces); run with sudo"
command -v ip >/dev/null && command -v tc >/dev/null || die "needs iproute2 (ip, tc): apt-get install -y iproute2"
(( NODES >= 2 && RANKS_PER_NODE >= 1 )) || die "NODES ($NODES) must be >= 2 and RANKS_PER_NODE ($RANKS_PER_NODE) >= 1"
[[ $RAILS == 1 || $RAILS == "$RANKS_PER_NODE" ]] || die "RAILS ($RAILS) must be 1 or RANKS_PER_NODE ($RANKS_PER_NODE)"
(( NODES <= 250 && RAILS <= 250 )) || die "at most 250 nodes and rails (addresses 10.231.<rail>.<node+1>)"
if ip netns list | grep -q "^${PREFIX}_"; then die "namespaces ${PREFIX}_* exist already (another run?); remove them first"; fi

SW=${PREFIX}_sw
node_ns() { echo "${PREFIX}_n$1"; }

cleanup() {
    for pid in "${PIDS[@]:-}"; do [[ -n $pid ]] && kill "$pid" 2>/dev/null || true; done
    for ((n = 0; n < NODES; n++)); do ip netns del "$(node_ns $n)" 2>/dev/null || true; done
    ip netns del "$SW" 2>/dev/null || true
}
PIDS=()
trap cleanup EXIT INT TERM

# one direction of a link: tbf for the rate, netem in front for the latency when the kernel has it
SHAPING="tbf rate $RATE"
shape() {  # shape <namespace> <device>
    if [[ -n $DELAY ]] && ip netns exec "$1" tc qdisc add dev "$2" root handle 1: netem delay "$DELAY" 2>/dev/null; then
        ip netns exec "$1" tc qdisc add dev "$2" parent 1:1 handle 10: tbf rate "$RATE" burst 256kb latency 100ms
        SHAPING="netem delay $DELAY + tbf rate $RATE"
    else
        [[ -z $DELAY ]] || echo "emulated_cluster: netem is not available in this kernel: DELAY ignored" >&2
        DELAY=
        ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst 256kb latency 100ms
    fi
}

ip netns add "$SW"
ip -n "$SW" link set lo up
for ((r = 0; r < RAILS; r++)); do
    ip -n "$SW" link add "br$r" type bridge
    ip -n "$SW" link set "br$r" up
done
for ((n = 0; n < NODES; n++)); do
    ns=$(node_ns $n)
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
    for ((r = 0; r < RAILS; r++)); do
        a="${PREFIX}${n}s${r}" b="${PREFIX}${n}n${r}"
        ip link add "$a" type veth peer name "$b"
        ip link set "$a" netns "$SW"
        ip link set "$b" netns "$ns"
        ip -n "$ns" link set "$b" name "r$r"
        ip -n "$ns" addr add "10.231.$r.$((n + 1))/24" dev "r$r"
        ip -n "$ns" link set "r$r" up
        ip -n "$SW" link set "$a" master "br$r" up
        shape "$ns" "r$r"   # node -> switch: the NIC's transmit side
        shape "$SW" "$a"    # switch -> node: the NIC's receive side
    done
done
# rp_filter off inside the node namespaces: a rank bound to rail i may send to rail j's subnet (asymmetric)

IFACE="r{local_rank}"
[[ $RAILS == 1 ]] && IFACE="r0"
echo "emulated cluster: $NODES nodes x $RANKS_PER_NODE ranks, $RAILS link(s) per node, $SHAPING each way; logs in $LOGDIR"
for ((n = 0; n < NODES; n++)); do
    ip netns exec "$(node_ns $n)" timeout --kill-after=30 "$TIMEOUT" env PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" \
        "$PYTHON" -m torch.distributed.run --nnodes "$NODES" --node_rank "$n" --nproc_per_node "$RANKS_PER_NODE" \
        --master_addr 10.231.0.1 --master_port "$PORT" -m piper_ds.bench.alltoall \
        --gpus-per-node "$RANKS_PER_NODE" --count-bytes 'r*' --gloo-iface "$IFACE" --sizes "$SIZES" \
        --hidden "$HIDDEN" --iters "$ITERS" --warmup "$WARMUP" --out "$OUT" "$@" >"$LOGDIR/node$n.log" 2>&1 &
    PIDS+=($!)
done
status=0
for pid in "${PIDS[@]}"; do wait "$pid" || status=$?; done
PIDS=()
grep -v -e "WARNING\]" -e "^W[0-9]" -e "^\*\*\*" "$LOGDIR/node0.log" | tail -n 25
(( status == 0 )) || die "a node's run failed (exit $status): see $LOGDIR/node*.log"
echo "results: $OUT"
