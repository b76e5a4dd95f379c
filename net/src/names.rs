//! Names and addresses that end up in the kernel and in OVSDB: validation that refuses hostile input with the field
//! and the value, and the stable tap names and MAC addresses of VM NICs.
//!
//! Interface names (taps, bridges, OVS ports) become Linux netdev names, so they must fit `IFNAMSIZ` (15 bytes and a
//! NUL) and must not contain `/`, `:` or whitespace; Quantix is stricter and allows only ASCII letters, digits, `.`,
//! `_` and `-`, not first. VLAN ids are 1..=4094: 0 means "priority tag only" and 4095 is reserved by 802.1Q.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// `IFNAMSIZ` from `<linux/if.h>`, including the terminating NUL.
pub const IFNAMSIZ: usize = 16;
/// The longest interface name the kernel accepts.
pub const MAX_IFNAME_LEN: usize = IFNAMSIZ - 1;
/// The lowest usable 802.1Q VLAN id.
pub const MIN_VLAN: u16 = 1;
/// The highest usable 802.1Q VLAN id.
pub const MAX_VLAN: u16 = 4094;
/// Smallest MTU accepted: the IPv4 minimum.
pub const MIN_MTU: u32 = 68;
/// Largest MTU accepted.
pub const MAX_MTU: u32 = 65535;
/// Longest `external_ids` value (OVN logical port names are UUIDs or short names; this is generous).
pub const MAX_EXTERNAL_ID_LEN: usize = 255;

pub(crate) use qx_common::Problems;
pub use qx_common::{FieldError, ValidationErrors};

/// Checks a Linux interface name (tap, bridge, OVS port): 1..=15 bytes of ASCII letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit.
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_owned());
    }
    if name.len() > MAX_IFNAME_LEN {
        return Err(format!("is longer than {MAX_IFNAME_LEN} bytes (IFNAMSIZ)"));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".to_owned());
    }
    if name.contains(['/', ':']) {
        return Err("contains '/' or ':'".to_owned());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
        return Err("may only contain ASCII letters, digits, '.', '_' and '-'".to_owned());
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".to_owned());
    }
    Ok(())
}

/// Checks an access VLAN tag or a trunk member: 1..=4094.
pub fn check_vlan(vlan: u16) -> Result<(), String> {
    if (MIN_VLAN..=MAX_VLAN).contains(&vlan) {
        Ok(())
    } else {
        Err(format!("is outside {MIN_VLAN}..={MAX_VLAN}"))
    }
}

/// Checks an MTU: 68..=65535.
pub fn check_mtu(mtu: u32) -> Result<(), String> {
    if (MIN_MTU..=MAX_MTU).contains(&mtu) {
        Ok(())
    } else {
        Err(format!("is outside {MIN_MTU}..={MAX_MTU}"))
    }
}

/// Checks an `external_ids` key: 1..=64 bytes of ASCII letters, digits, `.`, `_`, `-`, `:`.
pub fn check_external_id_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("is empty".to_owned());
    }
    if key.len() > 64 {
        return Err("is longer than 64 bytes".to_owned());
    }
    if !key.chars().all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c)) {
        return Err("may only contain ASCII letters, digits, '.', '_', '-' and ':'".to_owned());
    }
    Ok(())
}

/// Checks an `external_ids` value such as an OVN `iface-id`: non-empty, at most 255 bytes, no whitespace or control
/// characters.
pub fn check_external_id_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".to_owned());
    }
    if value.len() > MAX_EXTERNAL_ID_LEN {
        return Err(format!("is longer than {MAX_EXTERNAL_ID_LEN} bytes"));
    }
    if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".to_owned());
    }
    Ok(())
}

/// A validated Linux interface name (see [`check_ifname`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IfName(String);

impl IfName {
    /// Validates `name`; the error names the field `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, ValidationErrors> {
        let name = name.into();
        match check_ifname(&name) {
            Ok(()) => Ok(Self(name)),
            Err(problem) => Err(ValidationErrors::one("name", &name, problem)),
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IfName {
    type Error = ValidationErrors;
    fn try_from(name: String) -> Result<Self, Self::Error> {
        Self::new(name)
    }
}

impl From<IfName> for String {
    fn from(name: IfName) -> Self {
        name.0
    }
}

impl FromStr for IfName {
    type Err = ValidationErrors;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::new(name)
    }
}

impl AsRef<str> for IfName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tap (and OVS port) name of NIC `nic_index` of VM `vm`: `qx`, 11 base32 characters of SHA-256 of the uuid
/// (55 bits), and the index as two hex digits; always 15 bytes, so it fits `IFNAMSIZ`.
///
/// The same VM and index always give the same name, across daemon restarts and hosts. Two NICs of one VM never
/// share a name. Two VMs would need a 55-bit hash collision, which cannot be provoked by choosing a uuid short of
/// ~2^55 work; and should it ever happen, [`Tap::create`](crate::tap::Tap::create) refuses to attach to an existing
/// device, so two VMs never share a tap.
pub fn tap_name(vm: &Uuid, nic_index: u8) -> IfName {
    const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let digest = Sha256::digest(vm.as_bytes());
    let bits = u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"));
    let mut name = String::with_capacity(MAX_IFNAME_LEN);
    name.push_str("qx");
    for i in 0..11 {
        let index = (bits >> (59 - 5 * i)) & 0x1f;
        name.push(char::from(BASE32[index as usize]));
    }
    name.push_str(&format!("{nic_index:02x}"));
    debug_assert!(check_ifname(&name).is_ok(), "{name}");
    IfName(name)
}

/// A MAC address. Parses `aa:bb:cc:dd:ee:ff` (either case); displays lowercase.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// The address with these octets. [`check_unicast`](Self::check_unicast) says whether a NIC may use it.
    pub const fn from_octets(octets: [u8; 6]) -> Self {
        Self(octets)
    }

    /// A random locally administered unicast address (46 random bits).
    ///
    /// Generate it once when the NIC is created and keep it with the VM: the guest binds its network configuration
    /// to it, and OVN (`attached-mac`) expects it not to change.
    pub fn random_local() -> Self {
        let random = Uuid::new_v4();
        let mut octets = [0u8; 6];
        // The uuid's version and variant bits (bytes 6 and 8) are fixed; skip them.
        octets.copy_from_slice(&random.as_bytes()[10..16]);
        octets[0] = (octets[0] & 0xfc) | 0x02;
        Self(octets)
    }

    /// The six octets.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Whether the locally administered bit is set.
    pub const fn is_local(&self) -> bool {
        self.0[0] & 0x02 != 0
    }

    /// Refuses multicast (and broadcast) and all-zero addresses, which no NIC may use.
    pub fn check_unicast(&self) -> Result<(), String> {
        if self.0[0] & 0x01 != 0 {
            return Err("is a multicast address".to_owned());
        }
        if self.0 == [0; 6] {
            return Err("is all zeros".to_owned());
        }
        Ok(())
    }
}

impl FromStr for MacAddr {
    type Err = String;

    /// The error is the problem, ready for a [`FieldError`].
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || "is not a MAC address (aa:bb:cc:dd:ee:ff)".to_owned();
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(octets))
    }
}

impl TryFrom<String> for MacAddr {
    type Error = String;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        text.parse()
    }
}

impl From<MacAddr> for String {
    fn from(mac: MacAddr) -> Self {
        mac.to_string()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// Parses and checks a NIC's MAC address as a request gave it: a unicast, non-zero address.
pub fn check_nic_mac(text: &str) -> Result<MacAddr, String> {
    let mac: MacAddr = text.parse()?;
    mac.check_unicast()?;
    Ok(mac)
}

/// Checks `macs` (field path, address as given) for addresses that do not parse, are not unicast, or appear twice
/// (compared as addresses, so `AA:..` and `aa:..` are the same). Returns every problem.
pub fn check_unique_macs<'a>(macs: impl IntoIterator<Item = (String, &'a str)>) -> Result<(), ValidationErrors> {
    let mut problems = Problems::default();
    let mut seen = HashSet::new();
    for (field, text) in macs {
        match check_nic_mac(text) {
            Err(problem) => problems.add(field, text, problem),
            Ok(mac) if !seen.insert(mac) => problems.add(field, text, "is already used by another NIC"),
            Ok(_) => {}
        }
    }
    problems.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifnames_are_checked() {
        for good in ["br0", "br-int", "qxabc.10", "a", "eth_0", "123456789012345"] {
            assert_eq!(check_ifname(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "is empty"),
            ("1234567890123456", "IFNAMSIZ"),
            ("br 0", "whitespace"),
            ("br\t0", "whitespace"),
            ("br/0", "'/'"),
            ("br:0", "':'"),
            ("../etc", "'/'"),
            ("-br", "start with"),
            (".", "start with"),
            ("bré", "ASCII"),
            ("br\0", "control"),
        ] {
            let problem = check_ifname(bad).unwrap_err();
            assert!(problem.contains(why), "{bad:?}: {problem}");
        }
    }

    #[test]
    fn ifname_error_names_field_and_value() {
        let err = IfName::new("tap 0").unwrap_err();
        assert_eq!(err.to_string(), r#"name: "tap 0" contains whitespace or control characters"#);
        assert_eq!(err.first_field(), "name");
        assert!(serde_json::from_str::<IfName>(r#""a/b""#).is_err());
        assert_eq!(serde_json::from_str::<IfName>(r#""br0""#).unwrap().as_str(), "br0");
    }

    #[test]
    fn vlans_mtus_and_ids_are_checked() {
        assert!(check_vlan(0).is_err());
        assert!(check_vlan(4095).is_err());
        assert!(check_vlan(1).is_ok() && check_vlan(4094).is_ok());
        assert_eq!(check_vlan(4095).unwrap_err(), "is outside 1..=4094");
        assert!(check_mtu(67).is_err() && check_mtu(65536).is_err() && check_mtu(1500).is_ok());
        assert!(check_external_id_key("vm-id").is_ok());
        assert!(check_external_id_key("a b").is_err() && check_external_id_key("").is_err());
        assert!(check_external_id_value("lsp-1").is_ok());
        assert!(check_external_id_value("a\nb").is_err() && check_external_id_value(&"x".repeat(256)).is_err());
    }

    #[test]
    fn tap_names_are_stable_short_and_distinct() {
        let vm = Uuid::parse_str("5b0c3c4e-55b5-4c55-9d3b-0bdfd0e7a1c2").unwrap();
        let name = tap_name(&vm, 0);
        assert_eq!(name.as_str().len(), MAX_IFNAME_LEN);
        assert!(name.as_str().starts_with("qx") && name.as_str().ends_with("00"));
        assert_eq!(tap_name(&vm, 0), name, "stable");
        assert_eq!(tap_name(&vm, 255).as_str()[13..], *"ff");
        let mut seen = HashSet::new();
        for i in 0..=255u8 {
            assert!(seen.insert(tap_name(&vm, i)), "index {i}");
        }
        for _ in 0..10_000 {
            let name = tap_name(&Uuid::new_v4(), 0);
            assert!(check_ifname(name.as_str()).is_ok(), "{name}");
            assert!(seen.insert(name));
        }
        // Uuids that differ in one bit (sequential ids) still spread.
        let a = tap_name(&Uuid::from_u128(1), 0);
        let b = tap_name(&Uuid::from_u128(2), 0);
        assert_ne!(a.as_str()[2..8], b.as_str()[2..8]);
    }

    /// A change of scheme would orphan the taps and OVS ports of running VMs across an upgrade.
    #[test]
    fn tap_name_is_pinned() {
        let vm = Uuid::from_u128(0);
        let digest = Sha256::digest(vm.as_bytes());
        assert_eq!(digest[0], 0x37, "SHA-256 of 16 zero bytes starts 374708ff");
        assert_eq!(tap_name(&vm, 1).as_str(), "qxg5dqr77xogo01");
    }

    #[test]
    fn macs_parse_display_and_generate() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        assert!(mac.is_local());
        for bad in
            ["", "52:54:00:ab:cd", "52:54:00:ab:cd:0f:00", "52-54-00-ab-cd-0f", "5:54:00:ab:cd:0f", "+5:54:00:ab:cd:0f"]
        {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert_eq!(check_nic_mac("01:00:5e:00:00:01").unwrap_err(), "is a multicast address");
        assert_eq!(check_nic_mac("ff:ff:ff:ff:ff:ff").unwrap_err(), "is a multicast address");
        assert_eq!(check_nic_mac("00:00:00:00:00:00").unwrap_err(), "is all zeros");
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let mac = MacAddr::random_local();
            assert!(mac.is_local() && mac.check_unicast().is_ok(), "{mac}");
            assert!(seen.insert(mac));
        }
        assert_eq!(serde_json::to_string(&mac).unwrap(), r#""52:54:00:ab:cd:0f""#);
    }

    #[test]
    fn duplicate_macs_are_refused_with_field_and_value() {
        let err = check_unique_macs([
            ("nics[0].mac".to_owned(), "52:54:00:00:00:01"),
            ("nics[1].mac".to_owned(), "52:54:00:00:00:01"),
            ("nics[2].mac".to_owned(), "52:54:00:00:00:0X"),
            ("nics[3].mac".to_owned(), "52:54:00:00:00:02"),
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 2);
        assert_eq!(err.0[0].to_string(), r#"nics[1].mac: "52:54:00:00:00:01" is already used by another NIC"#);
        assert_eq!(err.0[1].field, "nics[2].mac");
        assert!(check_unique_macs([("a".to_owned(), "52:54:00:00:00:01")]).is_ok());
    }
}
