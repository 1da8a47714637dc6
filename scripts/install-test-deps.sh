#!/bin/sh
# Installs what the tests need on a fresh Debian 12 machine (idempotent).
#  - dpdk-dev: dpdk-testpmd, the real vhost-user frontend (virtio-user) the interop tests use.
set -eu
need=""
command -v dpdk-testpmd >/dev/null 2>&1 || need="$need dpdk dpdk-dev"
if [ -n "$need" ]; then
    echo "installing:$need" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends $need >/dev/null; then
        apt-get update >/dev/null
        apt-get install -y --no-install-recommends $need >/dev/null
    fi
fi
command -v dpdk-testpmd >/dev/null 2>&1 || { echo "dpdk-testpmd still missing after install" >&2; exit 1; }
