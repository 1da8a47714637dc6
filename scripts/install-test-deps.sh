#!/bin/sh
# Installs what the tests need on a fresh Debian 12 machine (idempotent).
#  - dpdk-dev: dpdk-testpmd, the real vhost-user frontend (virtio-user) the interop tests use.
#  - lz4: unpacks the guest kernel for PVH boot (faster under TCG).
#  - acpica-tools: iasl, the reference decoder hostvm's ACPI tables are checked against.
#  - iproute2, iputils-ping, iperf3, tcpdump: the TAP uplink tests put test hosts in network
#    namespaces, ping and stream through the switch, and look at tags on the wire.
#  - tshark: the tunnel tests have Wireshark's dissectors decode the switch's VXLAN and Geneve.
#  - ethtool: the tunnel tests turn checksum offload off on a namespace's veth (a veth hands the
#    switch's UDP socket inner checksums nobody computed otherwise).
#  - strace: vfpolicy's test captures what `ip link set DEV vf N ...` sends, to compare bytes.
#  - the Linux test guest and QEMU 7.2 (tests/guest/build.sh: Debian packages downloaded and
#    unpacked, not installed; cached in /var/tmp/vswitch-guestkit).
#  - the SR-IOV guest: QEMU 10 with an emulated igb, Debian's generic kernel and iproute2
#    (tests/guest/igb-sriov.sh --build-only; cached in /var/tmp/vswitch-igbkit).
set -eu
cd "$(dirname "$0")/.."
need=""
command -v dpdk-testpmd >/dev/null 2>&1 || need="$need dpdk dpdk-dev"
command -v lz4 >/dev/null 2>&1 || need="$need lz4"
command -v iasl >/dev/null 2>&1 || need="$need acpica-tools"
command -v ip >/dev/null 2>&1 || need="$need iproute2"
command -v ping >/dev/null 2>&1 || need="$need iputils-ping"
command -v iperf3 >/dev/null 2>&1 || need="$need iperf3"
command -v tcpdump >/dev/null 2>&1 || need="$need tcpdump"
command -v tshark >/dev/null 2>&1 || need="$need tshark"
command -v strace >/dev/null 2>&1 || need="$need strace"
command -v ethtool >/dev/null 2>&1 || need="$need ethtool"
if [ -n "$need" ]; then
    echo "installing:$need" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends $need >/dev/null; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends $need >/dev/null
    fi
fi
command -v dpdk-testpmd >/dev/null 2>&1 || { echo "dpdk-testpmd still missing after install" >&2; exit 1; }
if ! tests/guest/build.sh >/dev/null; then
    echo "guest kit: retrying after apt-get update" >&2
    apt-get update >/dev/null
    tests/guest/build.sh >/dev/null
fi
if ! tests/guest/igb-sriov.sh --build-only >/dev/null; then
    echo "igb kit: retrying after apt-get update" >&2
    apt-get update >/dev/null
    tests/guest/igb-sriov.sh --build-only >/dev/null
fi
