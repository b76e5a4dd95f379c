//! What callers ask OVN for, checked before anything is written: switches with a subnet and DHCP, ports with
//! addresses, ACLs. Every problem is reported with its field and value.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{
    check_external_id_key, check_external_id_value, check_nic_mac, check_vlan, Problems, ValidationErrors,
};

/// Longest OVN name accepted (logical switch, port, port group, localnet network).
pub const MAX_NAME_LEN: usize = 63;
/// Default DHCP lease: one hour.
pub const DEFAULT_LEASE_SECONDS: u32 = 3600;

/// Checks an OVN object name: 1..=63 ASCII letters, digits, `_`, `-`, `.`, starting with a letter or digit. Port
/// group names are also used in ACL matches (`@name`), where `-` and `.` are not allowed: see
/// [`check_port_group_name`].
pub fn check_ovn_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} bytes"));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("must start with a letter or digit".into());
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("contains {bad:?}; only letters, digits, '_', '-' and '.' are allowed"));
    }
    Ok(())
}

/// Checks a port group name: 1..=63 ASCII letters, digits and `_`, starting with a letter (it appears in ACL
/// matches as `@name`).
pub fn check_port_group_name(name: &str) -> Result<(), String> {
    check_ovn_name(name)?;
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return Err("must start with a letter".into());
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_')) {
        return Err(format!("contains {bad:?}; only letters, digits and '_' are allowed"));
    }
    Ok(())
}

/// An IPv4 subnet, `a.b.c.d/len`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `network/prefix`; refuses host bits and prefixes over 32.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if prefix > 32 {
            return Err(format!("prefix /{prefix} is over 32"));
        }
        let cidr = Self { network, prefix };
        if u32::from(network) & !cidr.mask() != 0 {
            return Err(format!("has host bits set (the network is {}/{prefix})", cidr.masked()));
        }
        Ok(cidr)
    }

    fn mask(self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    fn masked(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) & self.mask())
    }

    pub fn network(self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(self) -> u8 {
        self.prefix
    }

    /// The broadcast address.
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !self.mask())
    }

    /// Whether `addr` is in the subnet.
    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network)
    }

    /// Whether `addr` is a usable host address: in the subnet, neither its network nor its broadcast address
    /// (for prefixes up to /30).
    pub fn is_host(self, addr: Ipv4Addr) -> bool {
        self.contains(addr) && (self.prefix >= 31 || (addr != self.network && addr != self.broadcast()))
    }

    /// The `index`-th address of the subnet (`.1` for 1), if inside it.
    pub fn nth(self, index: u32) -> Option<Ipv4Addr> {
        let addr = Ipv4Addr::from(u32::from(self.network).checked_add(index)?);
        self.contains(addr).then_some(addr)
    }

    /// Whether the two subnets share any address.
    pub fn overlaps(self, other: Ipv4Cidr) -> bool {
        let prefix = self.prefix.min(other.prefix);
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, prefix) = text.split_once('/').ok_or("is not a.b.c.d/len")?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("prefix {prefix:?} is not a number"))?;
        Self::new(addr, prefix)
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e| serde::de::Error::custom(format!("{text:?} {e}")))
    }
}

/// OVN's native DHCP for a switch's subnet (a `DHCP_Options` row; ovn-controller answers on every chassis).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSpec {
    /// The default gateway handed out; none: no `router` option. Must be a host of the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<Ipv4Addr>,
    /// Lease time in seconds, 60..=2^31-1. Default: 3600.
    #[serde(default = "default_lease")]
    pub lease_seconds: u32,
    /// DNS servers handed out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<Ipv4Addr>,
    /// Interface MTU handed out, 68..=65535; none: not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

fn default_lease() -> u32 {
    DEFAULT_LEASE_SECONDS
}

impl Default for DhcpSpec {
    fn default() -> Self {
        Self { router: None, lease_seconds: DEFAULT_LEASE_SECONDS, dns_servers: Vec::new(), mtu: None }
    }
}

/// A localnet port: the switch also reaches a physical network (ovn-bridge-mappings name), optionally on a VLAN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalnetSpec {
    /// The physical network name (`options:network_name`), as the chassis map it to bridges.
    pub network: String,
    /// VLAN 1..=4094; none: untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
}

/// A logical switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchSpec {
    /// Unique name.
    pub name: String,
    /// Its IPv4 subnet (`other_config:subnet`, which also lets OVN hand out dynamic addresses). Must not overlap
    /// another switch's. Required for DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Cidr>,
    /// OVN DHCP on the subnet; none: no DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpSpec>,
    /// A localnet port to a physical network; none: overlay only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localnet: Option<LocalnetSpec>,
    /// Other `external_ids` pairs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external_ids: BTreeMap<String, String>,
}

impl SwitchSpec {
    /// A switch with neither subnet nor DHCP.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into(), subnet: None, dhcp: None, localnet: None, external_ids: BTreeMap::new() }
    }

    /// Every problem, with the field and the value.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        p.check("name", &self.name, check_ovn_name(&self.name));
        if let Some(subnet) = self.subnet {
            if subnet.prefix() > 30 {
                p.add("subnet", subnet, "is smaller than a /30: no room for hosts");
            }
        }
        if let Some(dhcp) = &self.dhcp {
            match self.subnet {
                None => p.add("dhcp", "set", "needs a subnet"),
                Some(subnet) => {
                    if let Some(router) = dhcp.router {
                        if !subnet.is_host(router) {
                            p.add("dhcp.router", router, format!("is not a host address of subnet {subnet}"));
                        }
                    }
                }
            }
            if !(60..=i32::MAX as u32).contains(&dhcp.lease_seconds) {
                p.add("dhcp.lease_seconds", dhcp.lease_seconds, "is outside 60..=2147483647");
            }
            if let Some(mtu) = dhcp.mtu {
                p.check("dhcp.mtu", mtu, crate::names::check_mtu(mtu));
            }
            for (i, dns) in dhcp.dns_servers.iter().enumerate() {
                if dns.is_unspecified() || dns.is_broadcast() || dns.is_multicast() {
                    p.add(format!("dhcp.dns_servers[{i}]"), dns, "is not a unicast address");
                }
            }
        }
        if let Some(localnet) = &self.localnet {
            p.check("localnet.network", &localnet.network, check_ovn_name(&localnet.network));
            if let Some(vlan) = localnet.vlan {
                p.check("localnet.vlan", vlan, check_vlan(vlan));
            }
        }
        check_ids(&mut p, "external_ids", &self.external_ids);
        p.into_result()
    }
}

/// How a port gets its IPv4 address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "mode", content = "address", deny_unknown_fields)]
pub enum PortAddress {
    /// No IP: only the MAC is known to OVN (no DHCP, port security on the MAC only).
    #[default]
    None,
    /// OVN picks a free address of the switch's subnet (`dynamic`), handed out by DHCP when the switch has it.
    Dynamic,
    /// This address, which must be a free host address of the switch's subnet.
    Static(Ipv4Addr),
}

/// A VM's logical switch port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Unique name; what the chassis's OVS interface carries as `external_ids:iface-id`.
    pub name: String,
    /// The NIC's MAC (unicast).
    pub mac: String,
    /// Its IPv4 address.
    #[serde(default)]
    pub address: PortAddress,
    /// Port security: only the MAC (and IP, when known) may send from the port. Default: on.
    #[serde(default = "default_true")]
    pub port_security: bool,
    /// The chassis that should bind it (`options:requested-chassis`); none: whichever claims it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_chassis: Option<String>,
    /// Port groups (each must exist) the port joins in the transaction that creates it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_groups: Vec<String>,
    /// Other `external_ids` pairs (`vm-id`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external_ids: BTreeMap<String, String>,
}

fn default_true() -> bool {
    true
}

impl PortSpec {
    /// A port with port security and no IP.
    pub fn new(name: impl Into<String>, mac: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            mac: mac.into(),
            address: PortAddress::None,
            port_security: true,
            requested_chassis: None,
            port_groups: Vec::new(),
            external_ids: BTreeMap::new(),
        }
    }

    pub(crate) fn validate_into(&self, p: &mut Problems, prefix: &str) {
        p.check(format!("{prefix}name"), &self.name, check_ovn_name(&self.name));
        p.check(format!("{prefix}mac"), &self.mac, check_nic_mac(&self.mac).map(drop));
        if let Some(chassis) = &self.requested_chassis {
            p.check(format!("{prefix}requested_chassis"), chassis, check_ovn_name(chassis));
        }
        for (i, group) in self.port_groups.iter().enumerate() {
            p.check(format!("{prefix}port_groups[{i}]"), group, check_port_group_name(group));
        }
        check_ids(p, &format!("{prefix}external_ids"), &self.external_ids);
    }

    /// Every problem that needs no database, with the field and the value.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        self.validate_into(&mut p, "");
        p.into_result()
    }

    /// The MAC as OVN writes it (lower case).
    pub(crate) fn mac_lower(&self) -> String {
        self.mac.to_ascii_lowercase()
    }

    /// The `addresses` column.
    pub(crate) fn addresses(&self) -> String {
        match self.address {
            PortAddress::None => self.mac_lower(),
            PortAddress::Dynamic => format!("{} dynamic", self.mac_lower()),
            PortAddress::Static(ip) => format!("{} {ip}", self.mac_lower()),
        }
    }

    /// The `port_security` column (one entry), if on.
    pub(crate) fn port_security_entry(&self) -> Option<String> {
        self.port_security.then(|| match self.address {
            PortAddress::Static(ip) => format!("{} {ip}", self.mac_lower()),
            PortAddress::None | PortAddress::Dynamic => self.mac_lower(),
        })
    }
}

/// Which way an ACL looks at traffic, as OVN names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AclDirection {
    /// Traffic entering the logical switch from a port: what a VM sends (egress from the VM).
    #[serde(rename = "from-lport")]
    FromLport,
    /// Traffic leaving the logical switch to a port: what a VM receives (ingress to the VM).
    #[serde(rename = "to-lport")]
    ToLport,
}

impl AclDirection {
    pub fn as_str(self) -> &'static str {
        match self {
            AclDirection::FromLport => "from-lport",
            AclDirection::ToLport => "to-lport",
        }
    }
}

/// What an ACL does with matching traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AclAction {
    Allow,
    /// Allow, and the replies of the connection too (conntrack).
    AllowRelated,
    Drop,
    Reject,
}

impl AclAction {
    pub fn as_str(self) -> &'static str {
        match self {
            AclAction::Allow => "allow",
            AclAction::AllowRelated => "allow-related",
            AclAction::Drop => "drop",
            AclAction::Reject => "reject",
        }
    }
}

/// An ACL on a port group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclSpec {
    pub direction: AclDirection,
    /// 0..=32767; higher wins.
    pub priority: u16,
    /// An OVN match expression (`outport == @pg && tcp.dst == 22`).
    #[serde(rename = "match")]
    pub match_: String,
    pub action: AclAction,
    /// Other `external_ids` pairs (the security group rule it renders, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external_ids: BTreeMap<String, String>,
}

impl AclSpec {
    pub(crate) fn validate_into(&self, p: &mut Problems, prefix: &str) {
        if self.priority > 32767 {
            p.add(format!("{prefix}priority"), self.priority, "is outside 0..=32767");
        }
        if self.match_.trim().is_empty() {
            p.add(format!("{prefix}match"), &self.match_, "is empty");
        } else if self.match_.len() > 4096 || self.match_.contains(['\n', '\r', '\0']) {
            p.add(format!("{prefix}match"), &self.match_, "is longer than 4096 bytes or holds control characters");
        }
        check_ids(p, &format!("{prefix}external_ids"), &self.external_ids);
    }
}

fn check_ids(p: &mut Problems, field: &str, ids: &BTreeMap<String, String>) {
    for (key, value) in ids {
        p.check(format!("{field}.{key}"), key, check_external_id_key(key));
        p.check(format!("{field}.{key}"), value, check_external_id_value(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_compare() {
        let a: Ipv4Cidr = "10.1.0.0/24".parse().unwrap();
        assert_eq!(a.to_string(), "10.1.0.0/24");
        assert!(a.is_host("10.1.0.1".parse().unwrap()));
        assert!(!a.is_host("10.1.0.0".parse().unwrap()));
        assert!(!a.is_host("10.1.0.255".parse().unwrap()));
        assert!(!a.contains("10.1.1.1".parse().unwrap()));
        assert_eq!(a.nth(1), Some("10.1.0.1".parse().unwrap()));
        assert_eq!(a.nth(256), None);
        assert!(a.overlaps("10.1.0.128/25".parse().unwrap()));
        assert!(a.overlaps("10.0.0.0/8".parse().unwrap()));
        assert!(!a.overlaps("10.1.1.0/24".parse().unwrap()));
        for bad in ["10.1.0.1/24", "10.1.0.0/33", "10.1.0/24", "10.1.0.0", "x/24"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn switch_specs_name_every_bad_field() {
        let spec = SwitchSpec {
            name: "bad name".into(),
            subnet: Some("10.2.0.0/31".parse().unwrap()),
            dhcp: Some(DhcpSpec {
                router: Some("10.9.0.1".parse().unwrap()),
                lease_seconds: 5,
                dns_servers: vec!["0.0.0.0".parse().unwrap()],
                mtu: Some(10),
            }),
            localnet: Some(LocalnetSpec { network: "".into(), vlan: Some(4095) }),
            external_ids: BTreeMap::new(),
        };
        let err = spec.validate().unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "name",
                "subnet",
                "dhcp.router",
                "dhcp.lease_seconds",
                "dhcp.mtu",
                "dhcp.dns_servers[0]",
                "localnet.network",
                "localnet.vlan"
            ]
        );
        let no_subnet = SwitchSpec { dhcp: Some(DhcpSpec::default()), ..SwitchSpec::new("s") };
        assert_eq!(no_subnet.validate().unwrap_err().first_field(), "dhcp");
    }

    #[test]
    fn port_columns() {
        let mut port = PortSpec::new("p1", "52:54:00:AA:bb:01");
        assert_eq!(port.addresses(), "52:54:00:aa:bb:01");
        port.address = PortAddress::Static("10.0.0.5".parse().unwrap());
        assert_eq!(port.addresses(), "52:54:00:aa:bb:01 10.0.0.5");
        assert_eq!(port.port_security_entry().unwrap(), "52:54:00:aa:bb:01 10.0.0.5");
        port.address = PortAddress::Dynamic;
        assert_eq!(port.addresses(), "52:54:00:aa:bb:01 dynamic");
        let bad = PortSpec { requested_chassis: Some("a b".into()), ..PortSpec::new("", "ff:ff:ff:ff:ff:ff") };
        let fields: Vec<String> = bad.validate().unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["name", "mac", "requested_chassis"]);
    }

    #[test]
    fn port_group_names_fit_matches() {
        assert!(check_port_group_name("qx_sg_web").is_ok());
        assert!(check_port_group_name("qx-sg").is_err());
        assert!(check_port_group_name("1abc").is_err());
    }
}
