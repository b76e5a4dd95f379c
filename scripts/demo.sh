#!/usr/bin/env bash
# The main job: installs what is missing, builds, starts qx-node with its embedded defaults, boots the test guest
# as a VM, and shows it running and its console. Run it again to reuse the running daemon and VM.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release --bin qx-node --bin qxctl
guest=$(test_infra/guest/build.sh)
bin=$PWD/target/release
qxctl=("$bin/qxctl")
socket=/run/quantix/node.sock

if ! "${qxctl[@]}" node info >/dev/null 2>&1; then
    mkdir -p /var/log/quantix
    # No config file: the embedded defaults (/var/lib/quantix, /run/quantix/node.sock, auto accel), plus the test
    # guest's directory as an allowed host path for its kernel and initrd.
    setsid "$bin/qx-node" --allow-path "$guest" >>/var/log/quantix/qx-node.log 2>&1 < /dev/null &
    echo "started qx-node (pid $!), log in /var/log/quantix/qx-node.log"
    for _ in $(seq 100); do [ -S "$socket" ] && break; sleep 0.1; done
fi
"${qxctl[@]}" node info
echo

if ! "${qxctl[@]}" vm show demo >/dev/null 2>&1; then
    "${qxctl[@]}" vm create --name demo --memory 256 --nic user \
        --kernel "$guest/vmlinux" --initrd "$guest/initrd.img" --cmdline "$(cat "$guest/cmdline")" >/dev/null
fi
state=$("${qxctl[@]}" --json vm show demo | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
if [ "$state" != running ]; then
    "${qxctl[@]}" vm start demo >/dev/null
fi

echo "waiting for the guest's ready marker on its serial console..."
for _ in $(seq 120); do
    "${qxctl[@]}" vm console demo --dump 2>/dev/null | grep -q QX-GUEST-READY && break
    sleep 1
done
"${qxctl[@]}" vm list
echo
echo "--- serial console of demo (last lines) ---"
"${qxctl[@]}" vm console demo --dump | tail -n 8
echo
echo "---"
echo "Attach:  $bin/qxctl vm console demo      (detach with Ctrl-])"
echo "Stop:    $bin/qxctl vm stop demo"
echo "Remove:  $bin/qxctl vm delete demo"
