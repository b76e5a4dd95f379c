#!/usr/bin/env bash
# Runs every test: unit tests, and end-to-end tests against real QEMU booting the test guest.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
net/tests/install-ovs.sh >&2
storage/tests/install-tools.sh >&2
# The OVS tests skip without Open vSwitch on developer machines; here they must run.
export QX_REQUIRE_OVS=1
# Build the test guest once up front (cached), so parallel tests find it ready.
test_infra/guest/build.sh >/dev/null
cargo test --workspace "$@"
