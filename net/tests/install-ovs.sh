#!/usr/bin/env bash
# Installs Open vSwitch (ovsdb-server, ovs-vswitchd, ovs-vsctl, ovsdb-tool) when it is missing, for the qx-net
# integration tests and the ovsdb_ports benchmark. Those start their own daemons in a temp dir; the system service
# is neither needed nor started here (on hosts without systemd the package's init script may print that it was
# not started, which is fine).
#
# Usage (as root, or with sudo available): net/tests/install-ovs.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=install-common.sh
source "$here/install-common.sh"

have_ovs() {
    have_programs ovsdb-server ovsdb-tool ovs-vswitchd ovs-vsctl && [ -f /usr/share/openvswitch/vswitch.ovsschema ]
}

if have_ovs; then
    echo "Open vSwitch is installed: $(ovs-vsctl --version 2>/dev/null | head -n1 || /usr/sbin/ovs-vsctl --version | head -n1)"
    exit 0
fi

# iproute2 for the tests' `ip` checks; openvswitch-switch brings ovsdb-server, ovs-vswitchd and the tools.
apt_install install-ovs.sh openvswitch-switch openvswitch-common iproute2

have_ovs || { echo "install-ovs.sh: openvswitch-switch installed but its programs were not found" >&2; exit 1; }
echo "Open vSwitch installed: $(ovs-vsctl --version | head -n1)"
