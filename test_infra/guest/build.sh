#!/usr/bin/env bash
# Builds the Quantix test guest: Debian's stock amd64 kernel plus a busybox
# initramfs whose /init marks readiness on the serial console, serves a root
# shell there, powers off on the ACPI power button and mounts seed media.
#
# Prints only the absolute path of the output directory on stdout; everything
# else goes to stderr. See README.md next to this file.
set -euo pipefail

# Keep stdout clean for the one line callers parse, whatever the tools print.
exec 3>&1 1>&2

log_prefix=qx-guest-build
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
# shellcheck source=common.sh
source "$here/common.sh"
script_hash=$(cat "$here/build.sh" "$here/common.sh" | sha256sum | cut -c1-64)
cache_root=${QX_GUEST_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/quantix/test-guest}

# Modules the guest needs; modprobe resolves their dependencies from the
# kernel package's own modules.dep. ahci (q35) and ata_piix (pc) give /dev/sr0
# for IDE/SATA CD-ROMs; they come last because every module load waits for
# their port probing (~0.3 s of SATA link debounce on q35's six empty ports).
# Built-in or absent modules are skipped.
guest_modules=(
    virtio_pci virtio_blk virtio_net virtio_console virtio_rng
    button evdev
    isofs vfat nls_cp437 nls_ascii nls_utf8
    af_packet
    ahci ata_piix sr_mod
)

# console=ttyS0: the serial console tests drive; panic=-1: a panic reboots,
# which ends QEMU at once under -no-reboot instead of hanging the test.
# Measured under TCG (see README): cryptomgr.notests skips the crypto self
# tests (-0.27 s), noreplace-smp skips re-patching SMP alternatives on one
# vCPU (-0.13 s). tsc=reliable and no_timer_check keep a loaded host from
# making the kernel distrust the TSC or the timer and fall back to slow
# emulated clocks; mitigations=off spares runtime overhead.
guest_cmdline="console=ttyS0 panic=-1 quiet cryptomgr.notests noreplace-smp tsc=reliable no_timer_check mitigations=off"

complete_build() {
    local d=$1
    [[ -f $d/vmlinuz && -f $d/initrd.img && -f $d/cmdline && -f $d/script-hash ]]
}

emit() {
    printf '%s\n' "$1" >&3
    exit 0
}

# Cache hit without apt: the last complete build was made by this very script.
fast_path() {
    local cur
    cur=$(readlink -f "$cache_root/current" 2>/dev/null) || return 1
    complete_build "$cur" || return 1
    [[ $(<"$cur/script-hash") == "$script_hash" ]] || return 1
    emit "$cur"
}

fast_path || true

mkdir -p "$cache_root"
exec 9>"$cache_root/.lock"
if ! flock -n 9; then
    log "another build holds $cache_root/.lock, waiting"
    flock 9
fi
# Whoever held the lock may just have produced what we need.
fast_path || true


ensure_pkgs busybox-static cpio kmod xz-utils

# The concrete kernel image package behind the linux-image-amd64 metapackage,
# and its candidate version.
resolve_kernel() {
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ && !found { print $2; found = 1 }')
    [[ -n $kpkg ]] || return 1
    kver=$(apt-cache policy "$kpkg" 2>/dev/null | awk '$1 == "Candidate:" && !found { print $2; found = 1 }')
    [[ -n $kver && $kver != "(none)" ]]
}

if ! resolve_kernel; then
    apt_update_once
    resolve_kernel || die "cannot resolve the kernel package behind linux-image-amd64"
fi
log "kernel package $kpkg=$kver"

compute_key() {
    key=$(printf '%s\n%s=%s\n' "$script_hash" "$kpkg" "$kver" | sha256sum | cut -c1-16)
    out=$cache_root/$key
}

set_current() {
    ln -sfn "$key" "$cache_root/.current.$$"
    mv -T "$cache_root/.current.$$" "$cache_root/current"
}

reuse_if_built() {
    if complete_build "$out"; then
        set_current
        emit "$out"
    fi
}

compute_key
reuse_if_built

# Under the lock, any earlier work dir belongs to a build that was killed.
find "$cache_root" -mindepth 1 -maxdepth 1 -name '.build.*' -exec rm -rf {} +
work=$(mktemp -d "$cache_root/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Keep the .deb of the current kernel so edits to this script rebuild offline.
debs=$cache_root/debs
mkdir -p "$debs"
deb=$debs/${kpkg}_${kver//:/%3a}_amd64.deb
download_kernel() {
    [[ -f $deb ]] && return 0
    log "downloading $kpkg=$kver"
    rm -rf "$work/dl"
    mkdir -p "$work/dl"
    (cd "$work/dl" && apt-get -q -o APT::Sandbox::User=root download "$kpkg=$kver" </dev/null >&2) || return 1
    find "$debs" -maxdepth 1 -name 'linux-image-*.deb' -delete
    mv "$work/dl"/*.deb "$deb"
}
if ! download_kernel; then
    # Stale lists point at files the mirror has dropped: refresh once.
    ((apt_updated)) && die "apt-get download $kpkg=$kver failed"
    apt_update_once
    resolve_kernel || die "cannot resolve the kernel package after apt-get update"
    log "kernel package $kpkg=$kver"
    compute_key
    reuse_if_built
    deb=$debs/${kpkg}_${kver//:/%3a}_amd64.deb
    download_kernel || die "apt-get download $kpkg=$kver failed"
fi

log "unpacking $(basename "$deb")"
stage=$work/out
mkdir -p "$stage"
kroot=$work/kernel
dpkg-deb -x "$deb" "$kroot"
# Newer Debian kernels ship their modules under /usr/lib/modules only.
if [[ ! -d $kroot/lib/modules && -d $kroot/usr/lib/modules ]]; then
    ln -s usr/lib "$kroot/lib"
fi
krel=$(find "$kroot/lib/modules/" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | awk 'NR == 1')
[[ -n $krel && -f $kroot/boot/vmlinuz-$krel ]] || die "no vmlinuz/modules in $deb"
depmod -b "$kroot" "$krel"


# Drops the signature appended to a module. The kernel does not enforce
# signatures here (no Secure Boot), but verifying them costs ~0.1 s of boot
# under TCG; unsigned modules only set the taint flag E.
strip_module_signature() {
    local ko=$1 marker='~Module signature appended~' sig_len size
    [[ $(tail -c 28 "$ko") == "$marker" ]] || return 0
    # struct module_signature (12 bytes) ends with the big-endian sig_len.
    sig_len=$(tail -c 32 "$ko" | head -c 4 | od -An -tu1 |
        awk '{ print $1 * 16777216 + $2 * 65536 + $3 * 256 + $4 }')
    size=$(stat -c %s "$ko")
    truncate -s $((size - 28 - 12 - sig_len)) "$ko"
}

# --- initramfs tree -------------------------------------------------------
ir=$work/initramfs
mkdir -p "$ir"/{bin,sbin,usr/bin,usr/sbin,etc/acpi/PWRF,proc,sys,dev,run,tmp,mnt,root,var/log}
ln -s ../run "$ir/var/run"
chmod 1777 "$ir/tmp"
chmod 700 "$ir/root"

cp /bin/busybox "$ir/bin/busybox"
/bin/busybox --list-full | while read -r applet; do
    [[ $applet == bin/busybox || -L $ir/$applet ]] && continue
    ln -s /bin/busybox "$ir/$applet"
done
[[ -e $ir/bin/sh ]] || ln -s busybox "$ir/bin/sh"

mdir=$ir/lib/modules/$krel
mkdir -p "$mdir"
: >"$mdir/qx-load-order"
declare -A have=()
for m in "${guest_modules[@]}"; do
    if ! deps=$(modprobe -d "$kroot" -S "$krel" --show-depends "$m" 2>/dev/null); then
        log "module $m: not in this kernel, skipped"
        continue
    fi
    while read -r kind path _; do
        [[ $kind == insmod ]] || continue
        rel=${path#"$kroot/lib/modules/$krel/"}
        case $rel in
            *.ko.xz) ensure_pkgs xz-utils; rel_out=${rel%.xz}; dec=(xz -dc) ;;
            *.ko.zst) ensure_pkgs zstd; rel_out=${rel%.zst}; dec=(zstd -qdc) ;;
            *.ko.gz) rel_out=${rel%.gz}; dec=(gzip -dc) ;;
            *) rel_out=$rel; dec=(cat) ;;
        esac
        [[ -n ${have[$rel_out]:-} ]] && continue
        have[$rel_out]=1
        mkdir -p "$(dirname "$mdir/$rel_out")"
        "${dec[@]}" "$path" >"$mdir/$rel_out"
        strip_module_signature "$mdir/$rel_out"
        printf '%s\n' "$rel_out" >>"$mdir/qx-load-order"
    done <<<"$deps"
done
cp "$kroot/lib/modules/$krel/modules.builtin" "$mdir/"
cp "$mdir/qx-load-order" "$mdir/modules.order"
: >"$mdir/modules.builtin.modinfo"
# A modules.dep for the shipped subset, so busybox modprobe works interactively.
depmod -b "$ir" "$krel"

cat >"$ir/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
cat >"$ir/etc/group" <<'EOF'
root:x:0:
tty:x:5:
EOF
echo qx-guest >"$ir/etc/hostname"
# PID 1 is a shell script, not an init that acts on the signal plain
# poweroff/reboot/halt send it; busybox sh runs applets before $PATH, so
# functions make the interactive commands act directly.
cat >"$ir/etc/profile" <<'EOF'
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
PS1='qx-guest:\w# '
poweroff() { sync; busybox poweroff -f; }
reboot() { sync; busybox reboot -f; }
halt() { sync; busybox halt -f; }
EOF

# busybox acpid maps KEY_POWER from the "Power Button" input device to the
# event "button/power PWRF 00000080" and runs /etc/acpi/PWRF/00000080.
echo 'PWRF PWRF/00000080' >"$ir/etc/acpid.conf"
cat >"$ir/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
echo "qx-guest: power button, powering off" >/dev/console
sync
poweroff -f
EOF
chmod 755 "$ir/etc/acpi/PWRF/00000080"

cat >"$ir/init" <<'EOF'
#!/bin/sh
# Quantix test guest init. PID 1: must never exit.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname -F /etc/hostname

log() { echo "qx-init: $*"; }

kver=$(uname -r)
while read -r m; do
    insmod "/lib/modules/$kver/$m" || log "insmod $m failed (continuing)"
done <"/lib/modules/$kver/qx-load-order"

ip link set lo up

read -r cmdline </proc/cmdline
qx_ip='' qx_gw=''
set -f
for arg in $cmdline; do
    case $arg in
        qx.ip=*) qx_ip=${arg#qx.ip=} ;;
        qx.gw=*) qx_gw=${arg#qx.gw=} ;;
    esac
done
set +f
if [ -n "$qx_ip" ]; then
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 20 ]; do sleep 0.1; n=$((n + 1)); done
    if ip addr add "$qx_ip" dev eth0 && ip link set eth0 up; then
        if [ -n "$qx_gw" ]; then
            ip route add default via "$qx_gw" || log "default route via $qx_gw failed"
        fi
        log "eth0 $qx_ip${qx_gw:+ gw $qx_gw}"
    else
        log "configuring eth0 with $qx_ip failed"
    fi
fi

if [ -e /dev/input/event0 ]; then
    acpid -c /etc/acpi -l /run/acpid.log || log "acpid failed to start"
else
    log "no input devices, power button will not work"
fi

# Seed media: the cidata-labelled device, CD-ROMs, virtio disks.
seen=
for dev in $(findfs LABEL=cidata 2>/dev/null) /dev/sr* /dev/vd*; do
    [ -b "$dev" ] || continue
    case " $seen " in *" $dev "*) continue ;; esac
    seen="$seen $dev"
    name=${dev#/dev/}
    mkdir -p "/mnt/$name"
    for fs in iso9660 vfat; do
        if mount -r -t "$fs" "$dev" "/mnt/$name" 2>/dev/null; then
            set -f
            # Unquoted on purpose: one line, names separated by single spaces.
            # shellcheck disable=SC2046
            echo "QX-GUEST-MOUNT $dev $fs" $(ls -A "/mnt/$name")
            set +f
            break
        fi
    done
    rmdir "/mnt/$name" 2>/dev/null
done

case " $cmdline " in
    *" qx.debug "*) read -r up _ </proc/uptime; log "ready at ${up}s uptime" ;;
esac

console=$(cat /sys/class/tty/console/active 2>/dev/null)
console=${console##* }
[ -c "/dev/$console" ] || console=ttyS0

echo QX-GUEST-READY

# The shell runs in the foreground: an asynchronous list would start it with
# SIGINT ignored, and Ctrl-C on the serial line would not reach its commands.
while :; do
    setsid -c sh -l <>"/dev/$console" >&0 2>&1
    sleep 0.2
done
EOF
chmod 755 "$ir/init"

if [[ $EUID -eq 0 ]]; then
    mknod -m 600 "$ir/dev/console" c 5 1
    mknod -m 666 "$ir/dev/null" c 1 3
fi

log "packing initramfs"
(cd "$ir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$stage/initrd.img"
cp "$kroot/boot/vmlinuz-$krel" "$stage/vmlinuz"
extract_pvh_vmlinux "$stage/vmlinuz" "$stage/vmlinux"
echo "$guest_cmdline" >"$stage/cmdline"
echo "$script_hash" >"$stage/script-hash"
echo "$kpkg=$kver" >"$stage/kernel-package"
echo "$krel" >"$stage/kernel-release"
cp "$mdir/qx-load-order" "$stage/modules"

rm -rf "$out"
mv -T "$stage" "$out"
set_current
# Builds by other script versions: keep a week for checkouts still using them.
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
    -regex '.*/[0-9a-f]{16}' ! -name "$key" -mtime +7 -exec rm -rf {} +
log "built $out"
emit "$out"
