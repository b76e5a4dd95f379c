# Shared by install-ovs.sh and install-ovn.sh (sourced, not run): finding programs where Debian puts them, and
# installing Debian packages through apt-get as root or with sudo.

# have_programs PROGRAM...: whether every program is on PATH or in /usr/bin or /usr/sbin.
have_programs() {
    local program
    for program in "$@"; do
        command -v "$program" >/dev/null 2>&1 || [ -x "/usr/bin/$program" ] || [ -x "/usr/sbin/$program" ] || return 1
    done
}

# apt_install WHO PACKAGE...: apt-get update and install without recommends, as root or through sudo; WHO names
# the calling script in errors.
apt_install() {
    local who=$1 sudo=""
    shift
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || { echo "$who: need root or sudo" >&2; exit 1; }
        sudo="sudo"
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: only Debian/Ubuntu (apt-get) is supported; install $* by hand" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -q
    $sudo apt-get install -y -q --no-install-recommends "$@"
}
