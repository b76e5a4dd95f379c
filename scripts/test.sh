#!/usr/bin/env bash
# Runs every test: unit tests, and end-to-end tests against real QEMU booting the test guest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each set-up phase says how long it took (a fresh machine pays for all of them; later runs find them cached).
phase_start=$(date +%s)
phase() {
    local now
    now=$(date +%s)
    echo "test.sh: $1 in $((now - phase_start)) s" >&2
    phase_start=$now
}

scripts/install-deps.sh
net/tests/install-ovs.sh >&2
net/tests/install-ovn.sh >&2
storage/tests/install-tools.sh >&2
agent/tests/install-python-grpc.sh >/dev/null
agent/tests/install-ui-tools.sh >&2
phase "packages installed"
# The OVS tests skip without Open vSwitch on developer machines; here they must run.
export QX_REQUIRE_OVS=1
# Build the test guest once up front (cached), so parallel tests find it ready.
test_infra/guest/build.sh >/dev/null
# And the Debian guest (cloud-init, SSH, the guest agent): minutes on the first run, then cached.
test_infra/guest/build-debian.sh >/dev/null
phase "test guests ready"
# The Host UI: npm packages from ui/package-lock.json, the build the browser test serves, and the app's unit tests.
ui/build.sh
(cd ui && npx vitest run)
phase "Host UI built and unit-tested"
# The host images the nested test boots and updates to (cached under ~/.cache/quantix/image; image/build.sh says
# how): a first system, a second good one, and one whose qx-node does not start. QX_SKIP_HOST_IMAGE=1 leaves the
# nested test out (it then says it was skipped).
if [[ ${QX_SKIP_HOST_IMAGE:-0} != 1 ]]; then
    QX_HOST_IMAGE=$(image/build.sh --version 1.0.0-test)
    QX_HOST_IMAGE_UPDATE=$(image/build.sh --version 1.0.1-test)
    QX_HOST_IMAGE_BROKEN=$(image/build.sh --version 1.0.2-broken --variant broken-node)
    export QX_HOST_IMAGE QX_HOST_IMAGE_UPDATE QX_HOST_IMAGE_BROKEN
    phase "host images ready"
fi
# The host firewall ruleset in two network namespaces (seconds; real nft and sockets).
image/test-firewall.sh >&2
cargo test --workspace "$@"
