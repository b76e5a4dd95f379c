//! Deleting a link with one rtnetlink request (`RTM_DELLINK`), the way `ip link del` does, without running `ip`.
//! It works on taps whose fds another process (QEMU) still holds, which `TUNSETPERSIST` cannot undo.

use std::io;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const RTM_DELLINK: u16 = 17;

/// `struct nlmsghdr` + `struct ifinfomsg` naming interface `index`: an `RTM_DELLINK` request asking for an ack.
fn dellink_request(index: u32, seq: u32) -> Vec<u8> {
    let len = (NLMSG_HDRLEN + IFINFOMSG_LEN) as u32;
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&RTM_DELLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel fills in ours
    msg.push(libc::AF_UNSPEC as u8); // ifi_family
    msg.push(0); // padding
    msg.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    msg.extend_from_slice(&(index as i32).to_ne_bytes()); // ifi_index
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ifi_flags
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
    msg
}

/// Reads the errno from an `NLMSG_ERROR` reply to `seq`: `Ok(())` for an ack (error 0).
fn parse_ack(reply: &[u8], seq: u32) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink reply: {what}"));
    if reply.len() < NLMSG_HDRLEN + 4 {
        return Err(bad("too short"));
    }
    let u16_at = |i: usize| u16::from_ne_bytes([reply[i], reply[i + 1]]);
    let u32_at = |i: usize| u32::from_ne_bytes(reply[i..i + 4].try_into().expect("4 bytes"));
    if u16_at(4) != NLMSG_ERROR {
        return Err(bad("not an NLMSG_ERROR"));
    }
    if u32_at(8) != seq {
        return Err(bad("sequence number mismatch"));
    }
    let errno = u32_at(NLMSG_HDRLEN) as i32;
    if errno == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-errno))
    }
}

/// Deletes interface `index` in the calling thread's network namespace.
pub(super) fn delete_link(index: u32) -> io::Result<()> {
    let sock = rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        None, // NETLINK_ROUTE
    )?;
    let seq = 1;
    let request = dellink_request(index, seq);
    rustix::net::sendto(&sock, &request, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))?;
    let mut reply = [0u8; 1024];
    let (_, len) = rustix::net::recv(&sock, &mut reply[..], RecvFlags::empty())?;
    parse_ack(&reply[..len.min(reply.len())], seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let msg = dellink_request(7, 42);
        assert_eq!(msg.len(), 32);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), RTM_DELLINK);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 42);
        assert_eq!(i32::from_ne_bytes(msg[20..24].try_into().unwrap()), 7);
    }

    #[test]
    fn acks_and_errors_parse() {
        let reply = |errno: i32, seq: u32| {
            let mut r = Vec::new();
            r.extend_from_slice(&36u32.to_ne_bytes());
            r.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            r.extend_from_slice(&0u16.to_ne_bytes());
            r.extend_from_slice(&seq.to_ne_bytes());
            r.extend_from_slice(&0u32.to_ne_bytes());
            r.extend_from_slice(&errno.to_ne_bytes());
            r
        };
        assert!(parse_ack(&reply(0, 1), 1).is_ok());
        assert_eq!(parse_ack(&reply(-libc::ENODEV, 1), 1).unwrap_err().raw_os_error(), Some(libc::ENODEV));
        assert!(parse_ack(&reply(0, 2), 1).is_err());
        assert!(parse_ack(&[0; 8], 1).is_err());
    }

    #[test]
    fn deleting_a_missing_index_is_enodev() {
        let err = delete_link(0x7fff_fff0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    }
}
