#!/usr/bin/env bash
# Sets this machine up so the VM start benchmark can compare against libvirt (benchmarks only; qx-node never uses
# libvirt). The bench starts its own libvirtd and virtlogd on a private socket; nothing runs as a service.
set -euo pipefail

if [ ! -x /usr/sbin/libvirtd ] || ! /usr/bin/python3 -c 'import libvirt' 2>/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu python3-libvirt >&2
fi
# libvirt's QEMU driver resolves its default user at start, before reading qemu.conf.
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
# QEMU runs as root, like qx-node's, so both read the same guest files. /etc/libvirt may be missing altogether
# (a machine whose packages came without their conffiles, or whose /etc was pruned): libvirtd starts without it.
mkdir -p /etc/libvirt
if ! grep -q '^user = "root"' /etc/libvirt/qemu.conf 2>/dev/null; then
    printf 'user = "root"\ngroup = "root"\n' >> /etc/libvirt/qemu.conf
fi
echo "libvirt is ready for cargo bench" >&2
