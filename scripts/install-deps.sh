#!/usr/bin/env bash
# Installs what Quantix needs on a fresh Debian 12 machine: QEMU (system emulator and qemu-img at the same version),
# the tools the test guest build uses, tmux for the console tests, OVMF (UEFI and Secure Boot firmware) and swtpm
# (the vTPM) for the devices crate, the guest agent (qemu-ga) for the QGA tests, disk tools for the nested host
# test (image/build.sh installs what the image build itself needs), and the SSH client the Debian guest tests log
# in with, and nft for the host firewall test. Does nothing when everything is there already.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
# The nested host test edits the host image's partitions (sgdisk, mkfs.ext4).
for tool in busybox:busybox-static cpio:cpio depmod:kmod tmux:tmux sgdisk:gdisk mkfs.ext4:e2fsprogs \
    ssh:openssh-client ssh-keygen:openssh-client nft:nftables; do
    [ -x "/bin/${tool%%:*}" ] || [ -x "/sbin/${tool%%:*}" ] || command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
[ -f /usr/share/OVMF/OVMF_CODE_4M.secboot.fd ] || need+=(ovmf)
command -v swtpm >/dev/null || need+=(swtpm)
# qx-qmp's QGA tests run a real guest agent on the host (`qemu-ga --method unix-listen`).
command -v qemu-ga >/dev/null || need+=(qemu-guest-agent)
[ ${#need[@]} -eq 0 ] && exit 0

echo "installing: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
packages=("${need[@]}")
if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
    # qemu-system-x86 pins qemu-utils to its own version; a newer preinstalled qemu-utils must come down with it.
    version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    packages+=("qemu-utils=$version")
fi
apt-get install -y -qq --allow-downgrades --no-install-recommends "${packages[@]}" >&2
