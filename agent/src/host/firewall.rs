//! The host firewall's open ports, from the node's configuration. The ruleset (`overlay/usr/share/quantix/
//! firewall.nft`, table `inet quantix_filter`) drops inbound traffic and accepts TCP and UDP only to the ports in
//! its sets `tcp_ports`, `udp_ports` and `ssh_ports`. `qx-node --firewall-ports` prints the nft commands that fill
//! the first two with exactly what this node serves, which `/etc/init.d/firewall` feeds to `nft` after loading the
//! ruleset; `ssh_ports` holds 22 only while sshd runs (its service adds and removes it).
//!
//! What is opened: `listen.tcp`'s port (the node API, mutual TLS), `ui.listen`'s (the Host UI and `/metrics`), and
//! Geneve (6081/udp, between OVN chassis) when `ovn.northbound` is set. Not VNC: qx-node binds VNC displays to
//! 127.0.0.1. Not live migration streams yet: the target's QEMU listens on a port it picks (no configured range).

use std::collections::BTreeSet;

use crate::config::NodeConfig;

/// The table the ruleset defines.
pub const TABLE: &str = "inet quantix_filter";
/// Geneve, OVN's tunnel between chassis.
pub const GENEVE_PORT: u16 = 6081;

/// The ports a node's configuration serves on, by protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenPorts {
    pub tcp: BTreeSet<u16>,
    pub udp: BTreeSet<u16>,
}

impl OpenPorts {
    pub fn of(config: &NodeConfig) -> Self {
        let mut ports = Self::default();
        ports.tcp.extend(config.listen.tcp.map(|addr| addr.port()));
        ports.tcp.extend(config.ui.listen.map(|addr| addr.port()));
        if config.ovn.northbound.is_some() {
            ports.udp.insert(GENEVE_PORT);
        }
        ports
    }

    /// One nft transaction (`nft -f`) that replaces the sets' contents with these ports.
    pub fn nft_commands(&self) -> String {
        let mut out = String::new();
        for (set, ports) in [("tcp_ports", &self.tcp), ("udp_ports", &self.udp)] {
            out.push_str(&format!("flush set {TABLE} {set}\n"));
            // nft refuses an empty element list.
            if !ports.is_empty() {
                let list: Vec<String> = ports.iter().map(u16::to_string).collect();
                out.push_str(&format!("add element {TABLE} {set} {{ {} }}\n", list.join(", ")));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_open_nothing_and_each_listener_its_port() {
        let config = NodeConfig::default();
        assert_eq!(OpenPorts::of(&config), OpenPorts::default());
        assert_eq!(
            OpenPorts::of(&config).nft_commands(),
            "flush set inet quantix_filter tcp_ports\nflush set inet quantix_filter udp_ports\n"
        );
        let yaml = "listen:\n  tcp: 0.0.0.0:9443\nui:\n  listen: '[::]:8443'\novn:\n  northbound: tcp:192.0.2.5:6641\n";
        let ports = OpenPorts::of(&NodeConfig::from_yaml(yaml).unwrap());
        assert_eq!(ports.tcp.iter().copied().collect::<Vec<_>>(), [8443, 9443]);
        assert_eq!(ports.udp.iter().copied().collect::<Vec<_>>(), [GENEVE_PORT]);
        assert_eq!(
            ports.nft_commands(),
            "flush set inet quantix_filter tcp_ports\nadd element inet quantix_filter tcp_ports { 8443, 9443 }\n\
             flush set inet quantix_filter udp_ports\nadd element inet quantix_filter udp_ports { 6081 }\n"
        );
        // One port for two listeners is one element.
        let yaml = "listen:\n  tcp: 127.0.0.1:7443\nui:\n  listen: 0.0.0.0:7443\n";
        assert_eq!(OpenPorts::of(&NodeConfig::from_yaml(yaml).unwrap()).tcp.len(), 1);
    }
}
