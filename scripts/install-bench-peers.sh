#!/bin/sh
# Installs the optional peers `vswitch-bench` compares the switch against (idempotent, quiet
# when everything is already there; Debian 12, as root):
#  - dpdk-dev: dpdk-testpmd, DPDK's own vhost backend (via scripts/install-test-deps.sh).
#  - openvswitch-switch-dpdk: ovs-vswitchd built against DPDK, selected with
#    update-alternatives as the ovs-vswitchd on PATH.
# No OVS service is left running: the benchmark starts a private ovsdb-server and
# ovs-vswitchd of its own, and a packaged one would compete for CPU and hugepages.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
OVS_DPDK=/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk
export DEBIAN_FRONTEND=noninteractive

die() { echo "install-bench-peers: $*" >&2; exit 1; }
ovs_is_dpdk() { ovs-vswitchd --version 2>/dev/null | grep -q DPDK; }
# PIDs of running packaged OVS daemons (pid files in the system run directory).
ovs_daemons() {
    for d in ovs-vswitchd ovsdb-server; do
        pid=$(cat "/var/run/openvswitch/$d.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
    done
}

[ "$(id -u)" = 0 ] || die "must run as root (apt-get install, update-alternatives)"

# DPDK (testpmd) first: the test-dependency script knows how.
"$HERE/install-test-deps.sh"

if [ ! -x "$OVS_DPDK" ]; then
    echo "installing: openvswitch-switch-dpdk" >&2
    before=$(ovs_daemons)
    # Forbid service starts during the install (no systemd here; invoke-rc.d asks
    # policy-rc.d, and exit code 101 means "action forbidden").
    created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    rc=0
    if ! apt-get install -y --no-install-recommends openvswitch-switch-dpdk >/dev/null 2>&1; then
        apt-get update >/dev/null 2>&1 || true
        apt-get install -y --no-install-recommends openvswitch-switch-dpdk >/dev/null || rc=$?
    fi
    if [ -n "$created_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ "$rc" = 0 ] || die "apt-get install openvswitch-switch-dpdk failed (exit $rc)"
    [ -x "$OVS_DPDK" ] || die "$OVS_DPDK missing after installing openvswitch-switch-dpdk"
    # Should a service script have started OVS anyway, stop what the install started.
    for pid in $(ovs_daemons); do
        case " $before " in
            *" $pid "*) ;;
            *) echo "stopping OVS daemon pid $pid started by the package install" >&2
               kill "$pid" 2>/dev/null || true ;;
        esac
    done
fi

if ! ovs_is_dpdk; then
    update-alternatives --set ovs-vswitchd "$OVS_DPDK" >/dev/null \
        || die "update-alternatives --set ovs-vswitchd $OVS_DPDK failed"
    ovs_is_dpdk || die "ovs-vswitchd on PATH ($(command -v ovs-vswitchd)) is still not the DPDK build"
fi

for pid in $(ovs_daemons); do
    echo "warning: a system OVS daemon (pid $pid) is running; benchmarks will share the CPUs with it" >&2
done
exit 0
