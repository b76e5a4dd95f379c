#!/usr/bin/env bash
# Builds the Quantix host image: a GPT disk image (EFI, System A, System B, Config, Data) that boots with GRUB on
# UEFI and BIOS, and the system image an A/B update installs. Run it under the machine's shared CPU lock:
#
#     flock /tmp/qx-cpu.lock image/build.sh [--version V] [--variant good|broken-node]
#
# Prints only the output directory on stdout (everything else goes to stderr):
#     disk.img     the whole disk, raw (write it to a disk, or boot it in QEMU; see overlay/README.md)
#     system.qxi   the system image UpdateHost installs (a 4 KiB header, then the system partition)
#     system.qxi.sha256, version, and the pieces: vmlinuz, initramfs, system.squashfs
#
# Every stage is cached under ${QX_IMAGE_CACHE:-~/.cache/quantix/image}, keyed by its inputs: the Debian root
# filesystem by image/packages.txt and this script, the squashfs by that, overlay/, image/rootfs, image/initramfs
# and the qx binaries, the system and disk images by that and the version. A run whose inputs are all cached
# takes seconds and downloads nothing. `--variant broken-node` replaces qx-node with a program that exits 1: the
# update the nested test expects to be rolled back.
set -euo pipefail
exec 3>&1 1>&2

log() { printf 'qx-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
version="" variant=good
while [[ $# -gt 0 ]]; do
    case $1 in
        --version) version=$2; shift 2 ;;
        --variant) variant=$2; shift 2 ;;
        *) die "unknown argument $1 (see the comment at the top of $0)" ;;
    esac
done
[[ $variant == good || $variant == broken-node ]] || die "--variant: $variant is not good or broken-node"
[[ $EUID -eq 0 ]] || die "needs root (mmdebstrap and file ownership in the image)"

cache=${QX_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantix/image}
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# Sizes in MiB. A system partition holds one system image; the data partition grows to the disk at first boot.
efi_mib=100 system_mib=768 config_mib=100 data_mib=256
release_profile=${QX_IMAGE_PROFILE:-image}
suite=bookworm

hash_tree() { # a content hash of files (names, modes, contents)
    (cd "$1" && find . \( -type f -o -type l \) ! -name README.md -print0 | LC_ALL=C sort -z |
        xargs -0 -r sh -c 'for f; do stat -c "%n %a" "$f"; if [ -L "$f" ]; then readlink "$f"; else sha256sum <"$f"; fi; done' sh) |
        sha256sum | cut -c1-64
}
key_of() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }
stage_hash() { sed -n "/^# --- stage $1/,/^# --- stage $(($1 + 1))/p" "$here/build.sh" | sha256sum; }

# --- tools -------------------------------------------------------------------------------------------------------
need=()
for tool in mmdebstrap:mmdebstrap sgdisk:gdisk mksquashfs:squashfs-tools mkfs.ext4:e2fsprogs mkfs.vfat:dosfstools \
    mcopy:mtools grub-mkimage:grub-common cpio:cpio depmod:kmod zstd:zstd xz:xz-utils; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
[[ -d /usr/lib/grub/x86_64-efi ]] || need+=(grub-efi-amd64-bin)
[[ -d /usr/lib/grub/i386-pc ]] || need+=(grub-pc-bin)
[[ -x /bin/busybox ]] || need+=(busybox-static)
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]}"
    apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" </dev/null
fi

# --- stage 1: the Debian root filesystem ---------------------------------------------------------------------
packages=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/packages.txt" | sort -u | paste -sd, -)
rootfs_key=$(key_of rootfs "$suite" "$packages" "$(stage_hash 1)")
rootfs=$cache/rootfs-$rootfs_key
if [[ ! -f $rootfs/.complete ]]; then
    log "stage 1: Debian $suite root filesystem (mmdebstrap), key $rootfs_key"
    rm -rf "$rootfs" "$cache"/rootfs-*.tmp
    mkdir -p "$cache/debs"
    mirror=()
    # The machine's own Debian sources (a mirror or proxy it is set up with), else mmdebstrap's default.
    [[ -f /etc/apt/sources.list.d/debian.sources ]] && mirror=(/etc/apt/sources.list.d/debian.sources)
    start=$(date +%s)
    mmdebstrap --variant=essential --mode=root --include="$packages" \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --skip=essential/unlink \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in $cache/debs /var/cache/apt/archives/" \
        --customize-hook="sync-out /var/cache/apt/archives $cache/debs" \
        --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
        "$suite" "$rootfs.tmp" "${mirror[@]}"
    find "$cache/debs" -name '*.deb' -mtime +30 -delete
    touch "$rootfs.tmp/.complete"
    mv -T "$rootfs.tmp" "$rootfs"
    log "stage 1 took $(($(date +%s) - start)) s"
fi
# Older root filesystems: a week for checkouts that still use them.
find "$cache" -mindepth 1 -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$rootfs_key" -mtime +7 -exec rm -rf {} +

# --- stage 2: the qx binaries, overlay/ and image/rootfs applied, packed as system.squashfs ---------------------
# Release builds. The `image` profile (Cargo.toml) is opt-level 2 without fat LTO: fat LTO with one codegen unit
# costs minutes per binary on two cores for no difference a host shows (see overlay/README.md for the figures).
if [[ -z ${QX_IMAGE_BINARIES:-} ]]; then
    log "stage 2: cargo build --profile $release_profile (qx-node, qxctl, qx-console)"
    (cd "$repo" && cargo build --locked --profile "$release_profile" -p qx-agent -p qx-console \
        --bin qx-node --bin qxctl --bin qx-console)
    target=${CARGO_TARGET_DIR:-$repo/target}
    bindir=$target/$release_profile
else
    bindir=$QX_IMAGE_BINARIES
fi
for b in qx-node qxctl qx-console; do [[ -x $bindir/$b ]] || die "$bindir/$b is missing"; done
bin_hash=$(cat "$bindir/qx-node" "$bindir/qxctl" "$bindir/qx-console" | sha256sum | cut -c1-64)
squash_key=$(key_of squashfs "$rootfs_key" "$(stage_hash 2)" "$(hash_tree "$repo/overlay")" "$(hash_tree "$here/rootfs")" \
    "$(hash_tree "$here/initramfs")" "$bin_hash" "$variant")
squash_dir=$cache/system-$squash_key
build_version=${version:-$(cd "$repo" && git describe --always --dirty 2>/dev/null || echo unknown)}

# Modules the initramfs loads (with their dependencies) to reach the system partition.
initramfs_modules=(
    virtio_pci virtio_blk virtio_scsi sd_mod ahci ata_piix nvme
    xhci_pci ehci_pci usb_storage uas
    crc32c_generic ext4 squashfs loop overlay vfat nls_cp437 nls_ascii nls_utf8 nls_iso8859_1
)
# Kernel module trees the host has no use for (sound, cameras, wireless, desktop GPUs, staging drivers).
prune_modules=(
    sound drivers/media drivers/staging drivers/net/wireless drivers/bluetooth net/bluetooth net/mac80211
    net/wireless drivers/infiniband drivers/iio drivers/gpu/drm/amd drivers/gpu/drm/nouveau drivers/gpu/drm/i915
    drivers/gpu/drm/radeon drivers/isdn drivers/comedi drivers/input/joystick drivers/input/touchscreen
)

decompress_module() { # in out
    case $1 in
        *.ko.xz) xz -dc "$1" >"$2" ;;
        *.ko.zst) zstd -qdc "$1" >"$2" ;;
        *.ko.gz) gzip -dc "$1" >"$2" ;;
        *) cp "$1" "$2" ;;
    esac
}

build_system() {
    local work=$1 root=$1/root start
    mkdir -p "$work"
    start=$(date +%s)
    log "stage 2: root tree from rootfs-$rootfs_key"
    cp -a "$rootfs" "$root"
    rm -f "$root/.complete"
    # The product: overlay/ as it is, the image's own files, the binaries.
    (cd "$repo/overlay" && tar --exclude=README.md -cf - .) | tar -xf - -C "$root" --no-same-owner
    cp -a "$here/rootfs/." "$root/"
    install -m 0755 "$bindir/qx-node" "$bindir/qxctl" "$bindir/qx-console" "$root/usr/bin/"
    if [[ $variant == broken-node ]]; then
        printf '#!/bin/sh\necho "qx-node: this build is broken on purpose (image variant broken-node)" >&2\nexit 1\n' \
            >"$root/usr/bin/qx-node"
        chmod 0755 "$root/usr/bin/qx-node"
    fi

    # busybox provides init and the small tools Debian's Essential set lacks; existing programs stay.
    local applet
    for applet in init reboot poweroff halt mount umount ifup ifdown udhcpc watchdog vi less ps; do
        [[ -e $root/sbin/$applet || -e $root/bin/$applet || -e $root/usr/bin/$applet || -e $root/usr/sbin/$applet ]] ||
            ln -s /bin/busybox "$root/sbin/$applet"
    done

    # /etc/quantix is the config partition; the defaults first boot copies there come from overlay/.
    mkdir -p "$root/usr/share/quantix/defaults" "$root/quantix" "$root/data" "$root/boot/efi"
    mkdir -p "$root"/etc/network/if-{pre-up,up,down,post-down}.d
    # /data/datastore: where an operator copies ISOs, kernels and images for VMs (the API names no other host path
    # outside the pools).
    sed -e 's|^data_dir: .*|data_dir: /data/quantix|' \
        -e 's|^allowed_paths: .*|allowed_paths: [/data/datastore]|' \
        -e 's|^  # tcp: 0.0.0.0:7443|  tcp: 0.0.0.0:9443|' \
        -e 's|^  # certificates_dir: .*|  certificates_dir: /data/quantix/certificates|' \
        -e 's|^  network_config: .*|  network_config: /quantix/network.yaml|' \
        -e 's|^  interfaces_file: .*|  interfaces_file: /quantix/interfaces|' \
        -e 's|^  shell_command: .*|  shell_command: [/bin/sh, -l]|' \
        "$root/etc/quantix/node.yaml" >"$root/usr/share/quantix/defaults/node.yaml"
    rm -rf "$root/etc/quantix"
    ln -s /quantix "$root/etc/quantix"
    INITTAB=$root/etc/inittab ENTRY_FILE=$root/usr/share/quantix/inittab.tty1 "$root/usr/libexec/quantix/console-on-tty1"
    sed -i 's|^QX_NODE_OVS_SERVICES=.*|QX_NODE_OVS_SERVICES="ovsdb-server ovs-vswitchd"|' "$root/etc/conf.d/quantix-node"

    # OpenRC runlevels. Debian's LSB scripts are not used: busybox init and these services replace them.
    local f
    for f in "$root"/etc/init.d/*; do
        head -n1 "$f" | grep -q '^#!/sbin/openrc-run' || [[ $(basename "$f") == rc* ]] || rm -f "$f"
    done
    rm -rf "$root"/etc/rc[0-6S].d "$root"/etc/runlevels/*/*
    add_service() { [[ -f $root/etc/init.d/$2 ]] && ln -sfn "/etc/init.d/$2" "$root/etc/runlevels/$1/$2"; }
    add_service sysinit cgroups
    for f in hostname quantix-modules quantix-firstboot quantix-update-watchdog; do add_service boot $f; done
    # The host firewall (overlay/usr/share/quantix/firewall.nft): its service opens the ports node.yaml serves.
    add_service boot firewall || log "no /etc/init.d/firewall in overlay/: the image boots without a firewall"
    for f in networking ovsdb-server ovs-vswitchd quantix-node; do add_service default $f; done

    # No package manager, compiler or interpreter on the host; no keys shared by every host of this build.
    chroot "$root" dpkg-query -W -f '${Package} ${Version}\n' >"$root/usr/share/quantix/packages"
    rm -rf "$root"/usr/bin/dpkg* "$root"/usr/sbin/dpkg* "$root"/var/lib/dpkg "$root"/var/lib/apt "$root"/var/cache/* \
        "$root"/etc/apt "$root"/etc/dpkg "$root"/usr/bin/perl* "$root"/usr/lib/x86_64-linux-gnu/perl* \
        "$root"/usr/share/perl* "$root"/usr/bin/python3* "$root"/usr/lib/python3* "$root"/usr/share/python3 \
        "$root"/usr/local/lib/python3* "$root"/usr/share/man "$root"/usr/share/info "$root"/usr/share/lintian \
        "$root"/etc/ssh/ssh_host_* "$root"/etc/machine-id "$root"/var/log/*
    : >"$root/etc/machine-id"
    echo quantix >"$root/etc/hostname"

    # The kernel goes onto the system partition for GRUB; its modules stay in the squashfs, pruned.
    local krel kroot
    krel=$(find "$root/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort | tail -n1)
    [[ -n $krel && -f $root/boot/vmlinuz-$krel ]] || die "no kernel in the root filesystem"
    kroot=$root/lib/modules/$krel
    for f in "${prune_modules[@]}"; do rm -rf "${kroot:?}/kernel/$f"; done
    depmod -b "$root" "$krel"
    mkdir -p "$work/part/boot" "$work/part/quantix"
    cp "$root/boot/vmlinuz-$krel" "$work/part/boot/vmlinuz"
    rm -rf "$root"/boot/* "$root"/initrd.img* "$root"/vmlinuz*
    mkdir -p "$root/boot/efi"

    # The initramfs: busybox, the modules above, /init.
    local ir=$work/initramfs m kind path rel out
    mkdir -p "$ir"/{bin,sbin,proc,sys,dev,run,newroot,lib/modules/"$krel"}
    cp /bin/busybox "$ir/bin/busybox"
    for applet in $(/bin/busybox --list); do [[ $applet == busybox ]] || ln -s busybox "$ir/bin/$applet"; done
    mknod -m 600 "$ir/dev/console" c 5 1
    install -m 0755 "$here/initramfs/init" "$ir/init"
    : >"$ir/lib/modules/$krel/quantix-modules"
    declare -A have=()
    for m in "${initramfs_modules[@]}"; do
        if ! deps=$(modprobe -d "$root" -S "$krel" --show-depends "$m" 2>/dev/null); then
            log "initramfs: module $m not in this kernel, skipped"
            continue
        fi
        while read -r kind path _; do
            [[ $kind == insmod ]] || continue
            rel=${path#"$kroot/"}
            out=${rel%.xz}; out=${out%.zst}; out=${out%.gz}
            [[ -n ${have[$out]:-} ]] && continue
            have[$out]=1
            mkdir -p "$(dirname "$ir/lib/modules/$krel/$out")"
            decompress_module "$path" "$ir/lib/modules/$krel/$out"
        done <<<"$deps"
        echo "$m" >>"$ir/lib/modules/$krel/quantix-modules"
    done
    cp "$kroot/modules.builtin" "$kroot/modules.order" "$ir/lib/modules/$krel/"
    depmod -b "$ir" "$krel"
    (cd "$ir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) | zstd -q -19 -T0 >"$work/part/boot/initramfs"

    log "stage 2: mksquashfs"
    mksquashfs "$root" "$work/part/quantix/system.squashfs" -comp zstd -Xcompression-level 15 -noappend -quiet \
        -no-progress -wildcards -e 'proc/*' 'sys/*' 'dev/*' 'run/*' 'tmp/*'
    rm -rf "$root" "$ir"
    echo "$krel" >"$work/kernel-release"
    log "stage 2 took $(($(date +%s) - start)) s"
}

if [[ ! -f $squash_dir/.complete ]]; then
    rm -rf "$squash_dir" "$cache"/system-*.tmp
    build_system "$squash_dir.tmp"
    touch "$squash_dir.tmp/.complete"
    mv -T "$squash_dir.tmp" "$squash_dir"
fi
find "$cache" -mindepth 1 -maxdepth 1 -name 'system-*' ! -name "system-$squash_key" -mtime +7 -exec rm -rf {} +

# --- stage 3: the system image (one system partition) and the disk image --------------------------------------
image_key=$(key_of image "$squash_key" "$build_version" "$(hash_tree "$here/grub")" "$(stage_hash 3)")
out=$cache/out-$image_key
if [[ -f $out/.complete ]]; then
    log "cached: $out"
    printf '%s\n' "$out" >&3
    exit 0
fi
rm -rf "$out" "$cache"/out-*.tmp
work=$out.tmp
mkdir -p "$work/part"
cp -a "$squash_dir/part/." "$work/part/"
printf 'version=%s\nvariant=%s\nkernel=%s\n' "$build_version" "$variant" "$(<"$squash_dir/kernel-release")" \
    >"$work/part/quantix/release"

# ext4 without a journal (it is only ever mounted read-only), sized to its contents: an update transfers this.
content_kib=$(du -sk "$work/part" | cut -f1)
payload_mib=$(((content_kib * 105 / 100 + 8192) / 1024))
((payload_mib <= system_mib)) || die "the system needs $payload_mib MiB, more than a system partition's $system_mib"
mkfs.ext4 -q -F -L quantix-system -O ^has_journal -E root_owner=0:0 -d "$work/part" -b 4096 \
    "$work/system.ext4" "${payload_mib}M"
payload_size=$(stat -c %s "$work/system.ext4")
payload_sha=$(sha256sum "$work/system.ext4" | cut -c1-64)
# The header UpdateHost checks before it writes anything: key=value lines, NUL-padded to 4096 bytes.
{
    printf 'QUANTIX-SYSTEM-IMAGE\nformat=1\nversion=%s\npayload_size=%s\npayload_sha256=%s\n' \
        "$build_version" "$payload_size" "$payload_sha"
} >"$work/header"
head -c 4096 /dev/zero >>"$work/header"
truncate -s 4096 "$work/header"
cat "$work/header" "$work/system.ext4" >"$work/system.qxi"
sha256sum "$work/system.qxi" | cut -c1-64 >"$work/system.qxi.sha256"

# GRUB: one configuration for both firmwares, the A/B state in the environment block beside it.
grub_modules="part_gpt fat ext2 normal linux echo test loadenv regexp configfile search search_fs_file sleep reboot
    halt serial terminal true minicmd gzio"
mkdir -p "$work/efi"
grub-mkimage -O x86_64-efi -o "$work/efi/BOOTX64.EFI" -p /EFI/quantix $grub_modules efi_gop efi_uga all_video
grub-mkimage -O i386-pc -o "$work/core.img" -p '(hd0,gpt1)/EFI/quantix' $grub_modules biosdisk vga
grub-editenv "$work/efi/grubenv" create
grub-editenv "$work/efi/grubenv" set qx_default=a qx_pending= qx_trying= "qx_a_version=$build_version" qx_b_version= \
    qx_health_timeout=300 qx_timeout=2

sectors_per_mib=2048
total_mib=$((1 + efi_mib + 2 * system_mib + config_mib + data_mib + 1))
truncate -s 0 "$work/disk.img"
truncate -s "${total_mib}M" "$work/disk.img"
# Alignment 1 for the BIOS boot partition in the gap before 1 MiB; the others start on MiB boundaries anyway.
sgdisk -a 1 \
    -n 6:34:2047 -t 6:EF02 -c 6:BIOS-BOOT \
    -n 1:1M:+${efi_mib}M -t 1:EF00 -c 1:QUANTIX-EFI \
    -n 2:0:+${system_mib}M -t 2:8300 -c 2:QUANTIX-A \
    -n 3:0:+${system_mib}M -t 3:8300 -c 3:QUANTIX-B \
    -n 4:0:+${config_mib}M -t 4:8300 -c 4:QUANTIX-CFG \
    -n 5:0:0 -t 5:8300 -c 5:QUANTIX-DATA \
    "$work/disk.img" >/dev/null
part_field() { # partition, "First sector" or "Partition size": its number of sectors
    local v
    v=$(sgdisk -i "$1" "$work/disk.img" | awk -v f="$2:" 'index($0, f) == 1 {print $3}')
    [[ $v =~ ^[0-9]+$ ]] || die "sgdisk shows no partition $1"
    echo "$v"
}
part_start() { part_field "$1" "First sector"; }
part_sectors() { part_field "$1" "Partition size"; }
put() { # partition, filesystem image
    local start
    start=$(part_start "$1")
    dd if="$2" of="$work/disk.img" bs=1M conv=notrunc,sparse oflag=seek_bytes seek=$((start * 512)) status=none
}

mkfs.vfat -C -F 32 -S 512 -s 1 -n QUANTIX-EFI "$work/efi.img" $((efi_mib * 1024)) >/dev/null
mmd -i "$work/efi.img" ::/EFI ::/EFI/BOOT ::/EFI/quantix
mcopy -i "$work/efi.img" "$work/efi/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$work/efi.img" "$here/grub/grub.cfg" "$work/efi/grubenv" ::/EFI/quantix/
put 1 "$work/efi.img"
put 2 "$work/system.ext4"
mkdir -p "$work/empty"
mkfs.ext4 -q -F -L quantix-config -E root_owner=0:0 -d "$work/empty" "$work/config.ext4" "${config_mib}M"
put 4 "$work/config.ext4"
data_sectors=$(part_sectors 5)
mkfs.ext4 -q -F -L quantix-data -E root_owner=0:0 -d "$work/empty" "$work/data.ext4" "$((data_sectors / 2))K"
put 5 "$work/data.ext4"

# BIOS: GRUB's boot.img in the protective MBR, core.img in the BIOS boot partition (what grub-bios-setup does,
# without a device): boot.img learns core.img's first sector, core.img's first sector the rest of it.
core_sectors=$((($(stat -c %s "$work/core.img") + 511) / 512))
((core_sectors <= 2047 - 34 + 1)) || die "core.img ($core_sectors sectors) does not fit the BIOS boot partition"
le64() { local v=$1 i; for i in 0 1 2 3 4 5 6 7; do printf "\\x$(printf %02x $(((v >> (8 * i)) & 255)))"; done; }
le16() { printf "\\x$(printf %02x $(($1 & 255)))\\x$(printf %02x $((($1 >> 8) & 255)))"; }
dd if=/usr/lib/grub/i386-pc/boot.img of="$work/disk.img" bs=440 count=1 conv=notrunc status=none
le64 34 | dd of="$work/disk.img" bs=1 seek=$((0x5c)) conv=notrunc status=none
dd if="$work/core.img" of="$work/disk.img" bs=512 seek=34 conv=notrunc status=none
{ le64 35; le16 $((core_sectors - 1)); } | dd of="$work/disk.img" bs=1 seek=$((34 * 512 + 0x1f4)) conv=notrunc status=none

cp "$work/part/boot/vmlinuz" "$work/part/boot/initramfs" "$work/part/quantix/system.squashfs" "$work/"
echo "$build_version" >"$work/version"
rm -rf "$work/part" "$work/efi" "$work/empty" "$work/header" "$work"/*.ext4 "$work/efi.img" "$work/core.img"
touch "$work/.complete"
mv -T "$work" "$out"
find "$cache" -mindepth 1 -maxdepth 1 -name 'out-*' ! -name "out-$image_key" -mtime +7 -exec rm -rf {} +
log "built $out ($(du -sh --apparent-size "$out/disk.img" | cut -f1) disk, $(du -sh "$out/system.qxi" | cut -f1) system image)"
printf '%s\n' "$out" >&3
