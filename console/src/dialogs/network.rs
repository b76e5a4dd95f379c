//! F2: the management network form, and the checks it runs before anything is sent.
//!
//! The checks mirror qx-node's (which runs them again): each returns the problem with the offending value, in the
//! wording qx-node uses after `field: `, so a message reads the same whichever side found it.

use std::net::{IpAddr, Ipv4Addr};

use ratatui::crossterm::event::KeyEvent;

use super::form::{Field, Form, FormKey, Status};
use super::Outcome;
use crate::host::{AddressMode, NetworkConfig};
use crate::rpc::{Request, RpcError};

/// The mode field's options, in the order ←/→ cycles them.
pub const MODES: &[&str] = &["DHCP", "static"];
/// Linux interface names are at most `IFNAMSIZ - 1` bytes.
const MAX_INTERFACE_LEN: usize = 15;
/// resolv.conf uses three name servers; qx-node refuses more.
pub const MAX_DNS_SERVERS: usize = 3;

/// An IPv4 address with its prefix length, as the address field takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    fn mask(self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0)
    }

    pub fn network(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    pub fn contains(self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// `network` or `broadcast` when `ip` is one of those, which hosts may not use (except in /31 and /32).
    pub fn reserved(self, ip: Ipv4Addr) -> Option<&'static str> {
        let host_bits = u32::from(ip) & !self.mask();
        match self.prefix {
            31.. => None,
            _ if host_bits == 0 => Some("network"),
            _ if host_bits == !self.mask() => Some("broadcast"),
            _ => None,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

pub fn check_interface(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty (the NIC or bond for management traffic, e.g. eth0)".into());
    }
    if value.len() > MAX_INTERFACE_LEN {
        return Err(format!("\"{value}\" must be 1-{MAX_INTERFACE_LEN} bytes long"));
    }
    if value == "." || value == ".." {
        return Err(format!("\"{value}\" is not an interface name"));
    }
    if value.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        return Err(format!("\"{value}\" must not contain '/', ':' or whitespace"));
    }
    Ok(())
}

pub fn check_address(value: &str) -> Result<Cidr, String> {
    const EXAMPLE: &str = "is not an IPv4 address with prefix length (e.g. 192.0.2.10/24)";
    if value.is_empty() {
        return Err("is required in static mode (e.g. 192.0.2.10/24)".into());
    }
    let Some((addr, prefix)) = value.split_once('/') else {
        return Err(match value.parse::<Ipv4Addr>() {
            Ok(_) => format!("\"{value}\" has no prefix length (e.g. /24)"),
            Err(_) => format!("\"{value}\" {EXAMPLE}"),
        });
    };
    let Ok(addr) = addr.parse::<Ipv4Addr>() else {
        return Err(format!("\"{value}\" {EXAMPLE}"));
    };
    let prefix = match prefix.parse::<u8>() {
        Ok(prefix @ 1..=32) => prefix,
        _ => return Err(format!("\"{value}\" has a prefix length outside 1..=32")),
    };
    if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast() {
        return Err(format!("\"{value}\" is not a unicast host address"));
    }
    let cidr = Cidr { addr, prefix };
    if let Some(kind) = cidr.reserved(addr) {
        return Err(format!("\"{value}\" is the {kind} address of {}/{prefix}", cidr.network()));
    }
    Ok(cidr)
}

/// An empty gateway is allowed (a management network without a route out). `address` is the checked address
/// field, when it is valid.
pub fn check_gateway(value: &str, address: Option<Cidr>) -> Result<Option<Ipv4Addr>, String> {
    if value.is_empty() {
        return Ok(None);
    }
    let Ok(gateway) = value.parse::<Ipv4Addr>() else {
        return Err(format!("\"{value}\" is not an IPv4 address"));
    };
    if let Some(address) = address {
        let subnet = format!("{}/{}", address.network(), address.prefix);
        if address.addr == gateway {
            return Err(format!("\"{value}\" is the address itself"));
        }
        if !address.contains(gateway) {
            return Err(format!("\"{value}\" is outside the subnet {subnet}"));
        }
        if let Some(kind) = address.reserved(gateway) {
            return Err(format!("\"{value}\" is the {kind} address of {subnet}"));
        }
    }
    Ok(Some(gateway))
}

/// Empty or 0 means untagged. A tagged interface is `<interface>.<vlan>`, which must still fit a Linux interface
/// name; `interface` is checked for that when given.
pub fn check_vlan(value: &str, interface: Option<&str>) -> Result<u16, String> {
    if value.is_empty() {
        return Ok(0);
    }
    let vlan = match value.parse::<u32>() {
        Ok(0) => return Ok(0),
        Ok(vlan @ 1..=4094) => u16::try_from(vlan).unwrap_or_default(),
        Ok(_) => return Err(format!("\"{value}\" is outside 1..=4094")),
        Err(_) => return Err(format!("\"{value}\" is not a VLAN id (1..=4094, 0 for untagged)")),
    };
    if let Some(interface) = interface.filter(|i| check_interface(i).is_ok()) {
        let name = format!("{interface}.{vlan}");
        if name.len() > MAX_INTERFACE_LEN {
            return Err(format!(
                "\"{value}\" makes the interface name \"{name}\" longer than {MAX_INTERFACE_LEN} bytes"
            ));
        }
    }
    Ok(vlan)
}

/// Comma-separated IPv4 or IPv6 addresses, at most [`MAX_DNS_SERVERS`]; blanks around commas do not matter, and
/// none at all is allowed.
pub fn check_dns(value: &str) -> Result<Vec<String>, String> {
    let mut servers = Vec::new();
    let mut bad = Vec::new();
    for server in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match server.parse::<IpAddr>() {
            Ok(ip) => servers.push(ip.to_string()),
            Err(_) => bad.push(format!("\"{server}\"")),
        }
    }
    match bad.len() {
        0 if servers.len() > MAX_DNS_SERVERS => {
            Err(format!("\"{}\" has more than {MAX_DNS_SERVERS} servers", servers.join(", ")))
        }
        0 => Ok(servers),
        1 => Err(format!("{} is not an IP address", bad[0])),
        _ => Err(format!("{} are not IP addresses", bad.join(", "))),
    }
}

/// The fields with checks, in form order.
const CHECKED: [&str; 5] = ["interface", "address", "gateway", "vlan", "dns_servers"];

/// The F2 dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDialog {
    pub form: Form,
    /// Until `GetNetworkConfig` answers.
    pub loading: bool,
}

impl NetworkDialog {
    /// Opens the form with what the main screen knows (`current`), asking qx-node for the file's contents.
    pub fn open(current: Option<&NetworkConfig>) -> (Self, Request) {
        let form = Form::new(vec![
            Field::text("interface", "Interface", ""),
            Field::choice("mode", "Mode", MODES, "DHCP"),
            Field::text("address", "Address", "").with_hint("with prefix, e.g. 192.0.2.10/24"),
            Field::text("gateway", "Gateway", "").with_hint("optional"),
            Field::text("vlan", "VLAN", "0").with_hint("0 = untagged"),
            Field::text("dns_servers", "DNS servers", "").with_hint("comma separated"),
        ]);
        let mut dialog = Self { form, loading: true };
        dialog.fill(current.cloned().unwrap_or_default());
        dialog.form.status = Status::Pending("Reading the current configuration...".into());
        (dialog, Request::GetNetworkConfig)
    }

    fn fill(&mut self, net: NetworkConfig) {
        let form = &mut self.form;
        form.set_value("interface", net.interface);
        form.set_value("mode", net.mode.label());
        form.set_value("address", net.address);
        form.set_value("gateway", net.gateway);
        form.set_value("vlan", net.vlan.to_string());
        form.set_value("dns_servers", net.dns_servers.join(", "));
        self.sync_mode();
    }

    fn mode(&self) -> AddressMode {
        if self.form.value("mode") == "static" {
            AddressMode::Static
        } else {
            AddressMode::Dhcp
        }
    }

    /// Address and gateway only mean something in static mode.
    fn sync_mode(&mut self) {
        let is_static = self.mode() == AddressMode::Static;
        self.form.set_enabled("address", is_static);
        self.form.set_enabled("gateway", is_static);
    }

    /// `GetNetworkConfig` answered: fill the form, unless the operator already started typing.
    pub fn on_loaded(&mut self, result: Result<NetworkConfig, RpcError>) {
        self.loading = false;
        self.form.status = Status::Editing;
        match result {
            Ok(net) if !self.form.touched => self.fill(net),
            Ok(_) => {}
            Err(err) => self.form.status = Status::Failed(format!("Cannot read the current configuration: {err}")),
        }
    }

    /// `SetNetworkConfig` was refused; a validation message goes onto the fields it names.
    pub fn on_refused(&mut self, error: &RpcError) {
        self.form.on_refused(error, "qx-node refused the configuration");
    }

    /// The problem with field `name` as it stands, if any.
    fn check(&self, name: &str) -> Option<String> {
        let value = self.form.value(name).trim();
        let result = match name {
            "interface" => check_interface(value),
            "address" => check_address(value).map(drop),
            "gateway" => check_gateway(value, check_address(self.form.value("address").trim()).ok()).map(drop),
            "vlan" => check_vlan(value, Some(self.form.value("interface").trim())).map(drop),
            "dns_servers" => check_dns(value).map(drop),
            _ => Ok(()),
        };
        result.err()
    }

    fn recheck(&mut self, name: &str) {
        if self.form.field(name).is_some_and(|f| f.enabled) {
            let error = self.check(name);
            self.form.set_error(name, error);
        }
    }

    /// Checks every field; the configuration to send when all pass.
    pub fn validate(&mut self) -> Option<NetworkConfig> {
        for name in CHECKED {
            self.recheck(name);
        }
        if self.form.has_errors() {
            if let Some(first) = self.form.fields.iter().position(|f| f.error.is_some()) {
                self.form.focus = first;
            }
            return None;
        }
        let value = |name| self.form.value(name).trim().to_owned();
        let is_static = self.mode() == AddressMode::Static;
        Some(NetworkConfig {
            interface: value("interface"),
            mode: self.mode(),
            address: if is_static { value("address") } else { String::new() },
            gateway: if is_static { value("gateway") } else { String::new() },
            vlan: check_vlan(&value("vlan"), None).unwrap_or_default(),
            dns_servers: check_dns(&value("dns_servers")).unwrap_or_default(),
        })
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        match self.form.on_key(key) {
            FormKey::Cancel => Outcome::Close,
            FormKey::Ignored => Outcome::Stay,
            FormKey::Edited("mode") => {
                self.sync_mode();
                Outcome::Stay
            }
            FormKey::Edited(name) => {
                // A field in error is checked as it is typed, so the message goes as soon as the value is right.
                if self.form.field(name).is_some_and(|f| f.error.is_some()) {
                    self.recheck(name);
                }
                Outcome::Stay
            }
            FormKey::Left(name) => {
                self.recheck(name);
                // The gateway depends on the address, the VLAN on the interface name.
                if name == "address" && !self.form.value("gateway").is_empty() {
                    self.recheck("gateway");
                }
                if name == "interface" && self.form.value("vlan").trim().parse::<u32>().is_ok_and(|v| v > 0) {
                    self.recheck("vlan");
                }
                Outcome::Stay
            }
            FormKey::Submit => match self.validate() {
                Some(net) => {
                    self.form.status = Status::Pending("Applying...".into());
                    Outcome::Call(Request::SetNetworkConfig(net))
                }
                None => Outcome::Stay,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::{KeyCode, KeyModifiers};

    use super::*;
    use crate::dialogs::key;

    fn type_text(dialog: &mut NetworkDialog, text: &str) {
        dialog.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
        for c in text.chars() {
            dialog.on_key(key(KeyCode::Char(c)));
        }
    }

    fn focus(dialog: &mut NetworkDialog, name: &str) {
        while dialog.form.focused().unwrap().name != name {
            dialog.on_key(key(KeyCode::Tab));
        }
    }

    fn loaded_static() -> NetworkDialog {
        let (mut dialog, request) = NetworkDialog::open(None);
        assert_eq!(request, Request::GetNetworkConfig);
        dialog.on_loaded(Ok(NetworkConfig {
            interface: "eth0".into(),
            mode: AddressMode::Static,
            address: "10.0.0.5/24".into(),
            gateway: "10.0.0.1".into(),
            vlan: 0,
            dns_servers: vec!["10.0.0.53".into()],
        }));
        dialog
    }

    #[test]
    fn address_checks() {
        assert_eq!(check_address("10.0.0.5/24"), Ok(Cidr { addr: Ipv4Addr::new(10, 0, 0, 5), prefix: 24 }));
        assert_eq!(check_address("10.0.0.5").unwrap_err(), "\"10.0.0.5\" has no prefix length (e.g. /24)");
        let not_cidr = "is not an IPv4 address with prefix length (e.g. 192.0.2.10/24)";
        assert_eq!(check_address("10.0.0/24").unwrap_err(), format!("\"10.0.0/24\" {not_cidr}"));
        assert_eq!(check_address("eth0").unwrap_err(), format!("\"eth0\" {not_cidr}"));
        assert_eq!(check_address("10.0.0.5/33").unwrap_err(), "\"10.0.0.5/33\" has a prefix length outside 1..=32");
        assert_eq!(check_address("10.0.0.5/0").unwrap_err(), "\"10.0.0.5/0\" has a prefix length outside 1..=32");
        assert_eq!(check_address("10.0.0.0/24").unwrap_err(), "\"10.0.0.0/24\" is the network address of 10.0.0.0/24");
        assert_eq!(
            check_address("10.0.0.255/24").unwrap_err(),
            "\"10.0.0.255/24\" is the broadcast address of 10.0.0.0/24"
        );
        assert_eq!(check_address("127.0.0.1/8").unwrap_err(), "\"127.0.0.1/8\" is not a unicast host address");
        assert!(check_address("10.0.0.0/31").is_ok(), "point-to-point links have no network address");
        assert!(check_address("10.0.0.7/32").is_ok());
        assert_eq!(check_address("").unwrap_err(), "is required in static mode (e.g. 192.0.2.10/24)");
    }

    #[test]
    fn gateway_checks() {
        let address = check_address("10.0.0.5/24").ok();
        assert_eq!(check_gateway("", address), Ok(None));
        assert_eq!(check_gateway("10.0.0.1", address), Ok(Some(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(check_gateway("10.0.1.1", address).unwrap_err(), "\"10.0.1.1\" is outside the subnet 10.0.0.0/24");
        assert_eq!(check_gateway("10.0.0.5", address).unwrap_err(), "\"10.0.0.5\" is the address itself");
        assert_eq!(
            check_gateway("10.0.0.0", address).unwrap_err(),
            "\"10.0.0.0\" is the network address of 10.0.0.0/24"
        );
        assert_eq!(check_gateway("gw", address).unwrap_err(), "\"gw\" is not an IPv4 address");
        assert_eq!(check_gateway("10.9.9.9", None), Ok(Some(Ipv4Addr::new(10, 9, 9, 9))), "no address to compare with");
    }

    #[test]
    fn vlan_dns_and_interface_checks() {
        assert_eq!(check_vlan("", None), Ok(0));
        assert_eq!(check_vlan("0", None), Ok(0));
        assert_eq!(check_vlan("4094", Some("eth0")), Ok(4094));
        assert_eq!(check_vlan("5000", None).unwrap_err(), "\"5000\" is outside 1..=4094");
        assert_eq!(check_vlan("ten", None).unwrap_err(), "\"ten\" is not a VLAN id (1..=4094, 0 for untagged)");
        assert_eq!(
            check_vlan("100", Some("enp129s0f1np1")).unwrap_err(),
            "\"100\" makes the interface name \"enp129s0f1np1.100\" longer than 15 bytes"
        );
        assert_eq!(check_dns(" 1.1.1.1 ,2606:4700::1111,, "), Ok(vec!["1.1.1.1".into(), "2606:4700::1111".into()]));
        assert_eq!(check_dns(""), Ok(vec![]));
        assert_eq!(check_dns("1.1.1.1, 8.8.8").unwrap_err(), "\"8.8.8\" is not an IP address");
        assert_eq!(check_dns("a, b").unwrap_err(), "\"a\", \"b\" are not IP addresses");
        assert_eq!(
            check_dns("1.1.1.1,1.0.0.1,8.8.8.8,8.8.4.4").unwrap_err(),
            "\"1.1.1.1, 1.0.0.1, 8.8.8.8, 8.8.4.4\" has more than 3 servers"
        );
        assert!(check_interface("eth0").is_ok());
        assert!(check_interface("bond0.100").is_ok());
        assert_eq!(check_interface("a-very-long-name0").unwrap_err(), "\"a-very-long-name0\" must be 1-15 bytes long");
        assert_eq!(check_interface("eth 0").unwrap_err(), "\"eth 0\" must not contain '/', ':' or whitespace");
    }

    #[test]
    fn prefill_and_submit() {
        let mut dialog = loaded_static();
        assert!(!dialog.loading);
        assert_eq!(dialog.form.status, Status::Editing);
        assert_eq!(dialog.form.value("dns_servers"), "10.0.0.53");
        focus(&mut dialog, "vlan");
        type_text(&mut dialog, "42");
        let Outcome::Call(Request::SetNetworkConfig(net)) = dialog.on_key(key(KeyCode::Enter)) else { panic!() };
        assert_eq!(net.describe(), "eth0, static 10.0.0.5/24, VLAN 42");
        assert_eq!(net.gateway, "10.0.0.1");
        assert!(dialog.form.is_pending());
    }

    #[test]
    fn dhcp_drops_and_skips_the_static_fields() {
        let mut dialog = loaded_static();
        focus(&mut dialog, "mode");
        dialog.on_key(key(KeyCode::Left));
        assert_eq!(dialog.form.value("mode"), "DHCP");
        assert!(!dialog.form.field("address").unwrap().enabled);
        dialog.on_key(key(KeyCode::Tab));
        assert_eq!(dialog.form.focused().unwrap().name, "vlan");
        let Outcome::Call(Request::SetNetworkConfig(net)) = dialog.on_key(key(KeyCode::Enter)) else { panic!() };
        assert_eq!((net.mode, net.address.as_str(), net.gateway.as_str()), (AddressMode::Dhcp, "", ""));
    }

    /// Each bad value gets its message on its field, and nothing is sent.
    #[test]
    fn bad_input_is_shown_inline_and_nothing_is_sent() {
        let cases = [
            ("address", "10.0.0.5", "\"10.0.0.5\" has no prefix length (e.g. /24)"),
            ("gateway", "10.0.1.1", "\"10.0.1.1\" is outside the subnet 10.0.0.0/24"),
            ("vlan", "5000", "\"5000\" is outside 1..=4094"),
            ("dns_servers", "1.1.1.1, 8.8.8", "\"8.8.8\" is not an IP address"),
            ("interface", "", "is empty (the NIC or bond for management traffic, e.g. eth0)"),
        ];
        for (name, value, message) in cases {
            let mut dialog = loaded_static();
            focus(&mut dialog, name);
            type_text(&mut dialog, value);
            assert_eq!(dialog.on_key(key(KeyCode::Enter)), Outcome::Stay, "{name}");
            assert_eq!(dialog.form.field(name).unwrap().error.as_deref(), Some(message), "{name}");
            assert_eq!(dialog.form.focused().unwrap().name, name, "focus goes to the bad field");
            assert!(!dialog.form.is_pending());
        }
    }

    #[test]
    fn fields_are_checked_on_leaving_and_cleared_when_fixed() {
        let mut dialog = loaded_static();
        focus(&mut dialog, "address");
        type_text(&mut dialog, "10.0.0.5");
        assert_eq!(dialog.form.field("address").unwrap().error, None, "not while typing");
        dialog.on_key(key(KeyCode::Tab));
        assert!(dialog.form.field("address").unwrap().error.is_some(), "checked when focus leaves");
        dialog.on_key(key(KeyCode::BackTab));
        for c in "/24".chars() {
            dialog.on_key(key(KeyCode::Char(c)));
        }
        assert_eq!(dialog.form.field("address").unwrap().error, None, "gone once fixed");
        // A new address puts the gateway outside: leaving the address rechecks the gateway.
        type_text(&mut dialog, "10.1.0.5/24");
        dialog.on_key(key(KeyCode::Tab));
        assert_eq!(
            dialog.form.field("gateway").unwrap().error.as_deref(),
            Some("\"10.0.0.1\" is outside the subnet 10.1.0.0/24")
        );
    }

    #[test]
    fn server_refusals_map_onto_fields() {
        let mut dialog = loaded_static();
        assert!(matches!(dialog.on_key(key(KeyCode::Enter)), Outcome::Call(_)));
        dialog.on_refused(&RpcError::new(
            tonic::Code::InvalidArgument,
            "interface: \"eth9\" does not exist; vlan: \"5000\" is outside 1..=4094",
        ));
        assert_eq!(dialog.form.status, Status::Editing);
        assert_eq!(dialog.form.field("interface").unwrap().error.as_deref(), Some("\"eth9\" does not exist"));
        assert_eq!(dialog.form.field("vlan").unwrap().error.as_deref(), Some("\"5000\" is outside 1..=4094"));
        assert_eq!(dialog.form.focused().unwrap().name, "interface");
        dialog.on_refused(&RpcError::new(tonic::Code::Internal, "apply command failed: exit status 1"));
        assert_eq!(
            dialog.form.status,
            Status::Failed("qx-node refused the configuration: apply command failed: exit status 1".into())
        );
    }

    #[test]
    fn a_late_prefill_keeps_what_the_operator_typed() {
        let (mut dialog, _) = NetworkDialog::open(None);
        // Keys wait while the form loads; should an answer come late anyway, typing wins.
        dialog.form.status = Status::Editing;
        type_text(&mut dialog, "eth7");
        dialog.on_loaded(Ok(NetworkConfig { interface: "eth0".into(), ..NetworkConfig::default() }));
        assert_eq!(dialog.form.value("interface"), "eth7");
        let (mut dialog, _) = NetworkDialog::open(None);
        dialog.on_loaded(Err(RpcError::new(tonic::Code::Unimplemented, "Unimplemented")));
        assert_eq!(dialog.form.status, Status::Failed("Cannot read the current configuration: Unimplemented".into()));
    }
}
