//! What qx-node says about the host (management network, SSH, cluster membership, diagnostics), copied out of the
//! `HostService` wire types so the model and the view do not depend on them. [`crate::rpc`] converts both ways.

use qx_proto::node::v1 as pb;

/// How the management interface gets its address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AddressMode {
    #[default]
    Dhcp,
    Static,
}

impl AddressMode {
    pub fn label(self) -> &'static str {
        match self {
            Self::Dhcp => "DHCP",
            Self::Static => "static",
        }
    }
}

/// The management network, as the F2 form edits it and `SetNetworkConfig` takes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkConfig {
    pub interface: String,
    pub mode: AddressMode,
    /// Static mode only: IPv4 address with prefix.
    pub address: String,
    /// Static mode only, may be empty.
    pub gateway: String,
    /// 0 for untagged.
    pub vlan: u16,
    pub dns_servers: Vec<String>,
}

impl NetworkConfig {
    /// One line for the main screen and notices: `eth0, static 192.0.2.10/24, VLAN 42`.
    pub fn describe(&self) -> String {
        let mut text = if self.interface.is_empty() { "no interface".to_owned() } else { self.interface.clone() };
        match self.mode {
            AddressMode::Dhcp => text.push_str(", DHCP"),
            AddressMode::Static => {
                text.push_str(", static ");
                text.push_str(&self.address);
            }
        }
        if self.vlan != 0 {
            text.push_str(&format!(", VLAN {}", self.vlan));
        }
        text
    }
}

impl From<pb::ManagementNetwork> for NetworkConfig {
    fn from(net: pb::ManagementNetwork) -> Self {
        let mode = match pb::AddressMode::try_from(net.mode) {
            Ok(pb::AddressMode::Static) => AddressMode::Static,
            _ => AddressMode::Dhcp,
        };
        Self {
            interface: net.interface,
            mode,
            address: net.address,
            gateway: net.gateway,
            // qx-node never reports more than 4094; anything larger reads as untagged rather than wrapping.
            vlan: u16::try_from(net.vlan).unwrap_or(0),
            dns_servers: net.dns_servers,
        }
    }
}

impl From<&NetworkConfig> for pb::ManagementNetwork {
    fn from(net: &NetworkConfig) -> Self {
        let mode = match net.mode {
            AddressMode::Dhcp => pb::AddressMode::Dhcp,
            AddressMode::Static => pb::AddressMode::Static,
        };
        Self {
            interface: net.interface.clone(),
            mode: mode.into(),
            address: net.address.clone(),
            gateway: net.gateway.clone(),
            vlan: net.vlan.into(),
            dns_servers: net.dns_servers.clone(),
        }
    }
}

/// Whether SSH is on, and until when.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SshState {
    pub enabled: bool,
    /// Unix seconds at which SSH turns itself off; 0 when no timer runs.
    pub disable_at_unix: i64,
}

impl SshState {
    /// `disabled`, `enabled (no timer)`, `enabled, turns off in 29 min`, as of `now` (unix seconds).
    pub fn describe(&self, now: i64) -> String {
        match (self.enabled, self.disable_at_unix) {
            (false, _) => "disabled".to_owned(),
            (true, 0) => "enabled (no timer)".to_owned(),
            (true, at) if at <= now => "enabled, turning off".to_owned(),
            (true, at) => format!("enabled, turns off in {}", duration(at - now)),
        }
    }
}

impl From<pb::SshStatus> for SshState {
    fn from(ssh: pb::SshStatus) -> Self {
        Self { enabled: ssh.enabled, disable_at_unix: ssh.disable_at_unix }
    }
}

/// `45 s`, `29 min` (rounded up, so a fresh 30-minute timer reads 30), `2 h 5 min`.
pub fn duration(seconds: i64) -> String {
    let seconds = seconds.max(0);
    if seconds < 60 {
        return format!("{seconds} s");
    }
    let minutes = (seconds + 59) / 60;
    if minutes < 60 {
        return format!("{minutes} min");
    }
    match minutes % 60 {
        0 => format!("{} h", minutes / 60),
        rest => format!("{} h {rest} min", minutes / 60),
    }
}

/// Cluster membership as qx-node reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Membership {
    /// qx-node did not say (an older daemon, or no host status yet).
    #[default]
    Unknown,
    Standalone,
    Member,
    /// A member whose last heartbeat failed; heartbeats continue.
    Disconnected,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSummary {
    pub state: Membership,
    pub control_plane_url: String,
    pub node_id: String,
    pub cluster_name: String,
    /// Unix seconds; 0 before the first accepted heartbeat.
    pub last_heartbeat_unix: i64,
    pub last_error: String,
}

impl ClusterSummary {
    /// Member or disconnected member: F4 then offers to leave.
    pub fn is_member(&self) -> bool {
        matches!(self.state, Membership::Member | Membership::Disconnected)
    }
}

impl From<pb::ClusterStatus> for ClusterSummary {
    fn from(cluster: pb::ClusterStatus) -> Self {
        let state = match pb::ClusterState::try_from(cluster.state) {
            Ok(pb::ClusterState::Standalone) => Membership::Standalone,
            Ok(pb::ClusterState::Member) => Membership::Member,
            Ok(pb::ClusterState::Disconnected) => Membership::Disconnected,
            _ => Membership::Unknown,
        };
        Self {
            state,
            control_plane_url: cluster.control_plane_url,
            node_id: cluster.node_id,
            cluster_name: cluster.cluster_name,
            last_heartbeat_unix: cluster.last_heartbeat_unix,
            last_error: cluster.last_error,
        }
    }
}

/// Everything the main screen shows from `GetHostStatus`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostSummary {
    /// e.g. `192.0.2.10/24`; empty when the interface has no address.
    pub management_address: String,
    /// e.g. `grpcs://192.0.2.10:7443` or the control plane's URL; empty when there is none.
    pub management_url: String,
    pub network: Option<NetworkConfig>,
    pub ssh: SshState,
    pub cluster: ClusterSummary,
}

impl From<pb::HostStatus> for HostSummary {
    fn from(status: pb::HostStatus) -> Self {
        Self {
            management_address: status.management_address,
            management_url: status.management_url,
            network: status.network.map(NetworkConfig::from),
            ssh: status.ssh.map(SshState::from).unwrap_or_default(),
            cluster: status.cluster.map(ClusterSummary::from).unwrap_or_default(),
        }
    }
}

/// What F7 shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiagnosticsReport {
    pub log_lines: Vec<String>,
    pub hardware: Vec<String>,
    pub accelerator: String,
    pub accelerator_reason: String,
    pub qemu_version: String,
}

impl DiagnosticsReport {
    /// The report as the lines F7 scrolls through.
    pub fn lines(&self) -> Vec<String> {
        let accelerator = match (self.accelerator.as_str(), self.accelerator_reason.as_str()) {
            ("", _) => "unknown".to_owned(),
            (accel, "") => accel.to_owned(),
            (accel, reason) => format!("{accel} ({reason})"),
        };
        let qemu = if self.qemu_version.is_empty() { "unknown" } else { self.qemu_version.as_str() };
        let mut lines = vec![format!("Accelerator: {accelerator}"), format!("QEMU: {qemu}"), String::new()];
        lines.push("Hardware".to_owned());
        if self.hardware.is_empty() {
            lines.push("  (none reported)".to_owned());
        }
        lines.extend(self.hardware.iter().map(|line| format!("  {line}")));
        lines.push(String::new());
        lines.push(format!("Recent qx-node log ({} lines)", self.log_lines.len()));
        lines.extend(self.log_lines.iter().map(|line| format!("  {line}")));
        lines
    }
}

impl From<pb::Diagnostics> for DiagnosticsReport {
    fn from(diag: pb::Diagnostics) -> Self {
        Self {
            log_lines: diag.log_lines,
            hardware: diag.hardware,
            accelerator: diag.accelerator,
            accelerator_reason: diag.accelerator_reason,
            qemu_version: diag.qemu_version,
        }
    }
}

/// What F10 does to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    Reboot,
    Shutdown,
}

impl PowerAction {
    /// `reboot`, `shut down`: fits after "to".
    pub fn verb(self) -> &'static str {
        match self {
            Self::Reboot => "reboot",
            Self::Shutdown => "shut down",
        }
    }
}

impl From<PowerAction> for pb::PowerAction {
    fn from(action: PowerAction) -> Self {
        match action {
            PowerAction::Reboot => Self::Reboot,
            PowerAction::Shutdown => Self::Shutdown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(-5), "0 s");
        assert_eq!(duration(45), "45 s");
        assert_eq!(duration(60), "1 min");
        assert_eq!(duration(30 * 60 - 1), "30 min");
        assert_eq!(duration(60 * 60), "1 h");
        assert_eq!(duration(125 * 60), "2 h 5 min");
    }

    #[test]
    fn ssh_describes_its_timer() {
        let ssh = SshState { enabled: true, disable_at_unix: 1_000 + 29 * 60 };
        assert_eq!(ssh.describe(1_000), "enabled, turns off in 29 min");
        assert_eq!(ssh.describe(2_000_000), "enabled, turning off");
        assert_eq!(SshState { enabled: true, disable_at_unix: 0 }.describe(5), "enabled (no timer)");
        assert_eq!(SshState::default().describe(5), "disabled");
    }

    #[test]
    fn network_round_trips_through_the_wire_type() {
        let net = NetworkConfig {
            interface: "eth0".into(),
            mode: AddressMode::Static,
            address: "192.0.2.10/24".into(),
            gateway: "192.0.2.1".into(),
            vlan: 42,
            dns_servers: vec!["192.0.2.53".into()],
        };
        assert_eq!(NetworkConfig::from(pb::ManagementNetwork::from(&net)), net);
        assert_eq!(net.describe(), "eth0, static 192.0.2.10/24, VLAN 42");
        let wire = pb::ManagementNetwork { vlan: 70_000, mode: 99, ..Default::default() };
        let odd = NetworkConfig::from(wire);
        assert_eq!((odd.vlan, odd.mode), (0, AddressMode::Dhcp));
        assert_eq!(odd.describe(), "no interface, DHCP");
    }

    #[test]
    fn cluster_state_from_the_wire() {
        let cluster = |state: pb::ClusterState| {
            ClusterSummary::from(pb::ClusterStatus { state: state.into(), ..Default::default() })
        };
        assert_eq!(cluster(pb::ClusterState::Member).state, Membership::Member);
        assert!(cluster(pb::ClusterState::Disconnected).is_member());
        assert!(!cluster(pb::ClusterState::Standalone).is_member());
        assert_eq!(cluster(pb::ClusterState::Unspecified).state, Membership::Unknown);
    }
}
