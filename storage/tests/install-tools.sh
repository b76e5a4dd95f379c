#!/usr/bin/env bash
# Installs the Debian packages the qx-storage integration tests use, when missing: qemu-img/qemu-io (qemu-utils),
# fsck.fat (dosfstools), mdir/mtype (mtools), blkid (util-linux), chattr (e2fsprogs), mkfs.xfs (xfsprogs: an XFS in a
# file, loop-mounted, for the reflink tests), PyYAML (python3-yaml: the seed files must load as cloud-init loads them).
# Needs root when it installs.
set -euo pipefail

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v fsck.fat >/dev/null || [ -x /sbin/fsck.fat ] || need+=(dosfstools)
command -v mdir >/dev/null || need+=(mtools)
command -v blkid >/dev/null || [ -x /sbin/blkid ] || need+=(util-linux)
command -v chattr >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs >/dev/null || [ -x /sbin/mkfs.xfs ] || need+=(xfsprogs)
python3 -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
[ ${#need[@]} -eq 0 ] && exit 0

mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
echo "install-tools: installing ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=300 update -qq >&2
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" >&2
