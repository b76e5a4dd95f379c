//! Node networks: named (bridge, VLAN, MTU) triples that VM NICs plug into, kept in `networks.json` and realised on
//! Open vSwitch through our own OVSDB client. Also the [`NetworkBackend`] that gives VMs their taps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use qx_net::names::{check_ifname, check_mtu, check_vlan, tap_name, IfName};
use qx_net::ovsdb::{ClientOptions, Endpoint};
use qx_net::tap::{delete_tap, Tap, TapConfig};
use qx_net::vswitch::{BridgeSpec, ExternalIds, PortSpec, VSwitch, VlanConfig};
use qx_vmm::network::{iface_id, network_nics, nic_queues, BoxFuture, NetworkBackend};
use qx_vmm::persist::write_atomic;
use qx_vmm::spec::{check_name, FieldError};
use qx_vmm::{DeviceTree, NicSlot, ValidationErrors, VmSpec};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::OvsConfig;
use crate::grpc::error_chain;

/// How long an attached tap may take to get its OpenFlow port number from ovs-vswitchd.
const OFPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A node network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    pub name: String,
    /// The Open vSwitch bridge; created when missing, never deleted (other networks may share it).
    pub bridge: String,
    /// Access VLAN of the VM ports; none means untagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vlan: Option<u16>,
    /// MTU requested for the VM ports; none means the device default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl NetworkSpec {
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errors = Vec::new();
        let mut check = |field: &str, value: String, result: Result<(), String>| {
            if let Err(problem) = result {
                errors.push(FieldError { field: field.into(), value, problem });
            }
        };
        check("name", self.name.clone(), check_name(&self.name));
        check("bridge", self.bridge.clone(), check_ifname(&self.bridge));
        if let Some(vlan) = self.vlan {
            check("vlan", vlan.to_string(), check_vlan(vlan));
        }
        if let Some(mtu) = self.mtu {
            check("mtu", mtu.to_string(), check_mtu(mtu));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(errors))
        }
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

/// The node's networks and its connection to Open vSwitch (made on first use, so qx-node starts without OVS).
pub struct Networks {
    file: PathBuf,
    ovs: OvsConfig,
    specs: Mutex<BTreeMap<String, NetworkSpec>>,
    vswitch: tokio::sync::Mutex<Option<VSwitch>>,
}

impl std::fmt::Debug for Networks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Networks").field("file", &self.file).field("ovs", &self.ovs).finish()
    }
}

impl Networks {
    /// Reads `<data_dir>/networks.json` (none yet: no networks).
    pub fn open(data_dir: &Path, ovs: OvsConfig) -> std::io::Result<Self> {
        let file = data_dir.join("networks.json");
        let specs: Vec<NetworkSpec> = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", file.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let specs = specs.into_iter().map(|spec| (spec.name.clone(), spec)).collect();
        Ok(Self { file, ovs, specs: Mutex::new(specs), vswitch: tokio::sync::Mutex::new(None) })
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

    /// Defines a network and makes sure its bridge exists.
    pub async fn create(&self, spec: NetworkSpec) -> Result<NetworkSpec, NetworkError> {
        spec.validate().map_err(NetworkError::Invalid)?;
        if self.specs().contains_key(&spec.name) {
            return Err(NetworkError::AlreadyExists(spec.name));
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

    /// Removes a network that no VM names (`users`: the VMs that do).
    pub async fn delete(&self, name: &str, users: Vec<String>) -> Result<(), NetworkError> {
        if !self.specs().contains_key(name) {
            return Err(NetworkError::NotFound(name.to_owned()));
        }
        if !users.is_empty() {
            return Err(NetworkError::InUse { name: name.to_owned(), vms: users });
        }
        let mut specs = self.specs().clone();
        specs.remove(name);
        self.persist(&specs).await?;
        *self.specs() = specs;
        info!(network = %name, "network deleted");
        Ok(())
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
        network_nics(vm)
            .filter_map(|index| {
                let id = vm.nics[index].id.clone()?;
                let tap = tap_of(vm, devices.nic(&id)?);
                let ofport = vswitch
                    .as_ref()
                    .and_then(|v| v.port(tap.as_str()))
                    .and_then(|port| port.interfaces.first().and_then(|i| i.ofport));
                Some(NicStatus {
                    index,
                    iface_id: iface_id(&vm.uuid(), &id),
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
        let vswitch = self.vswitch().await.map_err(|e| error_chain(&e))?;
        let tap_name = tap_of(vm, slot);
        // A tap left by a QEMU that died with the daemon down would block the name; it is ours by construction.
        let _ = delete_tap(&tap_name).await;
        let config = TapConfig::new(tap_name.clone()).queues(nic_queues(vm));
        let tap = Tap::create(config).await.map_err(|e| error_chain(&e))?;
        let port = PortSpec {
            vlan: network.vlan.map_or(VlanConfig::None, |tag| VlanConfig::Access { tag }),
            external_ids: ExternalIds {
                vm_id: Some(vm.uuid()),
                iface_id: Some(iface_id(&vm.uuid(), &slot.id)),
                attached_mac: nic.mac.clone(),
                extra: BTreeMap::new(),
            },
            mtu: network.mtu,
            ..PortSpec::new(tap_name.as_str())
        };
        let plugged = async {
            let _ = vswitch.remove_port(tap_name.as_str()).await;
            vswitch.add_port(&network.bridge, &port).await?;
            vswitch.wait_ofport(tap_name.as_str(), OFPORT_TIMEOUT).await
        };
        match plugged.await {
            Ok(ofport) => {
                info!(vm = %vm.name, nic = %slot.id, tap = %tap_name, ofport, network = %name, "NIC plugged into the switch");
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
