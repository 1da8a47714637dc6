#!/bin/bash
# Packet rate of this switch against DPDK's own vhost backend (testpmd, two net_vhost ports,
# io forwarding), both driven by the same generator: DPDK virtio-user in testpmd flowgen mode,
# two ports, bidirectional. Backend pinned to BACKEND_CPU, generator to GEN_CPU. Reps alternate
# DPDK and ours; prints each rep and the median aggregate Mpps, ticks/packet and the ratio.
#
# usage: scripts/bench-vs-dpdk.sh [REPS=3] [DUR=10] [SIZES="64 1518"]
# env:   BACKEND_CPU=0 GEN_CPU=1 WARMUP=2 HUGE=1 (0: --no-huge, 4 KiB pages) OUT=/tmp/vswitch-bench
#        GEN_EXTRA="..." extra testpmd options for the generator, the same for both backends
#        (e.g. --mbcache=512: see the README's performance section for why it matters)
#        SWITCH_EXTRA="..." extra options for this switch (e.g. --batch-wait-us 10)
#        VDEV_EXTRA=",..." extra virtio-user options for both generator ports, the same for both
#        backends (e.g. ",packed_vq=1" for packed rings, ",in_order=0")
# needs: dpdk-testpmd (scripts/install-test-deps.sh), root for hugepages.
set -u
REPS=${1:-3}; DUR=${2:-10}; SIZES=${3:-"64 1518"}
BACKEND_CPU=${BACKEND_CPU:-0}; GEN_CPU=${GEN_CPU:-1}; WARMUP=${WARMUP:-2}; HUGE=${HUGE:-1}
OUT=${OUT:-/tmp/vswitch-bench}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VSWITCH=${VSWITCH:-$ROOT/target/release/vswitch}
die() { echo "bench: $*" >&2; exit 1; }
command -v dpdk-testpmd >/dev/null || die "dpdk-testpmd missing: run scripts/install-test-deps.sh"
[ -x "$VSWITCH" ] || (cd "$ROOT" && cargo build --release -p vswitch >/dev/null 2>&1) || die "cannot build vswitch"
mkdir -p "$OUT"

if [ "$HUGE" = 1 ]; then
    free=$(awk '/HugePages_Free/ {print $2}' /proc/meminfo)
    if [ "${free:-0}" -lt 512 ]; then
        total=$(awk '/HugePages_Total/ {print $2}' /proc/meminfo)
        echo $((total + 1024)) > /proc/sys/vm/nr_hugepages || die "cannot reserve hugepages (HUGE=0 avoids them)"
    fi
    mount | grep -q 'type hugetlbfs' || { mkdir -p /dev/hugepages; mount -t hugetlbfs nodev /dev/hugepages; }
    GEN_MEM="--single-file-segments"; BACK_MEM="--huge-unlink"
else
    GEN_MEM="--no-huge -m 1024 --single-file-segments"; BACK_MEM="--no-huge -m 1024"
fi

wait_sock() { for _ in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done; return 1; }

# generator SOCK0 SOCK1 SIZE -> sets GEN_MPPS (mean Rx-pps summed over both ports, after warm-up)
generator() {
    local log=$OUT/gen.log
    timeout -s INT $((WARMUP + DUR + 30)) dpdk-testpmd --lcores "0@$GEN_CPU,1@$GEN_CPU" --main-lcore 0 --no-pci \
        --file-prefix=vsb-gen $GEN_MEM \
        --vdev "net_virtio_user0,path=$1,queues=1${VDEV_EXTRA:-}" --vdev "net_virtio_user1,path=$2,queues=1${VDEV_EXTRA:-}" \
        -- --forward-mode=flowgen --nb-cores=1 --auto-start --stats-period 1 --txpkts="$3" --burst=32 ${GEN_EXTRA:-} \
        > "$log" 2>&1 &
    local g=$!
    for _ in $(seq 1 300); do grep -q Rx-pps "$log" 2>/dev/null && break; sleep 0.1; done
    sleep $((WARMUP + DUR)); sleep 1.2
    kill -INT "$g" 2>/dev/null; wait "$g" 2>/dev/null
    rm -rf /var/run/dpdk/vsb-gen /dev/hugepages/vsb-genmap_* 2>/dev/null
    GEN_MPPS=$(awk -v skip="$WARMUP" -v n="$DUR" '
        /NIC statistics for port/ { port=$(NF-1) }
        /Rx-pps:/ { c[port]++; if (c[port] > skip && c[port] <= skip+n) { s[port]+=$2; k[port]++ } }
        END { printf "%.3f", (k[0] ? s[0]/k[0] : 0)/1e6 + (k[1] ? s[1]/k[1] : 0)/1e6 }' "$log")
}

run_dpdk() { # SIZE -> MPPS TICKS
    rm -f "$OUT"/vh0.sock "$OUT"/vh1.sock
    timeout -s INT $((WARMUP + DUR + 60)) dpdk-testpmd --lcores "0@$BACKEND_CPU,1@$BACKEND_CPU" --main-lcore 0 \
        --no-pci --file-prefix=vsb-back $BACK_MEM \
        --vdev "net_vhost0,iface=$OUT/vh0.sock,queues=1" --vdev "net_vhost1,iface=$OUT/vh1.sock,queues=1" \
        -- --forward-mode=io --nb-cores=1 --auto-start --stats-period 1 --record-core-cycles \
        > "$OUT/dpdk.log" 2>&1 &
    local b=$!
    wait_sock "$OUT/vh1.sock" || die "DPDK backend did not start; see $OUT/dpdk.log"
    generator "$OUT/vh0.sock" "$OUT/vh1.sock" "$1"
    kill -INT $(pgrep -P $b) 2>/dev/null; wait $b 2>/dev/null
    rm -rf /var/run/dpdk/vsb-back /dev/hugepages/vsb-backmap_* 2>/dev/null
    MPPS=$GEN_MPPS
    TICKS=$(grep -m1 'CPU cycles/packet' "$OUT/dpdk.log" | sed -E 's/.*cycles\/packet=([0-9.]+).*/\1/')
}

run_ours() { # SIZE -> MPPS TICKS
    rm -f "$OUT"/vs0.sock "$OUT"/vs1.sock "$OUT"/vs.ctl
    # The generator's memory (virtio-user: unsealed memfds, or hugetlbfs) can lose pages:
    # the switch maps it only under the SIGBUS guard.
    # Packed rings are offered only on ports that say so.
    local opts=""
    [[ "${VDEV_EXTRA:-}" == *packed_vq=1* ]] && opts=",packed=on"
    "$VSWITCH" run --port p0="$OUT/vs0.sock$opts" --port p1="$OUT/vs1.sock$opts" --pmd-cores "$BACKEND_CPU" --busy-poll \
        --unsealed-memory guard --control "$OUT/vs.ctl" ${SWITCH_EXTRA:-} > "$OUT/vswitch.log" 2>&1 &
    local v=$!
    wait_sock "$OUT/vs1.sock" || die "vswitch did not start; see $OUT/vswitch.log"
    local before after
    before=$("$VSWITCH" ctl --json --control "$OUT/vs.ctl" stats)
    generator "$OUT/vs0.sock" "$OUT/vs1.sock" "$1"
    after=$("$VSWITCH" ctl --json --control "$OUT/vs.ctl" stats)
    kill -INT $v; wait $v 2>/dev/null
    MPPS=$GEN_MPPS
    TICKS=$(python3 -c "import json,sys; a=json.loads(sys.argv[1])['pmds'][0]; print('%.1f' % a['ticks_per_packet'])" "$after")
}

median() { sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }

echo "# $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) | $(nproc) CPUs | kernel $(uname -r) | $(dpdk-testpmd --version 2>/dev/null | head -1)"
echo "# backend CPU $BACKEND_CPU, generator CPU $GEN_CPU, ${DUR}s per rep after ${WARMUP}s warm-up, hugepages=$HUGE${VDEV_EXTRA:+, virtio-user options: $VDEV_EXTRA}${GEN_EXTRA:+, generator options: $GEN_EXTRA}${SWITCH_EXTRA:+, switch options: $SWITCH_EXTRA}"
for size in $SIZES; do
    d=(); o=(); dt=(); ot=()
    for r in $(seq 1 "$REPS"); do
        run_dpdk "$size"; d+=("$MPPS"); dt+=("$TICKS")
        echo "size=$size rep=$r dpdk  ${MPPS} Mpps ${TICKS} cycles/pkt"
        run_ours "$size"; o+=("$MPPS"); ot+=("$TICKS")
        echo "size=$size rep=$r ours  ${MPPS} Mpps ${TICKS} ticks/pkt"
    done
    md=$(printf '%s\n' "${d[@]}" | median); mo=$(printf '%s\n' "${o[@]}" | median)
    mdt=$(printf '%s\n' "${dt[@]}" | median); mot=$(printf '%s\n' "${ot[@]}" | median)
    echo "SUMMARY size=$size dpdk_median=${md}Mpps (${mdt} cyc/pkt) ours_median=${mo}Mpps (${mot} ticks/pkt) ratio=$(awk -v a="$mo" -v b="$md" 'BEGIN{printf "%.2f", (b>0)?a/b:0}')"
done
