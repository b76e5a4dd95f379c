# Shared by build.sh (the busybox test guest) and build-debian.sh (the Debian cloud-init guest): logging to
# stderr, apt installs on demand, and the PVH vmlinux extraction. Sourced; callers set log_prefix first and include
# this file in their cache key.

log() { printf '%s: %s\n' "${log_prefix:-qx-guest}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

apt_updated=0
apt_update_once() {
    ((apt_updated)) && return 0
    [[ $EUID -eq 0 ]] || die "apt metadata or packages are missing and updating them needs root"
    log "apt-get update"
    apt-get update -q </dev/null >&2
    apt_updated=1
}

ensure_pkgs() {
    local p missing=()
    for p in "$@"; do
        [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == *"ok installed" ]] || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    apt_update_once
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null >&2
}

# The bzImage's payload as a plain ELF. QEMU boots an ELF -kernel through its
# PVH entry point, skipping the firmware's real-mode loader and the in-guest
# decompression (~2.5 s of an XZ kernel under TCG). Optional: skipped with a
# warning if the payload cannot be found or the kernel lacks the PVH note.
extract_pvh_vmlinux() {
    local in=$1 out=$2 kind magic off dec
    for kind in xz zstd gzip; do
        case $kind in
            xz) magic=$'\xfd7zXZ'; dec=(xz -dc --single-stream) ;;
            zstd) magic=$'\x28\xb5\x2f\xfd'; dec=(zstd -qdc) ;;
            gzip) magic=$'\x1f\x8b\x08'; dec=(gzip -dc) ;;
        esac
        off=$(LC_ALL=C grep -abo -m1 "$magic" "$in" | awk -F: 'NR == 1 { print $1 }' || true)
        [[ -n $off ]] || continue
        command -v "${dec[0]}" >/dev/null || continue
        tail -c +"$((off + 1))" "$in" | "${dec[@]}" >"$out" 2>/dev/null || true
        if [[ $(head -c4 "$out" 2>/dev/null) == $'\x7fELF' ]]; then
            # An ELF note of type XEN_ELFNOTE_PHYS32_ENTRY (18) named "Xen"
            # marks the PVH entry point QEMU needs.
            if LC_ALL=C grep -qaP '\x12\x00\x00\x00Xen\x00' "$out"; then
                return 0
            fi
            log "vmlinux has no PVH note; shipping vmlinuz only"
            rm -f "$out"
            return 0
        fi
        rm -f "$out"
    done
    log "could not extract vmlinux from the bzImage; shipping vmlinuz only"
}
