//! Node networks that VM NICs plug into, kept in `networks.json`: kind `ovs` (a bridge, VLAN and MTU on this host,
//! realised on Open vSwitch through our own OVSDB client) and kind `ovn` (an OVN logical switch with a subnet and
//! OVN's DHCP, spanning every node that defines it; VM NICs are logical ports bound on this node's integration
//! bridge). Also the [`NetworkBackend`] that gives VMs their taps.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use qx_net::names::{check_ifname, check_mtu, check_vlan, tap_name, IfName};
use qx_net::ovn::spec::check_ovn_name;
use qx_net::ovn::{DhcpSpec, Ipv4Cidr, Northbound, PortAddress, SwitchSpec};
use qx_net::ovsdb::{ClientOptions, Endpoint};
use qx_net::tap::{delete_tap, Tap, TapConfig};
use qx_net::vswitch::{BridgeSpec, ExternalIds, PortSpec, VSwitch, VlanConfig};
use qx_vmm::network::{iface_id, network_nics, nic_queues, BoxFuture, NetworkBackend};
use qx_vmm::persist::write_atomic;
use qx_vmm::spec::{check_name, FieldError};
use qx_vmm::{DeviceTree, NicSlot, ValidationErrors, VmSpec};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::{OvnConfig, OvsConfig};
use crate::grpc::error_chain;
use crate::security_groups::SecurityGroups;

/// How long an attached tap may take to get its OpenFlow port number from ovs-vswitchd.
const OFPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a node network is made of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    /// An Open vSwitch bridge and VLAN on this host.
    #[default]
    Ovs,
    /// An OVN logical switch, shared by every node that defines a network on it.
    Ovn,
}

impl NetworkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkKind::Ovs => "ovs",
            NetworkKind::Ovn => "ovn",
        }
    }

    fn is_ovs(&self) -> bool {
        *self == NetworkKind::Ovs
    }
}

fn default_true() -> bool {
    true
}

fn is_true(value: &bool) -> bool {
    *value
}

/// A node network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: String,
    /// Default: `ovs`.
    #[serde(default, skip_serializing_if = "NetworkKind::is_ovs")]
    pub kind: NetworkKind,
    /// `ovs`: the Open vSwitch bridge; created when missing, never deleted (other networks may share it). `ovn`:
    /// empty (NICs go on the integration bridge of the node config's `ovn` section).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bridge: String,
    /// `ovs`: access VLAN of the VM ports; none means untagged. Not for `ovn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// MTU requested for the VM ports; none means the device default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// `ovn`: the logical switch; default: the network's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_switch: Option<String>,
    /// `ovn`: the switch's IPv4 subnet (required); must not overlap another switch's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<Ipv4Cidr>,
    /// `ovn`: the default gateway DHCP hands out (a host of the subnet); none: no default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// `ovn`: DNS servers DHCP hands out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<Ipv4Addr>,
    /// `ovn`: OVN's native DHCP answers on the switch (addresses from `dynamic` allocation). Default: on.
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub dhcp: bool,
}

impl NetworkSpec {
    /// An `ovs` network on `bridge`.
    pub fn ovs(name: impl Into<String>, bridge: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: NetworkKind::Ovs,
            bridge: bridge.into(),
            vlan: None,
            mtu: None,
            logical_switch: None,
            subnet: None,
            gateway: None,
            dns_servers: Vec::new(),
            dhcp: true,
        }
    }

    /// The logical switch of an `ovn` network.
    pub fn switch_name(&self) -> &str {
        self.logical_switch.as_deref().unwrap_or(&self.name)
    }

    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let mut check = |field: &str, value: String, result: Result<(), String>| {
            if let Err(problem) = result {
                errors.push(FieldError { field: field.into(), value, problem });
            }
        };
        let not_for = |kind: NetworkKind| Err(format!("is not for networks of kind {}", kind.as_str()));
        check("name", self.name.clone(), check_name(&self.name));
        if let Some(mtu) = self.mtu {
            check("mtu", mtu.to_string(), check_mtu(mtu));
        }
        match self.kind {
            NetworkKind::Ovs => {
                check("bridge", self.bridge.clone(), check_ifname(&self.bridge));
                if let Some(vlan) = self.vlan {
                    check("vlan", vlan.to_string(), check_vlan(vlan));
                }
                let ovn_only = [
                    ("logical_switch", self.logical_switch.is_some(), self.logical_switch.clone().unwrap_or_default()),
                    ("subnet", self.subnet.is_some(), self.subnet.map(|s| s.to_string()).unwrap_or_default()),
                    ("gateway", self.gateway.is_some(), self.gateway.map(|g| g.to_string()).unwrap_or_default()),
                    ("dns_servers", !self.dns_servers.is_empty(), format!("{:?}", self.dns_servers)),
                    ("dhcp", !self.dhcp, "false".to_owned()),
                ];
                for (field, set, value) in ovn_only {
                    if set {
                        check(field, value, not_for(NetworkKind::Ovs));
                    }
                }
            }
            NetworkKind::Ovn => {
                if !self.bridge.is_empty() {
                    check(
                        "bridge",
                        self.bridge.clone(),
                        Err("is not for networks of kind ovn (their NICs go on ovn.integration_bridge)".into()),
                    );
                }
                if let Some(vlan) = self.vlan {
                    check("vlan", vlan.to_string(), not_for(NetworkKind::Ovn));
                }
                if let Some(switch) = &self.logical_switch {
                    check("logical_switch", switch.clone(), check_ovn_name(switch));
                } else {
                    check(
                        "name",
                        self.name.clone(),
                        check_ovn_name(&self.name)
                            .map_err(|p| format!("{p} (it names the logical switch; or set logical_switch)")),
                    );
                }
                match self.subnet {
                    None => check("subnet", String::new(), Err("is required for networks of kind ovn".into())),
                    Some(subnet) => {
                        let switch = self.switch_spec();
                        if let Err(ValidationErrors(problems)) = switch.validate() {
                            // The name and MTU are checked above already.
                            for e in problems.into_iter().filter(|e| e.field != "name" && e.field != "dhcp.mtu") {
                                let field = match e.field.as_str() {
                                    "dhcp.router" => "gateway".to_owned(),
                                    f => f.strip_prefix("dhcp.").unwrap_or(f).to_owned(),
                                };
                                check(&field, e.value, Err(e.problem));
                            }
                        }
                        if let Some(gateway) = self.gateway.filter(|_| !self.dhcp) {
                            if !subnet.is_host(gateway) {
                                check(
                                    "gateway",
                                    gateway.to_string(),
                                    Err(format!("is not a host address of subnet {subnet}")),
                                );
                            }
                        }
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
    }

    /// The logical switch an `ovn` network stands for.
    fn switch_spec(&self) -> SwitchSpec {
        let mut switch = SwitchSpec::new(self.switch_name());
        switch.subnet = self.subnet;
        switch.dhcp = self.dhcp.then(|| DhcpSpec {
            router: self.gateway,
            dns_servers: self.dns_servers.clone(),
            mtu: self.mtu,
            ..DhcpSpec::default()
        });
        switch
    }
}

/// A VM NIC on a network, as the switch has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicStatus {
    pub index: usize,
    /// The NIC's id; its tap and `iface-id` are named from it.
    pub id: String,
    /// `external_ids:iface-id` of its OVS interface.
    pub iface_id: String,
    pub network: String,
    pub tap: String,
    /// Absent while the VM is not running.
    pub ofport: Option<i64>,
    /// `ovn` networks: the logical port's IPv4 address (static, or the one OVN allocated for DHCP).
    pub ipv4: Option<Ipv4Addr>,
    /// `ovn` networks: whether ovn-controller has bound the logical port (`up`).
    pub up: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network: {0}")]
    Invalid(ValidationErrors),
    #[error("network {0:?} not found")]
    NotFound(String),
    #[error("network {0:?} already exists")]
    AlreadyExists(String),
    #[error("network {name:?} is used by VMs {vms:?}")]
    InUse { name: String, vms: Vec<String> },
    #[error("Open vSwitch is not reachable at {socket} (is ovsdb-server running?)")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: qx_net::vswitch::Error,
    },
    #[error("OVN is not configured on this node (set ovn.northbound in the node config)")]
    OvnNotConfigured,
    #[error("the OVN northbound database is not reachable at {endpoint} (is ovsdb-server of ovn-central running?)")]
    OvnUnreachable {
        endpoint: String,
        #[source]
        source: qx_net::ovn::Error,
    },
    #[error("OVN refused the change to network {name:?}")]
    Ovn {
        name: String,
        #[source]
        source: qx_net::ovn::Error,
    },
    #[error("Open vSwitch refused the change to network {name:?}")]
    Switch {
        name: String,
        #[source]
        source: qx_net::vswitch::Error,
    },
    #[error("cannot write {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The node's networks and its connections to Open vSwitch and OVN's northbound database (made on first use, so
/// qx-node starts without either).
pub struct Networks {
    file: PathBuf,
    ovs: OvsConfig,
    ovn: OvnConfig,
    specs: Mutex<BTreeMap<String, NetworkSpec>>,
    vswitch: tokio::sync::Mutex<Option<VSwitch>>,
    northbound: tokio::sync::Mutex<Option<Northbound>>,
    security_groups: SecurityGroups,
}

impl std::fmt::Debug for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Networks").field("file", &self.file).field("ovs", &self.ovs).field("ovn", &self.ovn).finish()
    }
}

impl Networks {
    /// Reads `<data_dir>/networks.json` (none yet: no networks) and `security_groups.json`.
    pub fn open(data_dir: &Path, ovs: OvsConfig, ovn: OvnConfig) -> std::io::Result<Self> {
        let file = data_dir.join("networks.json");
        let specs: Vec<NetworkSpec> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", file.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let specs = specs.into_iter().map(|spec| (spec.name.clone(), spec)).collect();
        Ok(Self {
            file,
            ovs,
            ovn,
            specs: Mutex::new(specs),
            vswitch: tokio::sync::Mutex::new(None),
            northbound: tokio::sync::Mutex::new(None),
            security_groups: SecurityGroups::open(data_dir)?,
        })
    }

    /// The node's security groups, for NICs on `ovn` networks.
    pub fn security_groups(&self) -> &SecurityGroups {
        &self.security_groups
    }

    fn specs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NetworkSpec>> {
        self.specs.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self) -> Vec<NetworkSpec> {
        self.specs().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<NetworkSpec> {
        self.specs().get(name).cloned()
    }

    async fn vswitch(&self) -> Result<VSwitch, NetworkError> {
        let mut slot = self.vswitch.lock().await;
        if let Some(vswitch) = slot.as_ref() {
            return Ok(vswitch.clone());
        }
        let options = ClientOptions { connect_timeout: Duration::from_secs(2), ..ClientOptions::default() };
        let vswitch = VSwitch::connect(Endpoint::Unix(self.ovs.socket.clone()), options)
            .await
            .map_err(|source| NetworkError::Unreachable { socket: self.ovs.socket.clone(), source })?;
        info!(socket = %self.ovs.socket.display(), "connected to Open vSwitch");
        *slot = Some(vswitch.clone());
        Ok(vswitch)
    }

    /// The northbound database, connected on first use.
    pub(crate) async fn northbound(&self) -> Result<Northbound, NetworkError> {
        let endpoint = self.ovn.northbound.clone().ok_or(NetworkError::OvnNotConfigured)?;
        let mut slot = self.northbound.lock().await;
        if let Some(nb) = slot.as_ref() {
            return Ok(nb.clone());
        }
        let unreachable = |source| NetworkError::OvnUnreachable { endpoint: endpoint.clone(), source };
        let parsed: Endpoint =
            endpoint.parse().map_err(|source| unreachable(qx_net::ovn::Error::Monitor { source }))?;
        let options = ClientOptions { connect_timeout: Duration::from_secs(2), ..ClientOptions::default() };
        let nb = Northbound::connect(parsed, options).await.map_err(unreachable)?;
        info!(endpoint = %endpoint, "connected to the OVN northbound database");
        *slot = Some(nb.clone());
        Ok(nb)
    }

    /// Connects to OVN's northbound database when it is configured, saying clearly when it is not reachable (the
    /// node runs on; OVN networks are refused until it is, and plain OVS networks are unaffected).
    pub async fn probe_ovn(&self) {
        if self.ovn.northbound.is_none() {
            return;
        }
        if let Err(e) = self.northbound().await {
            error!(error = %error_chain(&e), "OVN is configured but not reachable; OVN networks are unavailable until it is");
        }
    }

    /// Defines a network: makes sure its bridge exists (`ovs`), or creates its logical switch or adopts the one
    /// another node made with the same subnet (`ovn`).
    pub async fn create(&self, spec: NetworkSpec) -> Result<NetworkSpec, NetworkError> {
        spec.validate().map_err(NetworkError::Invalid)?;
        if self.specs().contains_key(&spec.name) {
            return Err(NetworkError::AlreadyExists(spec.name));
        }
        if spec.kind == NetworkKind::Ovn {
            return self.create_ovn(spec).await;
        }
        let vswitch = self.vswitch().await?;
        let bridge = BridgeSpec::new(spec.bridge.clone(), self.ovs.datapath_type);
        vswitch
            .ensure_bridge(&bridge)
            .await
            .map_err(|source| NetworkError::Switch { name: spec.name.clone(), source })?;
        let mut specs = self.specs().clone();
        specs.insert(spec.name.clone(), spec.clone());
        self.persist(&specs).await?;
        *self.specs() = specs;
        info!(network = %spec.name, bridge = %spec.bridge, vlan = ?spec.vlan, "network created");
        Ok(spec)
    }

    async fn create_ovn(&self, spec: NetworkSpec) -> Result<NetworkSpec, NetworkError> {
        let nb = self.northbound().await?;
        let switch = spec.switch_spec();
        match nb.switch(&switch.name) {
            Some(existing) if existing.subnet == switch.subnet => {
                info!(network = %spec.name, switch = %switch.name, "adopting the existing logical switch");
            }
            Some(existing) => {
                let theirs = existing.subnet.map_or("none".to_owned(), |s| s.to_string());
                return Err(NetworkError::Invalid(ValidationErrors(vec![FieldError {
                    field: "subnet".into(),
                    value: spec.subnet.map(|s| s.to_string()).unwrap_or_default(),
                    problem: format!("differs from subnet {theirs} of the existing logical switch {}", switch.name),
                }])));
            }
            None => {
                let mut switch = switch;
                switch.external_ids.insert("qx-network".into(), spec.name.clone());
                nb.create_switch(&switch).await.map_err(|source| match source {
                    qx_net::ovn::Error::Invalid(errors) => NetworkError::Invalid(errors),
                    source => NetworkError::Ovn { name: spec.name.clone(), source },
                })?;
            }
        }
        let mut specs = self.specs().clone();
        specs.insert(spec.name.clone(), spec.clone());
        self.persist(&specs).await?;
        *self.specs() = specs;
        info!(network = %spec.name, switch = %spec.switch_name(), subnet = ?spec.subnet.map(|s| s.to_string()), "OVN network created");
        Ok(spec)
    }

    /// Removes a network that no VM names (`users`: the VMs that do).
    pub async fn delete(&self, name: &str, users: Vec<String>) -> Result<(), NetworkError> {
        if !self.specs().contains_key(name) {
            return Err(NetworkError::NotFound(name.to_owned()));
        }
        if !users.is_empty() {
            return Err(NetworkError::InUse { name: name.to_owned(), vms: users });
        }
        let mut specs = self.specs().clone();
        let removed = specs.remove(name);
        self.persist(&specs).await?;
        *self.specs() = specs;
        info!(network = %name, "network deleted");
        if let Some(spec) = removed.filter(|s| s.kind == NetworkKind::Ovn) {
            self.delete_switch_if_unused(&spec).await;
        }
        Ok(())
    }

    /// Deletes an `ovn` network's logical switch once no node has ports on it (other nodes' networks may still
    /// name it; they find it gone only when none of their VMs was on it).
    async fn delete_switch_if_unused(&self, spec: &NetworkSpec) {
        let Ok(nb) = self.northbound().await else { return };
        let switch = spec.switch_name();
        if nb.switch(switch).is_some_and(|s| s.ports.iter().all(|p| p.starts_with("ln-"))) {
            if let Err(e) = nb.delete_switch(switch).await {
                warn!(network = %spec.name, switch, error = %error_chain(&e), "cannot delete the logical switch");
            }
        }
    }

    async fn persist(&self, specs: &BTreeMap<String, NetworkSpec>) -> Result<(), NetworkError> {
        let list: Vec<&NetworkSpec> = specs.values().collect();
        let json = serde_json::to_vec_pretty(&list).expect("network specs always serialize");
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || write_atomic(&file, &json))
            .await
            .expect("persist task panicked")
            .map_err(|source| NetworkError::Persist { path: self.file.clone(), source })
    }

    /// The network NICs of `vm` (placed as `devices` says) with their taps and, when plugged, OpenFlow ports.
    pub async fn nic_status(&self, vm: &VmSpec, devices: &DeviceTree) -> Vec<NicStatus> {
        let vswitch = self.vswitch.lock().await.clone();
        let northbound = self.northbound.lock().await.clone();
        network_nics(vm)
            .filter_map(|index| {
                let id = vm.nics[index].id.clone()?;
                let tap = tap_of(vm, devices.nic(&id)?);
                let ofport = vswitch
                    .as_ref()
                    .and_then(|v| v.port(tap.as_str()))
                    .and_then(|port| port.interfaces.first().and_then(|i| i.ofport));
                let iface_id = iface_id(&vm.uuid(), &id);
                let logical = northbound.as_ref().and_then(|nb| nb.port(&iface_id));
                Some(NicStatus {
                    index,
                    ipv4: logical.as_ref().and_then(|p| p.ipv4),
                    up: logical.is_some_and(|p| p.up),
                    iface_id,
                    id,
                    network: vm.nics[index].network.clone().unwrap_or_default(),
                    tap: tap.to_string(),
                    ofport,
                })
            })
            .collect()
    }

    async fn attach_nic(&self, vm: &VmSpec, slot: &NicSlot) -> Result<Vec<std::os::fd::OwnedFd>, String> {
        let nic = vm.nic(&slot.id).ok_or_else(|| format!("VM {:?} has no NIC {:?}", vm.name, slot.id))?;
        let name = nic.network.clone().unwrap_or_default();
        let network = self.get(&name).ok_or_else(|| format!("network {name:?} does not exist"))?;
        let mac = nic.mac.clone();
        match network.kind {
            NetworkKind::Ovs => {
                let vlan = network.vlan.map_or(VlanConfig::None, |tag| VlanConfig::Access { tag });
                self.plug_tap(vm, slot, &network, &network.bridge, vlan, mac).await
            }
            NetworkKind::Ovn => {
                let nb = self.northbound().await.map_err(|e| error_chain(&e))?;
                let logical_port = iface_id(&vm.uuid(), &slot.id);
                let mut port = qx_net::ovn::PortSpec::new(logical_port.clone(), mac.clone().unwrap_or_default());
                port.address = nic.ipv4.map_or(PortAddress::Dynamic, PortAddress::Static);
                port.requested_chassis = self.ovn.chassis.clone();
                port.external_ids.insert("vm-id".into(), vm.uuid().to_string());
                for group in &nic.security_groups {
                    self.security_groups.ensure(&nb, group).await.map_err(|e| error_chain(&e))?;
                    port.port_groups.push(qx_net::ovn::security_group::port_group_name(group));
                }
                // A port left by a VM that ran when the daemon died would block the name; it is this NIC's.
                let _ = nb.remove_port(&logical_port).await;
                nb.add_port(network.switch_name(), &port).await.map_err(|e| error_chain(&e))?;
                let bridge = self.ovn.integration_bridge.clone();
                match self.plug_tap(vm, slot, &network, &bridge, VlanConfig::None, mac).await {
                    Ok(fds) => {
                        info!(vm = %vm.name, nic = %slot.id, logical_port = %logical_port, switch = %network.switch_name(), "NIC bound to its logical port");
                        Ok(fds)
                    }
                    Err(e) => {
                        let _ = nb.remove_port(&logical_port).await;
                        Err(e)
                    }
                }
            }
        }
    }

    /// Static addresses of `vm`'s NICs on `ovn` networks: free host addresses of their subnets, each once.
    fn check_static_addresses(&self, vm: &VmSpec, nb: &Northbound, errors: &mut Vec<FieldError>) {
        let mut mine: BTreeMap<(String, Ipv4Addr), usize> = BTreeMap::new();
        for index in network_nics(vm) {
            let nic = &vm.nics[index];
            let Some(ip) = nic.ipv4 else { continue };
            let Some(network) = nic.network.as_deref().and_then(|n| self.get(n)) else { continue };
            if network.kind != NetworkKind::Ovn {
                continue;
            }
            let switch = network.switch_name().to_owned();
            let port = iface_id(&vm.uuid(), nic.id.as_deref().unwrap_or_default());
            let problem = match mine.insert((switch.clone(), ip), index) {
                Some(other) => Some(format!("is also the address of nics[{other}] on logical switch {switch}")),
                None => nb.static_address_problem(&switch, ip, &port),
            };
            if let Some(problem) = problem {
                errors.push(FieldError { field: format!("nics[{index}].ipv4"), value: ip.to_string(), problem });
            }
        }
    }

    /// Creates the NIC's tap and plugs it into `bridge` with its `iface-id`, and waits for its OpenFlow port.
    async fn plug_tap(
        &self,
        vm: &VmSpec,
        slot: &NicSlot,
        network: &NetworkSpec,
        bridge: &str,
        vlan: VlanConfig,
        mac: Option<String>,
    ) -> Result<Vec<std::os::fd::OwnedFd>, String> {
        let vswitch = self.vswitch().await.map_err(|e| error_chain(&e))?;
        let tap_name = tap_of(vm, slot);
        // A tap left by a QEMU that died with the daemon down would block the name; it is ours by construction.
        let _ = delete_tap(&tap_name).await;
        let config = TapConfig::new(tap_name.clone()).queues(nic_queues(vm));
        let tap = Tap::create(config).await.map_err(|e| error_chain(&e))?;
        let port = PortSpec {
            vlan,
            external_ids: ExternalIds {
                vm_id: Some(vm.uuid()),
                iface_id: Some(iface_id(&vm.uuid(), &slot.id)),
                attached_mac: mac,
                extra: BTreeMap::new(),
            },
            mtu: network.mtu,
            ..PortSpec::new(tap_name.as_str())
        };
        let plugged = async {
            let _ = vswitch.remove_port(tap_name.as_str()).await;
            vswitch.add_port(bridge, &port).await?;
            vswitch.wait_ofport(tap_name.as_str(), OFPORT_TIMEOUT).await
        };
        match plugged.await {
            Ok(ofport) => {
                info!(vm = %vm.name, nic = %slot.id, tap = %tap_name, ofport, network = %network.name, bridge, "NIC plugged into the switch");
                Ok(tap.into_queues())
            }
            Err(e) => {
                let _ = vswitch.remove_port(tap_name.as_str()).await;
                drop(tap);
                let _ = delete_tap(&tap_name).await;
                Err(error_chain(&e))
            }
        }
    }

    async fn detach_nic(&self, vm: &VmSpec, slot: &NicSlot) {
        let tap = tap_of(vm, slot);
        if let Ok(vswitch) = self.vswitch().await {
            if let Err(e) = vswitch.remove_port(tap.as_str()).await {
                warn!(vm = %vm.name, port = %tap, error = %error_chain(&e), "cannot remove switch port");
            }
        }
        if let Err(e) = delete_tap(&tap).await {
            warn!(vm = %vm.name, tap = %tap, error = %error_chain(&e), "cannot delete tap");
        }
        // The NIC may be gone from the spec (hotplug detach) or its network deleted: the logical port is named
        // from the NIC's id alone, so it is removed whenever OVN is configured.
        if self.ovn.northbound.is_some() {
            let logical_port = iface_id(&vm.uuid(), &slot.id);
            match self.northbound().await {
                Ok(nb) => {
                    if let Err(e) = nb.remove_port(&logical_port).await {
                        warn!(vm = %vm.name, logical_port = %logical_port, error = %error_chain(&e), "cannot remove the logical port");
                    }
                }
                Err(e) => {
                    warn!(vm = %vm.name, logical_port = %logical_port, error = %error_chain(&e), "cannot remove the logical port")
                }
            }
        }
    }
}

/// The tap of a NIC: named from the VM's UUID and the NIC's tap slot, which the device tree allocates once with
/// the NIC's id and keeps (a VM from before device ids has slot = the NIC's old position, so its taps keep their
/// names across the upgrade).
fn tap_of(vm: &VmSpec, slot: &NicSlot) -> IfName {
    tap_name(&vm.uuid(), slot.tap)
}

impl NetworkBackend for Networks {
    fn check<'a>(&'a self, vm: &'a VmSpec) -> BoxFuture<'a, Result<(), ValidationErrors>> {
        Box::pin(async move {
            let mut errors = Vec::new();
            for index in network_nics(vm) {
                let name = vm.nics[index].network.clone().unwrap_or_default();
                if self.get(&name).is_none() {
                    errors.push(FieldError {
                        field: format!("nics[{index}].network"),
                        value: name,
                        problem: "does not exist on this node".into(),
                    });
                }
            }
            for index in network_nics(vm) {
                let nic = &vm.nics[index];
                let name = nic.network.clone().unwrap_or_default();
                let kind = self.get(&name).map(|n| n.kind);
                if let Some(ip) = nic.ipv4.filter(|_| kind.is_some_and(|k| k != NetworkKind::Ovn)) {
                    errors.push(FieldError {
                        field: format!("nics[{index}].ipv4"),
                        value: ip.to_string(),
                        problem: format!("is only for NICs on networks of kind ovn, and network {name} is not"),
                    });
                }
                if kind.is_some_and(|k| k != NetworkKind::Ovn) && !nic.security_groups.is_empty() {
                    errors.push(FieldError {
                        field: format!("nics[{index}].security_groups"),
                        value: nic.security_groups.join(","),
                        problem: format!("are only for NICs on networks of kind ovn, and network {name} is not"),
                    });
                    continue;
                }
                for (k, group) in nic.security_groups.iter().enumerate() {
                    if !self.security_groups.contains(group) {
                        errors.push(FieldError {
                            field: format!("nics[{index}].security_groups[{k}]"),
                            value: group.clone(),
                            problem: "does not exist on this node".into(),
                        });
                    }
                }
            }
            if errors.is_empty() {
                let ovn = network_nics(vm).find(|i| {
                    let name = vm.nics[*i].network.clone().unwrap_or_default();
                    self.get(&name).is_some_and(|n| n.kind == NetworkKind::Ovn)
                });
                if let Some(index) = ovn {
                    match self.northbound().await {
                        Err(e) => errors.push(FieldError {
                            field: format!("nics[{index}].network"),
                            value: vm.nics[index].network.clone().unwrap_or_default(),
                            problem: format!("cannot be attached: {}", error_chain(&e)),
                        }),
                        Ok(nb) => self.check_static_addresses(vm, &nb, &mut errors),
                    }
                }
            }
            if errors.is_empty() {
                if let Err(e) = self.vswitch().await {
                    let index = network_nics(vm).next().unwrap_or_default();
                    errors.push(FieldError {
                        field: format!("nics[{index}].network"),
                        value: vm.nics[index].network.clone().unwrap_or_default(),
                        problem: format!("cannot be attached: {}", error_chain(&e)),
                    });
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(ValidationErrors(errors))
            }
        })
    }

    fn attach<'a>(
        &'a self,
        vm: &'a VmSpec,
        nic: &'a NicSlot,
    ) -> BoxFuture<'a, Result<Vec<std::os::fd::OwnedFd>, String>> {
        Box::pin(self.attach_nic(vm, nic))
    }

    fn detach<'a>(&'a self, vm: &'a VmSpec, nic: &'a NicSlot) -> BoxFuture<'a, ()> {
        Box::pin(self.detach_nic(vm, nic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_json_from_before_kinds_loads_as_ovs_and_kinds_check_their_fields() {
        let old: NetworkSpec = serde_json::from_str(r#"{"name":"v10","bridge":"br0","vlan":10}"#).unwrap();
        assert_eq!(old, NetworkSpec { vlan: Some(10), ..NetworkSpec::ovs("v10", "br0") });
        assert_eq!(serde_json::to_string(&old).unwrap(), r#"{"name":"v10","bridge":"br0","vlan":10}"#);
        old.validate().unwrap();

        let ovs = NetworkSpec { subnet: Some("10.0.0.0/24".parse().unwrap()), dhcp: false, ..old.clone() };
        let fields: Vec<String> = ovs.validate().unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["subnet", "dhcp"]);

        let ovn = NetworkSpec {
            kind: NetworkKind::Ovn,
            bridge: String::new(),
            vlan: None,
            subnet: Some("10.0.0.0/24".parse().unwrap()),
            gateway: Some("10.0.0.1".parse().unwrap()),
            ..NetworkSpec::ovs("tenant1", "")
        };
        ovn.validate().unwrap();
        let bad = NetworkSpec {
            bridge: "br0".into(),
            vlan: Some(5),
            subnet: None,
            logical_switch: Some("a b".into()),
            ..ovn.clone()
        };
        let fields: Vec<String> = bad.validate().unwrap_err().0.into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["bridge", "vlan", "logical_switch", "subnet"]);
        let outside = NetworkSpec { gateway: Some("10.9.0.1".parse().unwrap()), ..ovn };
        assert_eq!(outside.validate().unwrap_err().first_field(), "gateway");
    }
}
