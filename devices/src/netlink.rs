//! Just enough rtnetlink to set an SR-IOV VF's MAC, VLAN and spoof checking on its PF (what `ip link set PF vf N
//! mac .. vlan .. spoofchk ..` sends): one `RTM_SETLINK` carrying `IFLA_VFINFO_LIST`, acknowledged or refused with
//! an errno.

use std::io;

use rustix::net::netlink::SocketAddrNetlink;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use crate::sriov::VfNetConfig;

const RTM_SETLINK: u16 = 19;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const IFLA_VFINFO_LIST: u16 = 22;
const IFLA_VF_INFO: u16 = 1;
const IFLA_VF_MAC: u16 = 1;
const IFLA_VF_VLAN: u16 = 2;
const IFLA_VF_SPOOFCHK: u16 = 4;
const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Sends the request and waits for the kernel's answer.
pub fn set_vf(pf_ifindex: u32, vf: u32, config: &VfNetConfig) -> io::Result<()> {
    let socket = rustix::net::socket_with(AddressFamily::NETLINK, SocketType::RAW, SocketFlags::CLOEXEC, None)?;
    let request = set_vf_message(pf_ifindex, vf, config, 1);
    rustix::net::sendto(&socket, &request, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))?;
    let mut answer = vec![0u8; 8192];
    let (len, _) = rustix::net::recv(&socket, &mut answer[..], RecvFlags::empty())?;
    ack_errno(&answer[..len]).map_or(Ok(()), |errno| Err(io::Error::from_raw_os_error(errno)))
}

/// The `RTM_SETLINK` request, sequence number `seq`.
pub(crate) fn set_vf_message(pf_ifindex: u32, vf: u32, config: &VfNetConfig, seq: u32) -> Vec<u8> {
    let mut vf_info = Vec::new();
    if let Some(mac) = config.mac {
        // struct ifla_vf_mac { __u32 vf; __u8 mac[32]; }
        let mut payload = vf.to_ne_bytes().to_vec();
        payload.extend_from_slice(&mac.octets());
        payload.resize(4 + 32, 0);
        push_attr(&mut vf_info, IFLA_VF_MAC, &payload);
    }
    if let Some(vlan) = config.vlan {
        // struct ifla_vf_vlan { __u32 vf; __u32 vlan; __u32 qos; }; VLAN 0 removes the tag.
        let payload = [vf.to_ne_bytes(), u32::from(vlan).to_ne_bytes(), 0u32.to_ne_bytes()].concat();
        push_attr(&mut vf_info, IFLA_VF_VLAN, &payload);
    }
    if let Some(check) = config.spoof_check {
        // struct ifla_vf_spoofchk { __u32 vf; __u32 setting; }
        let payload = [vf.to_ne_bytes(), u32::from(check).to_ne_bytes()].concat();
        push_attr(&mut vf_info, IFLA_VF_SPOOFCHK, &payload);
    }
    let mut list = Vec::new();
    push_attr(&mut list, IFLA_VF_INFO, &vf_info);
    let mut body = Vec::new();
    // struct ifinfomsg { u8 family; u8 pad; u16 type; i32 index; u32 flags; u32 change; }
    body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    body.extend_from_slice(&(pf_ifindex as i32).to_ne_bytes());
    body.extend_from_slice(&[0; 8]);
    debug_assert_eq!(body.len(), IFINFOMSG_LEN);
    push_attr(&mut body, IFLA_VFINFO_LIST, &list);
    let mut message = Vec::with_capacity(NLMSG_HDR_LEN + body.len());
    message.extend_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
    message.extend_from_slice(&RTM_SETLINK.to_ne_bytes());
    message.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    message.extend_from_slice(&seq.to_ne_bytes());
    message.extend_from_slice(&0u32.to_ne_bytes());
    message.extend_from_slice(&body);
    message
}

/// Appends one netlink attribute (length, type, payload, padding to 4 bytes).
fn push_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    buf.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// The errno of an `NLMSG_ERROR` answer, `None` for an acknowledgement (error 0). An answer too short to read is
/// reported as `EPROTO`.
fn ack_errno(answer: &[u8]) -> Option<i32> {
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let error = answer.get(NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, error) {
        (Some(NLMSG_ERROR), Some(0)) => None,
        (Some(NLMSG_ERROR), Some(error)) => Some(-error),
        _ => Some(libc::EPROTO),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sriov::MacAddress;

    #[test]
    fn encodes_what_iproute2_sends() {
        let config = VfNetConfig {
            mac: Some("52:54:00:12:34:56".parse::<MacAddress>().unwrap()),
            vlan: Some(100),
            spoof_check: Some(true),
        };
        let message = set_vf_message(7, 3, &config, 1);
        // nlmsghdr 16 + ifinfomsg 16 + VFINFO_LIST 4 + VF_INFO 4 + MAC 4+36 + VLAN 4+12 + SPOOFCHK 4+8.
        assert_eq!(message.len(), 16 + 16 + 4 + 4 + 40 + 16 + 12);
        assert_eq!(u32::from_ne_bytes(message[0..4].try_into().unwrap()) as usize, message.len());
        assert_eq!(u16::from_ne_bytes([message[4], message[5]]), RTM_SETLINK);
        assert_eq!(i32::from_ne_bytes(message[20..24].try_into().unwrap()), 7, "the PF's ifindex");
        let mac_attr = &message[40..80];
        assert_eq!(u16::from_ne_bytes([mac_attr[2], mac_attr[3]]), IFLA_VF_MAC);
        assert_eq!(u32::from_ne_bytes(mac_attr[4..8].try_into().unwrap()), 3, "the VF index");
        assert_eq!(&mac_attr[8..14], &[0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        let vlan_attr = &message[80..96];
        assert_eq!(u16::from_ne_bytes([vlan_attr[2], vlan_attr[3]]), IFLA_VF_VLAN);
        assert_eq!(u32::from_ne_bytes(vlan_attr[8..12].try_into().unwrap()), 100);
        let only_spoof = set_vf_message(7, 3, &VfNetConfig { spoof_check: Some(false), ..Default::default() }, 2);
        assert_eq!(only_spoof.len(), 16 + 16 + 4 + 4 + 12);
    }

    #[test]
    fn reads_acks_and_errors() {
        let answer = |kind: u16, error: i32| {
            let mut a = vec![0u8; 36];
            a[4..6].copy_from_slice(&kind.to_ne_bytes());
            a[16..20].copy_from_slice(&error.to_ne_bytes());
            a
        };
        assert_eq!(ack_errno(&answer(NLMSG_ERROR, 0)), None);
        assert_eq!(ack_errno(&answer(NLMSG_ERROR, -libc::EOPNOTSUPP)), Some(libc::EOPNOTSUPP));
        assert_eq!(ack_errno(&answer(16, 0)), Some(libc::EPROTO));
        assert_eq!(ack_errno(&[1, 2]), Some(libc::EPROTO));
    }

    /// The kernel parses the request: on an interface without SR-IOV (loopback, in a network namespace of this
    /// thread's own) it answers "not supported" rather than "invalid", and on a missing interface "no device".
    #[test]
    fn the_kernel_understands_the_request() {
        let outcome = std::thread::spawn(|| {
            // SAFETY: only the network namespace is unshared, never the fd table, and only for this thread.
            if let Err(e) = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) } {
                return Err(format!("unshare(CLONE_NEWNET): {e}"));
            }
            let config = VfNetConfig { spoof_check: Some(true), ..Default::default() };
            let lo = set_vf(1, 0, &config).map_err(|e| e.raw_os_error());
            let missing = set_vf(4242, 0, &config).map_err(|e| e.raw_os_error());
            Ok((lo, missing))
        })
        .join()
        .unwrap();
        let (lo, missing) = match outcome {
            Ok(results) => results,
            Err(reason) => return qx_test_infra::skip(&reason),
        };
        assert_eq!(lo, Err(Some(libc::EOPNOTSUPP)), "loopback has no VFs");
        assert_eq!(missing, Err(Some(libc::ENODEV)));
    }
}
