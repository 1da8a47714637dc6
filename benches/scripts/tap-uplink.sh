#!/bin/bash
# TAP uplink benchmark: two network namespaces, each behind a TAP port of the switch under test,
# talk through it: iperf3 TCP both ways (TSO on) and UDP with 64-byte frames. Peers, alternated
# rep by rep in one run: `ours` (this switch) and `ovs` (Open vSwitch's userspace datapath with
# `type=tap` ports, the DPDK build installed by scripts/install-bench-peers.sh).
#
#   benches/scripts/tap-uplink.sh [REPS] [VSWITCH_BINARY]      (root; prints one line per run)
#
# Ours runs in its default adaptive mode (OURS_OPTS=--busy-poll to change that), pinned to CPU
# 0 as ovs-vswitchd is; on a 2-CPU machine the iperf3 ends and both kernels share the other.
#
# OVS runs with its defaults (userspace TSO off); OVS_TSO=1 turns its userspace TSO on.
#
# Figures: Gbit/s of TCP received, Mpps of 64-byte UDP frames received, and the switch's CPU
# time over the run (user+system, % of one CPU), so a peer that burns a core shows it.
set -eu
REPS=${1:-3}
VSW=${2:-target/release/vswitch}
SECS=${SECS:-4}
T=$(mktemp -d /tmp/tapbench.XXXXXX)
NSA=tapb-a-$$ NSB=tapb-b-$$ IFA=tbA$$ IFB=tbB$$
IFA=${IFA:0:15} IFB=${IFB:0:15}
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
    PIDS=()
    ip netns del "$NSA" 2>/dev/null || true
    ip netns del "$NSB" 2>/dev/null || true
    ip link del "$IFA" 2>/dev/null || true
    ip link del "$IFB" 2>/dev/null || true
}
trap 'cleanup; rm -rf "$T"' EXIT

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

hosts() {
    ip netns add "$NSA"; ip netns add "$NSB"
    for i in 1 2 3 4 5 6 7 8 9 10; do ip link show "$IFA" >/dev/null 2>&1 && ip link show "$IFB" >/dev/null 2>&1 && break; sleep 0.2; done
    ip link set "$IFA" netns "$NSA"; ip link set "$IFB" netns "$NSB"
    ip -n "$NSA" addr add 10.99.0.1/24 dev "$IFA"; ip -n "$NSA" link set "$IFA" up
    ip -n "$NSB" addr add 10.99.0.2/24 dev "$IFB"; ip -n "$NSB" link set "$IFB" up
    ip -n "$NSA" link set lo up; ip -n "$NSB" link set lo up
    ip netns exec "$NSA" ping -c 3 -i 0.2 -W 2 10.99.0.2 >/dev/null
}

start_ours() {
    "$VSW" run --port "a=tap:$IFA" --port "b=tap:$IFB" --pmd-cores 0 ${OURS_OPTS:-} \
        --control "$T/ctl.sock" >"$T/ours.log" 2>&1 &
    SW=$!; PIDS+=("$SW")
}

start_ovs() {
    local r=$T/ovs; rm -rf "$r"; mkdir -p "$r"
    export OVS_RUNDIR=$r OVS_LOGDIR=$r OVS_DBDIR=$r OVS_SYSCONFDIR=$r
    ovsdb-tool create "$r/conf.db" /usr/share/openvswitch/vswitch.ovsschema
    ovsdb-server "$r/conf.db" --remote="punix:$r/db.sock" --pidfile="$r/db.pid" --log-file="$r/db.log" \
        --unixctl="$r/db.ctl" >/dev/null 2>&1 &
    PIDS+=("$!")
    sleep 0.5
    ovs-vsctl --db="unix:$r/db.sock" --no-wait init
    # OVS_TSO=1: Open vSwitch's userspace TSO (off by default in 3.1), so its tap ports pass
    # TCP frames of up to 64 KiB as ours do.
    if [ "${OVS_TSO:-0}" = 1 ]; then
        ovs-vsctl --db="unix:$r/db.sock" --no-wait set Open_vSwitch . other_config:userspace-tso-enable=true
    fi
    ovs-vswitchd "unix:$r/db.sock" --pidfile="$r/vs.pid" --unixctl="$r/vs.ctl" --log-file="$r/vs.log" \
        >/dev/null 2>&1 &
    SW=$!; PIDS+=("$SW")
    taskset -pc 0 "$SW" >/dev/null
    local v="ovs-vsctl --db=unix:$r/db.sock --timeout=20"
    $v add-br br0 -- set bridge br0 datapath_type=netdev
    $v add-port br0 "$IFA" -- set Interface "$IFA" type=tap
    $v add-port br0 "$IFB" -- set Interface "$IFB" type=tap
}

measure() {
    local peer=$1 rep=$2
    ip netns exec "$NSB" iperf3 -s -D -B 10.99.0.2 --logfile "$T/iperf-s.log"
    sleep 0.3
    local c0; c0=$(cpu_ticks "$SW")
    local j
    j=$(ip netns exec "$NSA" timeout 60 iperf3 -c 10.99.0.2 -t "$SECS" -J)
    local up; up=$(echo "$j" | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))')
    j=$(ip netns exec "$NSA" timeout 60 iperf3 -c 10.99.0.2 -t "$SECS" -R -J)
    local down; down=$(echo "$j" | python3 -c 'import json,sys; print("%.2f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))')
    # 18 bytes of UDP payload: 18 + 8 + 20 + 14 = a 60-byte frame (64 with the FCS).
    j=$(ip netns exec "$NSA" timeout 60 iperf3 -c 10.99.0.2 -t "$SECS" -u -b 0 -l 18 -J)
    local mpps; mpps=$(echo "$j" | python3 -c 'import json,sys; s=json.load(sys.stdin)["end"]["sum"]; print("%.3f (sent %.3f)" % ((s["packets"]-s["lost_packets"])/s["seconds"]/1e6, s["packets"]/s["seconds"]/1e6))')
    local c1; c1=$(cpu_ticks "$SW")
    local hz; hz=$(getconf CLK_TCK)
    local cpu; cpu=$(python3 -c "print('%.0f' % (($c1-$c0)/$hz/(3*$SECS)*100))")
    pkill -f "iperf3 -s -D -B 10.99.0.2" || true
    printf '%-5s rep %d  tcp a->b %6s Gbit/s  b->a %6s Gbit/s  udp64 %6s Mpps  switch cpu %s%%\n' \
        "$peer" "$rep" "$up" "$down" "$mpps" "$cpu"
}

echo "# $(date -u +%FT%TZ) $(lscpu | sed -n 's/^Model name: *//p') | ours=$VSW | ovs=$(ovs-vswitchd --version | head -1)"
for rep in $(seq 1 "$REPS"); do
    for peer in ours ovs; do
        "start_$peer"
        hosts
        measure "$peer" "$rep"
        cleanup
    done
done
