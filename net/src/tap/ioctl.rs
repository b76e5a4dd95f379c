//! The ioctls behind taps, each wrapped once with its `SAFETY` argument: `TUNSETIFF`/`TUNSETPERSIST` on a
//! `/dev/net/tun` fd, and `SIOCGIFINDEX`/`SIOCGIFFLAGS`/`SIOCSIFFLAGS`/`SIOCSIFMTU`/`SIOCETHTOOL` on a datagram
//! socket, which act on the calling thread's network namespace.

use std::ffi::{c_char, c_int, c_short};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// `ETHTOOL_GDRVINFO` from `<linux/ethtool.h>`.
const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;

/// `struct ethtool_drvinfo` from `<linux/ethtool.h>`.
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [c_char; 32],
    version: [c_char; 32],
    fw_version: [c_char; 32],
    bus_info: [c_char; 32],
    erom_version: [c_char; 32],
    reserved2: [c_char; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// A zeroed `ifreq` naming `name`. The caller has checked `name` fits (`IfName` does).
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ || name.as_bytes().contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name does not fit IFNAMSIZ"));
    }
    // SAFETY: `ifreq` is plain old data (arrays, integers, a union of those and a pointer); all zeroes is a valid
    // value of every field.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as c_char;
    }
    Ok(req)
}

fn name_of(req: &libc::ifreq) -> String {
    let bytes: Vec<u8> = req.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `TUNSETIFF`: attaches `tun` to the tap `name` (creating it unless `IFF_TUN_EXCL` is set and it exists) with
/// `flags`. Returns the name the kernel gave it.
pub(super) fn tun_set_iff(tun: BorrowedFd<'_>, name: &str, flags: c_int) -> io::Result<String> {
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = flags as c_short;
    // SAFETY: `tun` is an open /dev/net/tun fd; TUNSETIFF reads and writes one `struct ifreq`, which `req` is and
    // which outlives the call.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut libc::ifreq) })?;
    Ok(name_of(&req))
}

/// `TUNSETPERSIST`: whether the device outlives its last fd.
pub(super) fn tun_set_persist(tun: BorrowedFd<'_>, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value (an int cast to the pointer-sized argument); no memory is
    // accessed.
    check(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST as _, c_int::from(persist) as libc::c_ulong) })
}

/// A socket for the interface ioctls.
fn socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(AddressFamily::INET, SocketType::DGRAM, SocketFlags::CLOEXEC, None)?)
}

/// `SIOCGIFINDEX`: the interface's index, or `ENODEV`.
pub(super) fn if_index(name: &str) -> io::Result<u32> {
    let sock = socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFINDEX reads the name from and writes the index into `req`, a valid `ifreq` alive for the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX as _, &mut req as *mut libc::ifreq) })?;
    // SAFETY: the kernel filled `ifru_ifindex`, the union member SIOCGIFINDEX writes.
    let index = unsafe { req.ifr_ifru.ifru_ifindex };
    Ok(index as u32)
}

/// Sets `IFF_UP` (keeping the other flags).
pub(super) fn set_up(name: &str) -> io::Result<()> {
    let sock = socket()?;
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS writes `ifru_flags` of `req`, a valid `ifreq` alive for the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req as *mut libc::ifreq) })?;
    // SAFETY: SIOCGIFFLAGS just filled `ifru_flags`.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as c_short };
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`, alive for the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req as *mut libc::ifreq) })
}

/// `SIOCSIFMTU`.
pub(super) fn set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let sock = socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_mtu = c_int::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: SIOCSIFMTU reads the name and `ifru_mtu` from `req`, alive for the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU as _, &mut req as *mut libc::ifreq) })
}

/// The interface's driver name through ethtool (`tun` for taps), read in the caller's network namespace (sysfs
/// would show the namespace it was mounted in).
pub(super) fn driver(name: &str) -> io::Result<String> {
    let sock = socket()?;
    // SAFETY: `EthtoolDrvinfo` is integers and char arrays; all zeroes is valid.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // SAFETY: SIOCETHTOOL with ETHTOOL_GDRVINFO writes one `struct ethtool_drvinfo` through `ifru_data`, which
    // points at `info`; both `req` and `info` outlive the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut req as *mut libc::ifreq) })?;
    let bytes: Vec<u8> = info.driver.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drvinfo_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<EthtoolDrvinfo>(), 196);
    }

    #[test]
    fn names_that_do_not_fit_are_refused_before_the_kernel() {
        assert_eq!(ifreq("0123456789abcdef").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(ifreq("a\0b").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(name_of(&ifreq("tap0").unwrap()), "tap0");
    }

    #[test]
    fn loopback_is_found_and_missing_devices_are_enodev() {
        assert!(if_index("lo").unwrap() > 0);
        assert_ne!(driver("lo").unwrap_or_default(), "tun");
        let err = if_index("qxnonexistent0").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }
}
