#!/usr/bin/env bash
# Installs Open vSwitch (ovsdb-server, ovs-vswitchd, ovs-vsctl, ovsdb-tool) when it is missing, for the qx-net
# integration tests and the ovsdb_ports benchmark. Those start their own daemons in a temp dir; the system service
# is neither needed nor started here (on hosts without systemd the package's init script may print that it was
# not started, which is fine).
#
# Usage (as root, or with sudo available): net/tests/install-ovs.sh
set -euo pipefail

have_ovs() {
    for program in ovsdb-server ovsdb-tool ovs-vswitchd ovs-vsctl; do
        command -v "$program" >/dev/null 2>&1 || [ -x "/usr/sbin/$program" ] || return 1
    done
    [ -f /usr/share/openvswitch/vswitch.ovsschema ]
}

if have_ovs; then
    echo "Open vSwitch is installed: $(ovs-vsctl --version 2>/dev/null | head -n1 || /usr/sbin/ovs-vsctl --version | head -n1)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install-ovs.sh: need root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-ovs.sh: only Debian/Ubuntu (apt-get) is supported; install openvswitch-switch by hand" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
# iproute2 for the tests' `ip` checks; openvswitch-switch brings ovsdb-server, ovs-vswitchd and the tools.
$SUDO apt-get install -y -q --no-install-recommends openvswitch-switch openvswitch-common iproute2

have_ovs || { echo "install-ovs.sh: openvswitch-switch installed but its programs were not found" >&2; exit 1; }
echo "Open vSwitch installed: $(ovs-vsctl --version | head -n1)"
