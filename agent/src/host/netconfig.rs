//! The management network: `network.yaml` (what qx-node owns), its validation, and the ifupdown `interfaces`
//! file rendered from it.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use qx_vmm::spec::FieldError;
use qx_vmm::ValidationErrors;
use serde::{Deserialize, Serialize};

/// Linux's `IFNAMSIZ` less the terminating NUL.
const IFNAME_MAX: usize = 15;
/// resolv.conf honours three name servers.
const DNS_MAX: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressMode {
    Dhcp,
    Static,
}

/// The management network as `network.yaml` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementNetwork {
    /// The NIC (or bond) carrying management traffic.
    pub interface: String,
    /// `None` only in requests that named no mode; validation refuses it.
    pub mode: Option<AddressMode>,
    /// Static mode: IPv4 address with prefix, `192.0.2.10/24`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    /// Static mode, optional.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// 0: untagged; else traffic goes through the VLAN subinterface `<interface>.<vlan>`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub vlan: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl ManagementNetwork {
    /// DHCP on `interface`.
    pub fn dhcp(interface: impl Into<String>) -> Self {
        Self {
            interface: interface.into(),
            mode: Some(AddressMode::Dhcp),
            address: String::new(),
            gateway: String::new(),
            vlan: 0,
            dns_servers: Vec::new(),
        }
    }

    /// What a host without `network.yaml` gets: DHCP on its first NIC (physical ones first, by name), else on
    /// `eth0`. `sys_class_net` is `/sys/class/net` under the host root.
    pub fn default_for(sys_class_net: &Path) -> Self {
        let mut names: Vec<(bool, String)> = std::fs::read_dir(sys_class_net)
            .map(|dir| {
                dir.filter_map(|entry| {
                    let entry = entry.ok()?;
                    let name = entry.file_name().into_string().ok()?;
                    let physical = entry.path().join("device").exists();
                    (name != "lo").then_some((!physical, name))
                })
                .collect()
            })
            .unwrap_or_default();
        names.sort();
        Self::dhcp(names.into_iter().next().map_or_else(|| "eth0".to_owned(), |(_, name)| name))
    }

    /// The interface that carries the address: `eth0`, or `eth0.100` with a VLAN.
    pub fn address_interface(&self) -> String {
        if self.vlan == 0 {
            self.interface.clone()
        } else {
            format!("{}.{}", self.interface, self.vlan)
        }
    }

    /// Checks every field, returning every problem. The accepted config is normalized: surrounding spaces
    /// trimmed, blank DNS entries dropped, and in DHCP mode the static-only fields cleared.
    pub fn validated(mut self) -> Result<Self, ValidationErrors> {
        let mut problems = Vec::new();
        let mut problem = |field: &str, value: &str, text: &str| {
            problems.push(FieldError { field: field.into(), value: value.into(), problem: text.into() });
        };
        for text in [&mut self.address, &mut self.gateway] {
            *text = text.trim().to_owned();
        }
        self.dns_servers = self.dns_servers.iter().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();

        if let Err(text) = check_ifname(&self.interface) {
            problem("interface", &self.interface, text);
        }
        match self.mode {
            Some(AddressMode::Static) => {
                let subnet = if self.address.is_empty() {
                    problem("address", "", "is required in static mode");
                    None
                } else {
                    parse_address(&self.address).map_err(|text| problem("address", &self.address, &text)).ok()
                };
                if !self.gateway.is_empty() {
                    match self.gateway.parse::<Ipv4Addr>() {
                        Err(_) => problem("gateway", &self.gateway, "is not an IPv4 address"),
                        Ok(gateway) => {
                            if let Some(subnet) = subnet {
                                if let Err(text) = subnet.check_gateway(gateway) {
                                    problem("gateway", &self.gateway, &text);
                                }
                            }
                        }
                    }
                }
            }
            Some(AddressMode::Dhcp) => {
                self.address.clear();
                self.gateway.clear();
            }
            None => problem("mode", "unspecified", "must be DHCP or STATIC"),
        }
        if self.vlan > 4094 {
            problem("vlan", &self.vlan.to_string(), "is outside 1..=4094");
        } else if self.vlan > 0 && check_ifname(&self.interface).is_ok() {
            let name = self.address_interface();
            if name.len() > IFNAME_MAX {
                problem(
                    "vlan",
                    &self.vlan.to_string(),
                    &format!("makes the interface name {name:?} longer than 15 bytes"),
                );
            }
        }
        if self.dns_servers.len() > DNS_MAX {
            problem("dns_servers", &self.dns_servers.join(", "), "has more than 3 servers");
        }
        for (i, server) in self.dns_servers.iter().enumerate() {
            if server.parse::<IpAddr>().is_err() {
                problem(&format!("dns_servers[{i}]"), server, "is not an IP address");
            }
        }
        if problems.is_empty() {
            Ok(self)
        } else {
            Err(ValidationErrors(problems))
        }
    }

    /// The ifupdown `interfaces` file for this (validated) config. `source` is named in the header, since edits
    /// belong there.
    pub fn render_interfaces(&self, source: &Path) -> String {
        let mut out = format!(
            "# Written by qx-node from {}; changes made here are overwritten.\n\nauto lo\niface lo inet loopback\n",
            source.display()
        );
        let carrier = self.address_interface();
        if self.vlan > 0 {
            let _ = write!(out, "\nauto {0}\niface {0} inet manual\n", self.interface);
        }
        let method = if self.mode == Some(AddressMode::Static) { "static" } else { "dhcp" };
        let _ = write!(out, "\nauto {carrier}\niface {carrier} inet {method}\n");
        if self.vlan > 0 {
            let _ = writeln!(out, "\tvlan-raw-device {}", self.interface);
        }
        if self.mode == Some(AddressMode::Static) {
            let _ = writeln!(out, "\taddress {}", self.address);
            if !self.gateway.is_empty() {
                let _ = writeln!(out, "\tgateway {}", self.gateway);
            }
        }
        if !self.dns_servers.is_empty() {
            let _ = writeln!(out, "\tdns-nameservers {}", self.dns_servers.join(" "));
        }
        out
    }

    pub fn to_yaml(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_norway::to_string(self).unwrap_or_default()
    }

    pub fn from_yaml(text: &str) -> Result<Self, String> {
        serde_norway::from_str(text).map_err(|e| e.to_string())
    }
}

/// Linux's rules for interface names (`dev_valid_name`).
fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err("must be 1-15 bytes long");
    }
    if name == "." || name == ".." {
        return Err("is not an interface name");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        return Err("must not contain '/', ':' or whitespace");
    }
    Ok(())
}

/// An IPv4 address with its prefix length.
#[derive(Debug, Clone, Copy)]
struct Subnet {
    address: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    fn mask(self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }
    fn network(self) -> u32 {
        u32::from(self.address) & self.mask()
    }
    fn broadcast(self) -> u32 {
        self.network() | !self.mask()
    }
    /// Whether `ip` is the network or broadcast address, which hosts may not use (except in /31 and /32).
    fn reserved(self, ip: Ipv4Addr) -> Option<&'static str> {
        if self.prefix >= 31 {
            None
        } else if u32::from(ip) == self.network() {
            Some("network")
        } else if u32::from(ip) == self.broadcast() {
            Some("broadcast")
        } else {
            None
        }
    }

    fn check_gateway(self, gateway: Ipv4Addr) -> Result<(), String> {
        let subnet = format!("{}/{}", Ipv4Addr::from(self.network()), self.prefix);
        if gateway == self.address {
            Err("is the address itself".into())
        } else if u32::from(gateway) & self.mask() != self.network() {
            Err(format!("is outside the subnet {subnet}"))
        } else if let Some(kind) = self.reserved(gateway) {
            Err(format!("is the {kind} address of {subnet}"))
        } else {
            Ok(())
        }
    }
}

fn parse_address(text: &str) -> Result<Subnet, String> {
    let Some((address, prefix)) = text.split_once('/') else {
        return Err(if text.parse::<Ipv4Addr>().is_ok() {
            "has no prefix length (e.g. /24)".into()
        } else {
            "is not an IPv4 address with prefix length (e.g. 192.0.2.10/24)".into()
        });
    };
    let address: Ipv4Addr =
        address.parse().map_err(|_| "is not an IPv4 address with prefix length (e.g. 192.0.2.10/24)")?;
    let prefix = match prefix.parse::<u8>() {
        Ok(prefix @ 1..=32) => prefix,
        _ => return Err("has a prefix length outside 1..=32".into()),
    };
    if address.is_unspecified() || address.is_loopback() || address.is_multicast() || address.is_broadcast() {
        return Err("is not a unicast host address".into());
    }
    let subnet = Subnet { address, prefix };
    if let Some(kind) = subnet.reserved(address) {
        return Err(format!("is the {kind} address of its subnet"));
    }
    Ok(subnet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(address: &str, gateway: &str) -> ManagementNetwork {
        ManagementNetwork {
            interface: "eth0".into(),
            mode: Some(AddressMode::Static),
            address: address.into(),
            gateway: gateway.into(),
            vlan: 0,
            dns_servers: vec!["192.0.2.53".into()],
        }
    }

    fn problems(config: ManagementNetwork) -> String {
        config.validated().unwrap_err().to_string()
    }

    #[test]
    fn a_good_static_config_passes_and_is_trimmed() {
        let mut config = net(" 192.0.2.10/24 ", "192.0.2.1");
        config.dns_servers = vec!["2001:db8::53".into(), " ".into(), "192.0.2.53 ".into()];
        let config = config.validated().unwrap();
        assert_eq!(config.address, "192.0.2.10/24");
        assert_eq!(config.dns_servers, ["2001:db8::53", "192.0.2.53"]);
        net("10.0.0.1/31", "10.0.0.0").validated().unwrap();
        net("10.0.0.1/32", "").validated().unwrap();
    }

    #[test]
    fn dhcp_drops_static_fields() {
        let mut config = net("junk", "junk");
        config.mode = Some(AddressMode::Dhcp);
        let config = config.validated().unwrap();
        assert_eq!((config.address.as_str(), config.gateway.as_str()), ("", ""));
    }

    #[test]
    fn every_problem_is_reported_with_field_and_value() {
        let mut config = net("10.0.0.5", "");
        config.vlan = 5000;
        assert_eq!(
            problems(config),
            r#"address: "10.0.0.5" has no prefix length (e.g. /24); vlan: "5000" is outside 1..=4094"#
        );

        let mut config = net("192.0.2.10/24", "198.51.100.1");
        config.interface = "eth 0".into();
        config.mode = None;
        config.dns_servers = vec!["1.1.1.1".into(), "dns.example".into(), "8.8.8.8".into(), "9.9.9.9".into()];
        assert_eq!(
            problems(config),
            "interface: \"eth 0\" must not contain '/', ':' or whitespace; mode: \"unspecified\" must be DHCP or \
             STATIC; dns_servers: \"1.1.1.1, dns.example, 8.8.8.8, 9.9.9.9\" has more than 3 servers; \
             dns_servers[1]: \"dns.example\" is not an IP address"
        );
    }

    #[test]
    fn address_rules() {
        let cases = [
            ("", "address: is required in static mode"),
            ("10.0.0.5", r#"address: "10.0.0.5" has no prefix length (e.g. /24)"#),
            ("10.0.0.5/0", r#"address: "10.0.0.5/0" has a prefix length outside 1..=32"#),
            ("10.0.0.5/33", r#"address: "10.0.0.5/33" has a prefix length outside 1..=32"#),
            ("10.0.0.5/x", r#"address: "10.0.0.5/x" has a prefix length outside 1..=32"#),
            ("fd00::5/64", r#"address: "fd00::5/64" is not an IPv4 address with prefix length (e.g. 192.0.2.10/24)"#),
            ("10.0.0.0/24", r#"address: "10.0.0.0/24" is the network address of its subnet"#),
            ("10.0.0.255/24", r#"address: "10.0.0.255/24" is the broadcast address of its subnet"#),
            ("127.0.0.1/8", r#"address: "127.0.0.1/8" is not a unicast host address"#),
            ("224.0.0.1/4", r#"address: "224.0.0.1/4" is not a unicast host address"#),
        ];
        for (address, expected) in cases {
            assert_eq!(problems(net(address, "")), expected, "{address}");
        }
    }

    #[test]
    fn gateway_rules() {
        let cases = [
            ("10.0.1.1", r#"gateway: "10.0.1.1" is outside the subnet 10.0.0.0/24"#),
            ("10.0.0.5", r#"gateway: "10.0.0.5" is the address itself"#),
            ("10.0.0.255", r#"gateway: "10.0.0.255" is the broadcast address of 10.0.0.0/24"#),
            ("10.0.0.0", r#"gateway: "10.0.0.0" is the network address of 10.0.0.0/24"#),
            ("fd00::1", r#"gateway: "fd00::1" is not an IPv4 address"#),
            ("router", r#"gateway: "router" is not an IPv4 address"#),
        ];
        for (gateway, expected) in cases {
            assert_eq!(problems(net("10.0.0.5/24", gateway)), expected, "{gateway}");
        }
        net("10.0.0.5/24", "10.0.0.1").validated().unwrap();
    }

    #[test]
    fn interface_and_vlan_rules() {
        for (name, expected) in [
            ("", "interface: must be 1-15 bytes long"),
            ("averyverylongname", r#"interface: "averyverylongname" must be 1-15 bytes long"#),
            ("eth0/1", r#"interface: "eth0/1" must not contain '/', ':' or whitespace"#),
            ("eth0:1", r#"interface: "eth0:1" must not contain '/', ':' or whitespace"#),
            ("..", r#"interface: ".." is not an interface name"#),
        ] {
            assert_eq!(problems(ManagementNetwork::dhcp(name)), expected, "{name}");
        }
        let mut config = ManagementNetwork::dhcp("enp0s31f6long");
        config.vlan = 4094;
        assert_eq!(
            problems(config),
            r#"vlan: "4094" makes the interface name "enp0s31f6long.4094" longer than 15 bytes"#
        );
        let mut config = ManagementNetwork::dhcp("bond0");
        config.vlan = 4094;
        config.validated().unwrap();
    }

    #[test]
    fn interfaces_file_rendering() {
        let source = Path::new("/etc/quantix/network.yaml");
        assert_eq!(
            ManagementNetwork::dhcp("eth0").render_interfaces(source),
            "# Written by qx-node from /etc/quantix/network.yaml; changes made here are overwritten.\n\n\
             auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet dhcp\n"
        );
        let mut config = net("192.0.2.10/24", "192.0.2.1");
        config.vlan = 100;
        config.dns_servers.push("192.0.2.54".into());
        assert_eq!(
            config.render_interfaces(source),
            "# Written by qx-node from /etc/quantix/network.yaml; changes made here are overwritten.\n\n\
             auto lo\niface lo inet loopback\n\n\
             auto eth0\niface eth0 inet manual\n\n\
             auto eth0.100\niface eth0.100 inet static\n\
             \tvlan-raw-device eth0\n\taddress 192.0.2.10/24\n\tgateway 192.0.2.1\n\
             \tdns-nameservers 192.0.2.53 192.0.2.54\n"
        );
    }

    #[test]
    fn yaml_round_trip_and_unknown_fields() {
        let config = net("192.0.2.10/24", "192.0.2.1");
        let yaml = config.to_yaml();
        assert_eq!(
            yaml,
            "interface: eth0\nmode: static\naddress: 192.0.2.10/24\ngateway: 192.0.2.1\ndns_servers:\n- 192.0.2.53\n"
        );
        assert_eq!(ManagementNetwork::from_yaml(&yaml).unwrap(), config);
        let err = ManagementNetwork::from_yaml("interface: eth0\nmode: dhcp\nmtu: 9000\n").unwrap_err();
        assert!(err.contains("mtu"), "{err}");
    }

    #[test]
    fn default_prefers_physical_nics() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ManagementNetwork::default_for(dir.path()).interface, "eth0", "no NICs at all");
        for name in ["lo", "br0", "enp3s0", "eno1"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        assert_eq!(ManagementNetwork::default_for(dir.path()).interface, "br0", "no physical NIC: first by name");
        for name in ["enp3s0", "eno1"] {
            std::fs::create_dir(dir.path().join(name).join("device")).unwrap();
        }
        assert_eq!(ManagementNetwork::default_for(dir.path()), ManagementNetwork::dhcp("eno1"));
    }
}
