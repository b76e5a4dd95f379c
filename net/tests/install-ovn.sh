#!/usr/bin/env bash
# Installs OVN (ovn-central: the NB/SB schemas, ovn-northd, ovn-nbctl; ovn-host: ovn-controller) when it is missing,
# for the qx-net OVN tests, the qx-node OVN network tests and the ovn_ports benchmark. Open vSwitch comes first
# (net/tests/install-ovs.sh). The tests start their own ovsdb-servers, ovn-northd, ovs-vswitchd and ovn-controller
# in temp dirs; the system services are neither needed nor started here (where a policy forbids starting services
# during install, as in containers, the package scripts say so, which is fine).
#
# Usage (as root, or with sudo available): net/tests/install-ovn.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/install-ovs.sh"
# shellcheck source=install-common.sh
source "$here/install-common.sh"

have_ovn() {
    have_programs ovn-northd ovn-controller ovn-nbctl ovn-sbctl ping &&
        [ -f /usr/share/ovn/ovn-nb.ovsschema ] && [ -f /usr/share/ovn/ovn-sb.ovsschema ]
}

if have_ovn; then
    echo "OVN is installed: $(ovn-nbctl --version 2>/dev/null | head -n1)"
    exit 0
fi

# iputils-ping: the tests ping across the Geneve tunnel from the chassis' network namespaces.
apt_install install-ovn.sh ovn-central ovn-host ovn-common iputils-ping

have_ovn || { echo "install-ovn.sh: ovn-central and ovn-host installed but their programs were not found" >&2; exit 1; }
echo "OVN installed: $(ovn-nbctl --version | head -n1)"
