#!/usr/bin/env bash
# Builds the Quantix Debian guest: a Debian 12 root filesystem from Debian's packages (systemd, udev, cloud-init
# with the NoCloud datasource, qemu-guest-agent, openssh-server, the cloud kernel) as a qcow2 disk holding one ext4
# filesystem labelled qx-root, with its kernel and initramfs beside it for direct kernel boot (no bootloader).
#
# Prints only the absolute path of the output directory on stdout; everything else goes to stderr. Cached under
# ~/.cache/quantix/debian-guest, keyed by this script and common.sh. Needs root on first use (mmdebstrap). See
# README.md next to this file.
set -euo pipefail

# Keep stdout clean for the one line callers parse, whatever the tools print.
exec 3>&1 1>&2

log_prefix=qx-debian-guest
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source=common.sh
source "$here/common.sh"
script_hash=$(cat "$here/build-debian.sh" "$here/common.sh" | sha256sum | cut -c1-64)
cache_root=${QX_DEBIAN_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/quantix/debian-guest}
key=${script_hash:0:16}
out=$cache_root/$key
suite=bookworm
root_label=qx-root
# Virtual size of the disk; the qcow2 holds only what the filesystem uses (~0.6 GiB).
disk_size=4G

# What the guest is: the packages of the issue, plus what they need to boot without recommends. dbus for
# qemu-guest-agent's and systemd's tools, iproute2 for cloud-init's networkd renderer, e2fsprogs for fsck and
# resize2fs, zstd for the initramfs. The generic kernel, not linux-image-cloud-amd64: the cloud kernel has no AHCI
# driver, so on q35 it never sees the seed CD-ROM.
packages=(
    systemd-sysv udev dbus cloud-init qemu-guest-agent openssh-server sudo
    linux-image-amd64 initramfs-tools zstd
    iproute2 netbase e2fsprogs
)

# root=LABEL: the initramfs finds the disk whatever its PCI slot. fsck.mode=skip: a fresh overlay needs none.
# The rest as in build.sh: serial console, a panic ends QEMU, fewer boot-time self tests under TCG.
guest_cmdline="root=LABEL=$root_label rw console=ttyS0 panic=-1 quiet fsck.mode=skip cryptomgr.notests noreplace-smp tsc=reliable no_timer_check mitigations=off"

complete_build() {
    local d=$1
    [[ -f $d/disk.qcow2 && -f $d/vmlinuz && -f $d/initrd.img && -f $d/cmdline && -f $d/script-hash ]]
}

emit() {
    printf '%s\n' "$1" >&3
    exit 0
}

complete_build "$out" && emit "$out"

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
if ! flock -n 9; then
    log "another build holds $cache_root/.lock, waiting"
    flock 9
fi
complete_build "$out" && emit "$out"

[[ $EUID -eq 0 ]] || die "the first build needs root (mmdebstrap --mode=root, file ownership in the image)"
ensure_pkgs mmdebstrap qemu-utils e2fsprogs xz-utils zstd

# Under the lock, any earlier work dir belongs to a build that was killed.
find "$cache_root" -mindepth 1 -maxdepth 1 -name '.build.*' -exec rm -rf {} +
work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
debs=$cache_root/debs
mkdir -p "$debs"

# Runs inside mmdebstrap's customize phase (with /proc, /sys and /dev mounted in the chroot); $1 is the root.
cat >"$work/customize.sh" <<EOF
#!/bin/sh
set -eu
root=\$1
cat >"\$root/etc/fstab" <<'FSTAB'
LABEL=$root_label / ext4 rw,errors=remount-ro 0 1
FSTAB
echo debian-guest >"\$root/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"\$root/etc/hosts"
EOF
cat >>"$work/customize.sh" <<'EOF'
# Every VM is a new machine: its own machine id (systemd makes one at first boot) and SSH host keys (cloud-init's
# ssh module makes them before sshd starts).
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*

# NoCloud only: cloud-init skips probing every other cloud's metadata service (minutes of timeouts otherwise).
mkdir -p "$root/etc/cloud/cloud.cfg.d"
cat >"$root/etc/cloud/cloud.cfg.d/90-quantix.cfg" <<'CFG'
# Quantix Debian guest: the seed comes from qx-node's cidata CD-ROM.
datasource_list: [ NoCloud, None ]
CFG
# cloud-init's locale module sets en_US.UTF-8 and fails (status "error") when it is not generated; made here, it
# finds it already set and does nothing at boot.
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$root/etc/locale.gen"
chroot "$root" locale-gen
echo LANG=en_US.UTF-8 >"$root/etc/default/locale"

# Without ifupdown or netplan, cloud-init renders systemd-networkd files; networkd must run to apply them.
chroot "$root" systemctl enable systemd-networkd.service
# Units that cost boot time and do nothing for a test VM: periodic jobs, the interactive first-boot wizard (it
# would wait on the console for an answer), a getty on a display the VM does not have.
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer systemd-firstboot.service getty@tty1.service

# A small initramfs: the modules to find and mount the root disk, nothing probed at build time.
mkdir -p "$root/etc/initramfs-tools/conf.d"
printf 'MODULES=list\nCOMPRESS=zstd\n' >"$root/etc/initramfs-tools/conf.d/quantix.conf"
echo RESUME=none >"$root/etc/initramfs-tools/conf.d/resume"
printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod ext4 crc32c_generic >>"$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all
EOF
chmod 755 "$work/customize.sh"

# Kernel modules for hardware a VM does not have (about half of them by size).
module_excludes=()
for d in drivers/gpu drivers/media drivers/net/wireless drivers/net/ethernet drivers/infiniband drivers/staging \
    drivers/bluetooth drivers/iio drivers/isdn drivers/hid sound net/bluetooth net/wireless net/mac80211; do
    module_excludes+=("--dpkgopt=path-exclude=/lib/modules/*/kernel/$d/*")
done

mirror=()
# The machine's own Debian sources (a mirror or proxy it is set up with), else mmdebstrap's default.
[[ -f /etc/apt/sources.list.d/debian.sources ]] && mirror=(/etc/apt/sources.list.d/debian.sources)
start=$(date +%s)
log "mmdebstrap $suite: ${packages[*]}"
mmdebstrap --variant=apt --mode=root --include="$(IFS=,; echo "${packages[*]}")" \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    "${module_excludes[@]}" \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in $debs /var/cache/apt/archives/" \
    --customize-hook="$work/customize.sh" \
    --customize-hook="sync-out /var/cache/apt/archives $debs" \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
    "$suite" "$work/root" "${mirror[@]}"
find "$debs" -name '*.deb' -mtime +30 -delete
log "mmdebstrap took $(($(date +%s) - start)) s"

stage=$work/out
mkdir -p "$stage"
krel=$(find "$work/root/boot" -maxdepth 1 -name 'vmlinuz-*' -printf '%f\n' | sed 's/^vmlinuz-//' | sort -V | tail -n1)
[[ -n $krel && -f $work/root/boot/initrd.img-$krel ]] || die "no kernel and initramfs in the root filesystem's /boot"
cp "$work/root/boot/vmlinuz-$krel" "$stage/vmlinuz"
cp "$work/root/boot/initrd.img-$krel" "$stage/initrd.img"
extract_pvh_vmlinux "$stage/vmlinuz" "$stage/vmlinux"
chroot "$work/root" dpkg-query -W -f='${Package}=${Version}\n' | LC_ALL=C sort >"$stage/packages"

log "ext4 ($root_label) and qcow2"
mkfs.ext4 -q -F -L "$root_label" -E root_owner=0:0 -d "$work/root" "$work/root.ext4" "$disk_size"
qemu-img convert -q -f raw -O qcow2 "$work/root.ext4" "$stage/disk.qcow2"
rm -f "$work/root.ext4"
echo "$guest_cmdline" >"$stage/cmdline"
echo "$krel" >"$stage/kernel-release"
echo "$script_hash" >"$stage/script-hash"

rm -rf "$out"
mv -T "$stage" "$out"
# Builds by other script versions: keep a week for checkouts still using them.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
    -regex '.*/[0-9a-f]{16}' ! -name "$key" -mtime +7 -exec rm -rf {} +
log "built $out in $(($(date +%s) - start)) s"
emit "$out"
