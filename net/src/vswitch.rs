//! Typed operations on the `Open_vSwitch` database: bridges, ports with a VLAN tag or trunks, `external_ids`, MTU
//! and ingress policing, over [`ovsdb::Client`](crate::ovsdb::Client) instead of `ovs-vsctl`.
//!
//! [`VSwitch`] keeps one `monitor_cond` on the tables it manages. Reads (`port`, `bridges`, the duplicate-MAC
//! lookup) come from that replica without a round trip, and [`VSwitch::wait_ofport`] waits for ovs-vswitchd to
//! assign the OpenFlow port through it: no polling. Every write is one transaction whose preconditions are
//! `wait` operations with a zero timeout, so "the bridge exists", "the name is free" and "no other interface has
//! this MAC" are checked atomically with the change, and a failed one is reported as what it means
//! ([`Error::BridgeNotFound`], [`Error::PortExists`], [`Error::MacInUse`]).
//!
//! Ports and interfaces are not root rows in the schema: removing a port from its bridge's `ports` deletes both,
//! and deleting a bridge from `Open_vSwitch.bridges` deletes it with its ports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, info};
use uuid::Uuid;

use crate::names::{
    check_external_id_key, check_external_id_value, check_ifname, check_mtu, check_nic_mac, check_vlan, Problems,
    ValidationErrors, MAX_VLAN,
};
use crate::ovsdb::{
    self, Atom, Client, ClientOptions, Condition, Endpoint, Monitor, MonitorRequest, Mutation, Operation, Replica, Row,
    Value, WaitUntil,
};

/// The database name.
pub const DB: &str = "Open_vSwitch";

/// The `external_ids` keys [`ExternalIds`] owns.
const KEY_VM_ID: &str = "vm-id";
const KEY_IFACE_ID: &str = "iface-id";
const KEY_ATTACHED_MAC: &str = "attached-mac";

/// How a bridge forwards packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathType {
    /// The kernel datapath (`openvswitch.ko`): production hosts.
    #[default]
    System,
    /// The userspace datapath inside ovs-vswitchd: hosts without the kernel module (test machines).
    Netdev,
}

impl DatapathType {
    /// The `datapath_type` column value.
    pub fn as_str(self) -> &'static str {
        match self {
            DatapathType::System => "system",
            DatapathType::Netdev => "netdev",
        }
    }
}

/// A bridge to ensure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeSpec {
    /// Bridge name; also the name of its internal port and kernel interface.
    pub name: String,
    /// Default: `system`.
    #[serde(default)]
    pub datapath_type: DatapathType,
    /// `external_ids` pairs to set (others are left alone).
    #[serde(default)]
    pub external_ids: BTreeMap<String, String>,
}

impl BridgeSpec {
    /// A bridge without `external_ids`.
    pub fn new(name: impl Into<String>, datapath_type: DatapathType) -> Self {
        Self { name: name.into(), datapath_type, external_ids: BTreeMap::new() }
    }

    /// Every problem, with the field (`bridge.name`, ...) and the value.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        p.check("bridge.name", &self.name, check_ifname(&self.name));
        check_extra_ids(&mut p, "bridge.external_ids", &self.external_ids);
        p.into_result()
    }
}

/// What kind of interface a port has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PortKind {
    /// An existing network device, such as a VM's tap (OVS interface type `""`).
    #[default]
    System,
    /// A port ovs-vswitchd creates itself (type `internal`).
    Internal,
}

/// A port's VLAN configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum VlanConfig {
    /// No VLAN settings: OVS treats the port as a trunk of every VLAN.
    #[default]
    None,
    /// An access port: untagged frames belong to VLAN `tag`.
    Access {
        /// 1..=4094.
        tag: u16,
    },
    /// A trunk of exactly these VLANs, tagged.
    Trunk {
        /// Each 1..=4094, at least one, no repeats.
        trunks: Vec<u16>,
    },
}

/// The `external_ids` of a VM's interface, as OVN and operators read them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalIds {
    /// `vm-id`: the VM's uuid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_id: Option<Uuid>,
    /// `iface-id`: the OVN logical switch port this interface binds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface_id: Option<String>,
    /// `attached-mac`: the NIC's MAC address. At most one interface may carry a given MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached_mac: Option<String>,
    /// Other pairs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, String>,
}

impl ExternalIds {
    fn validate_into(&self, p: &mut Problems, prefix: &str) {
        if let Some(iface_id) = &self.iface_id {
            p.check(format!("{prefix}.iface_id"), iface_id, check_external_id_value(iface_id));
        }
        if let Some(mac) = &self.attached_mac {
            p.check(format!("{prefix}.attached_mac"), mac, check_nic_mac(mac).map(drop));
        }
        for key in self.extra.keys() {
            if [KEY_VM_ID, KEY_IFACE_ID, KEY_ATTACHED_MAC].contains(&key.as_str()) {
                p.add(format!("{prefix}.extra"), key, "is set through its own field");
            }
        }
        check_extra_ids(p, &format!("{prefix}.extra"), &self.extra);
    }

    /// The MAC in canonical (lowercase) form, if valid.
    fn mac(&self) -> Option<String> {
        let mac = check_nic_mac(self.attached_mac.as_deref()?).ok()?;
        Some(mac.to_string())
    }

    fn pairs(&self) -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = self.extra.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(vm) = self.vm_id {
            pairs.push((KEY_VM_ID.into(), vm.to_string()));
        }
        if let Some(iface) = &self.iface_id {
            pairs.push((KEY_IFACE_ID.into(), iface.clone()));
        }
        if let Some(mac) = self.mac() {
            pairs.push((KEY_ATTACHED_MAC.into(), mac));
        }
        pairs
    }

    fn to_value(&self) -> Value {
        Value::map(self.pairs())
    }
}

fn check_extra_ids(p: &mut Problems, field: &str, ids: &BTreeMap<String, String>) {
    for (key, value) in ids {
        p.check(field, key, check_external_id_key(key));
        p.check(format!("{field}.{key}"), value, check_external_id_value(value));
    }
}

/// Ingress policing (`ingress_policing_rate`/`_burst`): traffic the VM sends above the rate is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policing {
    /// Kilobits per second; at least 1.
    pub rate_kbps: u32,
    /// Burst in kilobits; 0 lets OVS choose.
    #[serde(default)]
    pub burst_kb: u32,
}

/// A port to add: one interface of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    /// Port and interface name (for [`PortKind::System`], the existing device, e.g. the VM's tap).
    pub name: String,
    /// Default: [`PortKind::System`].
    #[serde(default)]
    pub kind: PortKind,
    /// Default: no VLAN settings.
    #[serde(default)]
    pub vlan: VlanConfig,
    /// Default: none.
    #[serde(default)]
    pub external_ids: ExternalIds,
    /// `mtu_request`; the device's own MTU when `None`.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Default: none.
    #[serde(default)]
    pub ingress_policing: Option<Policing>,
}

impl PortSpec {
    /// A system port without VLAN, ids, MTU or policing.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: PortKind::System,
            vlan: VlanConfig::None,
            external_ids: ExternalIds::default(),
            mtu: None,
            ingress_policing: None,
        }
    }

    /// Every problem, with the field (`port.vlan.tag`, ...) and the value.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        self.validate_into(&mut p, "port");
        p.into_result()
    }

    fn validate_into(&self, p: &mut Problems, prefix: &str) {
        p.check(format!("{prefix}.name"), &self.name, check_ifname(&self.name));
        validate_vlan(p, &format!("{prefix}.vlan"), &self.vlan);
        self.external_ids.validate_into(p, &format!("{prefix}.external_ids"));
        if let Some(mtu) = self.mtu {
            p.check(format!("{prefix}.mtu"), mtu, check_mtu(mtu));
        }
        if let Some(policing) = self.ingress_policing {
            validate_policing(p, &format!("{prefix}.ingress_policing"), policing);
        }
    }

    fn interface_row(&self) -> Row {
        let mut row = Row::new();
        row.insert("name".into(), self.name.as_str().into());
        if self.kind == PortKind::Internal {
            row.insert("type".into(), "internal".into());
        }
        let ids = self.external_ids.to_value();
        if ids != Value::empty_map() {
            row.insert("external_ids".into(), ids);
        }
        if let Some(mtu) = self.mtu {
            row.insert("mtu_request".into(), Value::set([i64::from(mtu)]));
        }
        if let Some(policing) = self.ingress_policing {
            row.extend(policing_columns(Some(policing)));
        }
        row
    }

    fn port_row(&self, interface: &str) -> Row {
        let mut row = vlan_columns(&self.vlan);
        row.insert("name".into(), self.name.as_str().into());
        row.insert("interfaces".into(), Value::Set(vec![Atom::NamedUuid(interface.to_owned())]));
        row
    }
}

fn validate_vlan(p: &mut Problems, field: &str, vlan: &VlanConfig) {
    match vlan {
        VlanConfig::None => {}
        VlanConfig::Access { tag } => p.check(format!("{field}.tag"), tag, check_vlan(*tag)),
        VlanConfig::Trunk { trunks } => {
            if trunks.is_empty() {
                p.add(format!("{field}.trunks"), "[]", "is empty (use mode none for all VLANs)");
            }
            if trunks.len() > usize::from(MAX_VLAN) {
                p.add(format!("{field}.trunks"), trunks.len(), format!("has more than {MAX_VLAN} entries"));
            }
            let mut seen = std::collections::HashSet::new();
            for (i, vlan) in trunks.iter().enumerate() {
                p.check(format!("{field}.trunks[{i}]"), vlan, check_vlan(*vlan));
                if !seen.insert(*vlan) {
                    p.add(format!("{field}.trunks[{i}]"), vlan, "is listed twice");
                }
            }
        }
    }
}

fn validate_policing(p: &mut Problems, field: &str, policing: Policing) {
    if policing.rate_kbps == 0 {
        p.add(format!("{field}.rate_kbps"), 0, "must be at least 1 (omit ingress_policing to disable it)");
    }
}

/// `tag`, `trunks`, `vlan_mode` for a port row (all three, so an update clears what no longer applies).
fn vlan_columns(vlan: &VlanConfig) -> Row {
    let mut row = Row::new();
    let (tag, trunks, mode) = match vlan {
        VlanConfig::None => (Value::empty_set(), Value::empty_set(), Value::empty_set()),
        VlanConfig::Access { tag } => (Value::set([*tag]), Value::empty_set(), Value::set(["access"])),
        VlanConfig::Trunk { trunks } => (Value::empty_set(), Value::set(trunks.iter().copied()), Value::set(["trunk"])),
    };
    row.insert("tag".into(), tag);
    row.insert("trunks".into(), trunks);
    row.insert("vlan_mode".into(), mode);
    row
}

fn policing_columns(policing: Option<Policing>) -> Row {
    let (rate, burst) = policing.map_or((0, 0), |p| (p.rate_kbps, p.burst_kb));
    let mut row = Row::new();
    row.insert("ingress_policing_rate".into(), i64::from(rate).into());
    row.insert("ingress_policing_burst".into(), i64::from(burst).into());
    row
}

/// A port as it is in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port name.
    pub name: String,
    /// Port row uuid.
    pub uuid: Uuid,
    /// The bridge it is on.
    pub bridge: Option<String>,
    /// Its VLAN configuration.
    pub vlan: VlanConfig,
    /// Its interfaces (one for the ports this module adds).
    pub interfaces: Vec<InterfaceInfo>,
}

/// An interface as it is in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceInfo {
    /// Interface name.
    pub name: String,
    /// Interface row uuid.
    pub uuid: Uuid,
    /// OVS type: `""` for a system device, `internal`, ...
    pub kind: String,
    /// The OpenFlow port ovs-vswitchd assigned; `None` until it has, `Some(-1)` if it failed.
    pub ofport: Option<i64>,
    /// Why ovs-vswitchd could not add it.
    pub error: Option<String>,
    /// `external_ids`.
    pub external_ids: BTreeMap<String, String>,
    /// `mtu_request`.
    pub mtu_request: Option<i64>,
    /// `ingress_policing_rate` (kbps; 0 = off).
    pub ingress_policing_rate: i64,
    /// `ingress_policing_burst` (kb).
    pub ingress_policing_burst: i64,
}

/// What [`VSwitch::add_ports`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRef {
    /// The name.
    pub name: String,
    /// Port row uuid.
    pub port: Uuid,
    /// Interface row uuid.
    pub interface: Uuid,
}

/// What went wrong, named by the operation, with the bridge or port.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid; every problem is listed with its field and value.
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationErrors),

    /// Connecting or starting the monitor failed.
    #[error("starting the {DB} monitor")]
    Monitor {
        /// The client error.
        #[source]
        source: ovsdb::Error,
    },

    /// The `Open_vSwitch` table has no row (the database was never initialized: `ovs-vsctl init`).
    #[error("the {DB} table has no row: the database is not initialized")]
    NotInitialized,

    /// Creating or updating a bridge failed.
    #[error("ensuring bridge {bridge}")]
    BridgeEnsure {
        /// The bridge.
        bridge: String,
        /// The client error.
        #[source]
        source: ovsdb::Error,
    },

    /// Deleting a bridge failed.
    #[error("deleting bridge {bridge}")]
    BridgeDelete {
        /// The bridge.
        bridge: String,
        /// The client error.
        #[source]
        source: ovsdb::Error,
    },

    /// The bridge does not exist.
    #[error("bridge {bridge} does not exist")]
    BridgeNotFound {
        /// The bridge.
        bridge: String,
    },

    /// A port or interface of this name exists already.
    #[error("port {port} already exists{}", bridge.as_deref().map(|b| format!(" on bridge {b}")).unwrap_or_default())]
    PortExists {
        /// The port.
        port: String,
        /// Its bridge, if known.
        bridge: Option<String>,
    },

    /// Another interface carries this `attached-mac`.
    #[error("attached-mac {mac} of port {port} is already used by interface {other}")]
    MacInUse {
        /// The port being added.
        port: String,
        /// The MAC.
        mac: String,
        /// The interface that has it.
        other: String,
    },

    /// Adding ports failed.
    #[error("adding port {port} to bridge {bridge}")]
    PortAdd {
        /// The (first) port.
        port: String,
        /// The bridge.
        bridge: String,
        /// The client error.
        #[source]
        source: ovsdb::Error,
    },

    /// Removing a port failed.
    #[error("removing port {port}")]
    PortRemove {
        /// The port.
        port: String,
        /// The client error.
        #[source]
        source: ovsdb::Error,
    },

    /// Changing a port or its interface failed.
    #[error("updating port {port}")]
    PortUpdate {
        /// The port.
        port: String,
        /// The client error.
        #[source]
        source: ovsdb::Error,
    },

    /// The port does not exist.
    #[error("port {port} does not exist")]
    PortNotFound {
        /// The port.
        port: String,
    },

    /// ovs-vswitchd could not add the interface (e.g. the tap does not exist).
    #[error("ovs-vswitchd could not add port {port}: {error}")]
    PortFailed {
        /// The port.
        port: String,
        /// The interface's `error` column.
        error: String,
    },

    /// No `ofport` within the timeout.
    #[error("port {port} got no ofport within {timeout:?}")]
    OfportTimeout {
        /// The port.
        port: String,
        /// The timeout.
        timeout: Duration,
    },

    /// Waiting for ovs-vswitchd to apply the configuration failed.
    #[error("waiting for ovs-vswitchd to apply the configuration")]
    Sync {
        /// The client error.
        #[source]
        source: ovsdb::Error,
    },
}

/// Open vSwitch configuration over OVSDB. Cheap to clone; clones share the client and the monitor.
#[derive(Clone)]
pub struct VSwitch {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    monitor: Monitor,
}

impl std::fmt::Debug for VSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VSwitch").field("client", &self.inner.client).finish_non_exhaustive()
    }
}

/// Why a transaction operation is there, to turn a failed precondition into the error it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    BridgeExists,
    NameFree(usize),
    MacFree(usize),
    InsertInterface(usize),
    InsertPort(usize),
    Other,
}

type Txn = ovsdb::Txn<Role>;

impl VSwitch {
    /// Connects to ovsdb-server and starts the monitor.
    pub async fn connect(endpoint: Endpoint, opts: ClientOptions) -> Result<Self, Error> {
        let client = Client::connect(endpoint, opts).await.map_err(|source| Error::Monitor { source })?;
        Self::new(client).await
    }

    /// Starts the monitor on an existing client.
    pub async fn new(client: Client) -> Result<Self, Error> {
        let request = MonitorRequest::new()
            .table(DB, &["bridges", "next_cfg", "cur_cfg"])
            .table("Bridge", &["name", "ports", "datapath_type", "external_ids"])
            .table("Port", &["name", "interfaces", "tag", "trunks", "vlan_mode"])
            .table(
                "Interface",
                &[
                    "name",
                    "type",
                    "ofport",
                    "error",
                    "external_ids",
                    "mtu_request",
                    "ingress_policing_rate",
                    "ingress_policing_burst",
                ],
            );
        let mut monitor = client.monitor_cond(DB, request).await.map_err(|source| Error::Monitor { source })?;
        // Read through the replica; whoever wants the change stream subscribes (`monitor().subscribe()`).
        monitor.discard_events();
        Ok(Self { inner: Arc::new(Inner { client, monitor }) })
    }

    /// The OVSDB client, for anything not wrapped here.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The monitor of `Open_vSwitch`, `Bridge`, `Port` and `Interface`: [`Monitor::subscribe`] for changes (an
    /// interface's `ofport` or `error`, ports added by others), [`Monitor::wait_for`] to wait for a state.
    pub fn monitor(&self) -> &Monitor {
        &self.inner.monitor
    }

    fn replica<R>(&self, f: impl FnOnce(&Replica) -> R) -> R {
        self.inner.monitor.with_replica(f)
    }

    /// Creates bridge `spec.name` with its internal port, or brings an existing one to `spec` (datapath type,
    /// `external_ids` pairs). Returns its uuid. Safe to call concurrently and repeatedly.
    pub async fn ensure_bridge(&self, spec: &BridgeSpec) -> Result<Uuid, Error> {
        spec.validate()?;
        let name = spec.name.as_str();
        let wrap = |source| Error::BridgeEnsure { bridge: name.to_owned(), source };
        for _ in 0..3 {
            let existing = self.replica(|r| {
                r.find("Bridge", "name", name).map(|(uuid, row)| {
                    let datapath = row.get("datapath_type").and_then(Value::as_str).unwrap_or_default().to_owned();
                    let ids = row.get("external_ids").map(Value::to_string_map).unwrap_or_default();
                    (uuid, datapath, ids)
                })
            });
            if let Some((uuid, datapath, ids)) = existing {
                let ids_ok = spec.external_ids.iter().all(|(k, v)| ids.get(k) == Some(v));
                if datapath == spec.datapath_type.as_str() && ids_ok {
                    return Ok(uuid);
                }
                let mut row = Row::new();
                row.insert("datapath_type".into(), spec.datapath_type.as_str().into());
                let keys: Vec<&str> = spec.external_ids.keys().map(String::as_str).collect();
                let ops = [
                    Operation::update("Bridge", vec![Condition::uuid(uuid)], row),
                    Operation::mutate(
                        "Bridge",
                        vec![Condition::uuid(uuid)],
                        vec![
                            Mutation::delete("external_ids", Value::set(keys)),
                            Mutation::insert("external_ids", Value::map(spec.external_ids.clone())),
                        ],
                    ),
                    Operation::comment(format!("qx-node: update bridge {name}")),
                ];
                let results = self.inner.client.transact(DB, &ops).await.map_err(wrap)?;
                if results[0].count == Some(1) {
                    info!(bridge = name, datapath = spec.datapath_type.as_str(), "bridge updated");
                    return Ok(uuid);
                }
                // Deleted meanwhile; create it.
                continue;
            }
            let mut iface = Row::new();
            iface.insert("name".into(), name.into());
            iface.insert("type".into(), "internal".into());
            let mut port = Row::new();
            port.insert("name".into(), name.into());
            port.insert("interfaces".into(), Value::named_uuid("iface"));
            let mut bridge = Row::new();
            bridge.insert("name".into(), name.into());
            bridge.insert("ports".into(), Value::named_uuid("port"));
            bridge.insert("datapath_type".into(), spec.datapath_type.as_str().into());
            if !spec.external_ids.is_empty() {
                bridge.insert("external_ids".into(), Value::map(spec.external_ids.clone()));
            }
            let ops = [
                Operation::wait(DB, vec![], &["_uuid"], WaitUntil::Ne, vec![], Some(0)),
                Operation::assert_absent("Bridge", vec![Condition::eq("name", name)]),
                Operation::insert_named("Interface", iface, "iface"),
                Operation::insert_named("Port", port, "port"),
                Operation::insert_named("Bridge", bridge, "bridge"),
                Operation::mutate(
                    DB,
                    vec![],
                    vec![Mutation::insert("bridges", Value::Set(vec![Atom::NamedUuid("bridge".into())]))],
                ),
                Operation::comment(format!("qx-node: create bridge {name}")),
            ];
            match self.inner.client.transact(DB, &ops).await {
                Ok(results) => {
                    let uuid = ovsdb::inserted_uuid(&results, 4).map_err(wrap)?;
                    info!(bridge = name, datapath = spec.datapath_type.as_str(), %uuid, "bridge created");
                    return Ok(uuid);
                }
                Err(e) if e.transaction_error().map(|(i, _)| i) == Some(0) => return Err(Error::NotInitialized),
                Err(e) if e.transaction_error().map(|(i, _)| i) == Some(1) => {
                    // Created by someone else meanwhile: wait until the replica shows it, then check it.
                    let _ = self
                        .inner
                        .monitor
                        .wait_for(Duration::from_secs(1), |r| r.find("Bridge", "name", name).map(drop))
                        .await;
                }
                Err(e) => return Err(wrap(e)),
            }
        }
        Err(wrap(ovsdb::Error::Request {
            method: "transact".into(),
            reason: "the bridge kept changing under us".into(),
        }))
    }

    /// Deletes a bridge with all its ports. Returns `false` if there was no such bridge.
    pub async fn delete_bridge(&self, name: &str) -> Result<bool, Error> {
        let Some(uuid) = self.replica(|r| r.find("Bridge", "name", name).map(|(uuid, _)| uuid)) else {
            return Ok(false);
        };
        let ops = [
            Operation::mutate(DB, vec![], vec![Mutation::delete("bridges", Value::set([uuid]))]),
            Operation::comment(format!("qx-node: delete bridge {name}")),
        ];
        self.inner
            .client
            .transact(DB, &ops)
            .await
            .map_err(|source| Error::BridgeDelete { bridge: name.to_owned(), source })?;
        info!(bridge = name, "bridge deleted");
        Ok(true)
    }

    /// Adds one port to `bridge`. See [`add_ports`](Self::add_ports).
    pub async fn add_port(&self, bridge: &str, spec: &PortSpec) -> Result<PortRef, Error> {
        spec.validate()?;
        let mut refs = self.add_ports_validated(bridge, std::slice::from_ref(spec)).await?;
        Ok(refs.remove(0))
    }

    /// Adds ports to `bridge` in one transaction: all of them or none. Fails if the bridge does not exist, a name
    /// is taken, or an `attached-mac` is already used (by an existing interface or by another port of the batch).
    pub async fn add_ports(&self, bridge: &str, specs: &[PortSpec]) -> Result<Vec<PortRef>, Error> {
        let mut p = Problems::default();
        for (i, spec) in specs.iter().enumerate() {
            spec.validate_into(&mut p, &format!("ports[{i}]"));
        }
        let mut names = std::collections::HashSet::new();
        let mut macs = std::collections::HashSet::new();
        for (i, spec) in specs.iter().enumerate() {
            if !names.insert(spec.name.as_str()) {
                p.add(format!("ports[{i}].name"), &spec.name, "is used by another port of the request");
            }
            if let Some(mac) = spec.external_ids.mac() {
                if !macs.insert(mac) {
                    p.add(
                        format!("ports[{i}].external_ids.attached_mac"),
                        spec.external_ids.attached_mac.as_deref().unwrap_or_default(),
                        "is used by another port of the request",
                    );
                }
            }
        }
        p.into_result()?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        self.add_ports_validated(bridge, specs).await
    }

    async fn add_ports_validated(&self, bridge: &str, specs: &[PortSpec]) -> Result<Vec<PortRef>, Error> {
        let mut bridge_row = Row::new();
        bridge_row.insert("name".into(), bridge.into());
        let mut txn = Txn::new();
        txn.push(
            Role::BridgeExists,
            Operation::wait(
                "Bridge",
                vec![Condition::eq("name", bridge)],
                &["name"],
                WaitUntil::Eq,
                vec![bridge_row],
                Some(0),
            ),
        );
        let mut new_ports = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let name = spec.name.as_str();
            txn.push(Role::NameFree(i), Operation::assert_absent("Port", vec![Condition::eq("name", name)]));
            txn.push(Role::NameFree(i), Operation::assert_absent("Interface", vec![Condition::eq("name", name)]));
            if let Some(mac) = spec.external_ids.mac() {
                txn.push(
                    Role::MacFree(i),
                    Operation::assert_absent(
                        "Interface",
                        vec![Condition::includes("external_ids", Value::map([(KEY_ATTACHED_MAC, mac)]))],
                    ),
                );
            }
            let iface = format!("i{i}");
            let port = format!("p{i}");
            txn.push(Role::InsertInterface(i), Operation::insert_named("Interface", spec.interface_row(), &iface));
            txn.push(Role::InsertPort(i), Operation::insert_named("Port", spec.port_row(&iface), &port));
            new_ports.push(Atom::NamedUuid(port));
        }
        txn.push(
            Role::Other,
            Operation::mutate(
                "Bridge",
                vec![Condition::eq("name", bridge)],
                vec![Mutation::insert("ports", Value::Set(new_ports))],
            ),
        );
        let first = specs[0].name.as_str();
        txn.push(
            Role::Other,
            Operation::comment(if specs.len() == 1 {
                format!("qx-node: add port {first} to bridge {bridge}")
            } else {
                format!("qx-node: add {} ports to bridge {bridge}", specs.len())
            }),
        );

        let results = match self.inner.client.transact(DB, txn.ops()).await {
            Ok(results) => results,
            Err(e) => return Err(self.add_error(bridge, specs, &txn, e)),
        };
        let mut refs: Vec<PortRef> = specs
            .iter()
            .map(|spec| PortRef { name: spec.name.clone(), port: Uuid::nil(), interface: Uuid::nil() })
            .collect();
        for (index, role) in txn.roles() {
            let uuid = results.get(index).and_then(|r| r.uuid).unwrap_or_default();
            match role {
                Role::InsertInterface(i) => refs[i].interface = uuid,
                Role::InsertPort(i) => refs[i].port = uuid,
                _ => {}
            }
        }
        if specs.len() == 1 {
            let spec = &specs[0];
            info!(port = first, bridge, vlan = ?spec.vlan, kind = ?spec.kind, "port added");
        } else {
            info!(ports = specs.len(), bridge, "ports added");
        }
        Ok(refs)
    }

    /// Turns a failed add transaction into what it means.
    fn add_error(&self, bridge: &str, specs: &[PortSpec], txn: &Txn, e: ovsdb::Error) -> Error {
        match txn.failed_role(&e) {
            Some(Role::BridgeExists) => Error::BridgeNotFound { bridge: bridge.to_owned() },
            Some(Role::NameFree(i)) => {
                let port = specs[i].name.clone();
                let bridge = self.port(&port).and_then(|p| p.bridge);
                Error::PortExists { port, bridge }
            }
            Some(Role::MacFree(i)) => {
                let mac = specs[i].external_ids.mac().unwrap_or_default();
                let other = self
                    .replica(|r| {
                        r.rows("Interface")
                            .find(|(_, row)| {
                                row.get("external_ids").and_then(|ids| ids.map_get(KEY_ATTACHED_MAC))
                                    == Some(&Atom::String(mac.clone()))
                            })
                            .and_then(|(_, row)| row.get("name").and_then(Value::as_str).map(str::to_owned))
                    })
                    .unwrap_or_else(|| "(unknown)".to_owned());
                Error::MacInUse { port: specs[i].name.clone(), mac, other }
            }
            _ => Error::PortAdd { port: specs[0].name.clone(), bridge: bridge.to_owned(), source: e },
        }
    }

    /// Removes port `name` (and its interface) from whatever bridge it is on. Returns `false` if there was no
    /// such port.
    pub async fn remove_port(&self, name: &str) -> Result<bool, Error> {
        let Some(uuid) = self.replica(|r| r.find("Port", "name", name).map(|(uuid, _)| uuid)) else {
            return Ok(false);
        };
        let ops = [
            Operation::mutate(
                "Bridge",
                vec![Condition::includes("ports", Value::set([uuid]))],
                vec![Mutation::delete("ports", Value::set([uuid]))],
            ),
            Operation::comment(format!("qx-node: remove port {name}")),
        ];
        let results = self
            .inner
            .client
            .transact(DB, &ops)
            .await
            .map_err(|source| Error::PortRemove { port: name.to_owned(), source })?;
        let removed = results[0].count.unwrap_or(0) > 0;
        if removed {
            info!(port = name, "port removed");
        } else {
            debug!(port = name, "port was on no bridge; nothing removed");
        }
        Ok(removed)
    }

    /// Changes a port's VLAN configuration.
    pub async fn set_port_vlan(&self, name: &str, vlan: &VlanConfig) -> Result<(), Error> {
        let mut p = Problems::default();
        validate_vlan(&mut p, "vlan", vlan);
        p.into_result()?;
        let ops = [Operation::update("Port", vec![Condition::eq("name", name)], vlan_columns(vlan))];
        self.update_one(name, &ops).await
    }

    /// Replaces the `vm-id`, `iface-id`, `attached-mac` and the `extra` keys of interface `name`'s `external_ids`
    /// (keys absent from `ids` are removed among those three; other keys are left alone).
    pub async fn set_external_ids(&self, name: &str, ids: &ExternalIds) -> Result<(), Error> {
        let mut p = Problems::default();
        ids.validate_into(&mut p, "external_ids");
        p.into_result()?;
        let mut keys: Vec<String> = vec![KEY_VM_ID.into(), KEY_IFACE_ID.into(), KEY_ATTACHED_MAC.into()];
        keys.extend(ids.extra.keys().cloned());
        let mut ops = Vec::new();
        if let Some(mac) = ids.mac() {
            ops.push(Operation::assert_absent(
                "Interface",
                vec![
                    Condition::includes("external_ids", Value::map([(KEY_ATTACHED_MAC, mac.as_str())])),
                    Condition::ne("name", name),
                ],
            ));
        }
        ops.push(Operation::mutate(
            "Interface",
            vec![Condition::eq("name", name)],
            vec![Mutation::delete("external_ids", Value::set(keys)), Mutation::insert("external_ids", ids.to_value())],
        ));
        match self.update_one(name, &ops).await {
            Err(Error::PortUpdate { source, .. })
                if ids.mac().is_some() && source.transaction_error() == Some((0, "timed out")) =>
            {
                let spec = PortSpec { external_ids: ids.clone(), ..PortSpec::new(name) };
                let mut txn = Txn::new();
                txn.push(Role::MacFree(0), ops[0].clone());
                Err(self.add_error("", std::slice::from_ref(&spec), &txn, source))
            }
            other => other,
        }
    }

    /// Sets (or with `None` clears) interface `name`'s `mtu_request`.
    pub async fn set_mtu(&self, name: &str, mtu: Option<u32>) -> Result<(), Error> {
        if let Some(mtu) = mtu {
            check_mtu(mtu).map_err(|problem| ValidationErrors::one("mtu", mtu, problem))?;
        }
        let mut row = Row::new();
        row.insert("mtu_request".into(), Value::set(mtu.map(i64::from)));
        let ops = [Operation::update("Interface", vec![Condition::eq("name", name)], row)];
        self.update_one(name, &ops).await
    }

    /// Sets (or with `None` turns off) interface `name`'s ingress policing.
    pub async fn set_ingress_policing(&self, name: &str, policing: Option<Policing>) -> Result<(), Error> {
        if let Some(policing) = policing {
            let mut p = Problems::default();
            validate_policing(&mut p, "ingress_policing", policing);
            p.into_result()?;
        }
        let ops = [Operation::update("Interface", vec![Condition::eq("name", name)], policing_columns(policing))];
        self.update_one(name, &ops).await
    }

    /// Runs `ops` whose last update/mutate must match exactly one row named `name`.
    async fn update_one(&self, name: &str, ops: &[Operation]) -> Result<(), Error> {
        let mut all = ops.to_vec();
        all.push(Operation::comment(format!("qx-node: update port {name}")));
        let results = self
            .inner
            .client
            .transact(DB, &all)
            .await
            .map_err(|source| Error::PortUpdate { port: name.to_owned(), source })?;
        match results[ops.len() - 1].count {
            Some(0) => Err(Error::PortNotFound { port: name.to_owned() }),
            _ => Ok(()),
        }
    }

    /// Waits for ovs-vswitchd to give interface `name` an OpenFlow port number, through the monitor.
    pub async fn wait_ofport(&self, name: &str, timeout: Duration) -> Result<u32, Error> {
        let found = self
            .inner
            .monitor
            .wait_for(timeout, |r| {
                let (_, iface) = r.find("Interface", "name", name)?;
                let ofport = iface.get("ofport").and_then(Value::as_i64);
                let error = iface.get("error").and_then(Value::as_str).unwrap_or_default();
                match ofport {
                    Some(port) if port > 0 => Some(Ok(port as u32)),
                    Some(-1) if !error.is_empty() => Some(Err(error.to_owned())),
                    _ => None,
                }
            })
            .await;
        match found {
            Ok(Ok(ofport)) => {
                debug!(port = name, ofport, "ofport assigned");
                Ok(ofport)
            }
            Ok(Err(error)) => Err(Error::PortFailed { port: name.to_owned(), error }),
            Err(ovsdb::Error::WaitTimeout { timeout, .. }) => {
                Err(Error::OfportTimeout { port: name.to_owned(), timeout })
            }
            Err(source) => Err(Error::PortUpdate { port: name.to_owned(), source }),
        }
    }

    /// Waits until ovs-vswitchd has applied every change committed so far (`next_cfg`/`cur_cfg`, as
    /// `ovs-vsctl` without `--no-wait` does).
    pub async fn sync(&self, timeout: Duration) -> Result<(), Error> {
        let ops = [
            Operation::mutate(DB, vec![], vec![Mutation::add("next_cfg", 1i64)]),
            Operation::select_columns(DB, vec![], &["next_cfg"]),
        ];
        let results = self.inner.client.transact(DB, &ops).await.map_err(|source| Error::Sync { source })?;
        let Some(target) = results[1]
            .rows
            .as_ref()
            .and_then(|rows| rows.first())
            .and_then(|row| row.get("next_cfg"))
            .and_then(Value::as_i64)
        else {
            return Err(Error::NotInitialized);
        };
        self.inner
            .monitor
            .wait_for(timeout, |r| {
                let (_, row) = r.rows(DB).next()?;
                (row.get("cur_cfg")?.as_i64()? >= target).then_some(())
            })
            .await
            .map_err(|source| Error::Sync { source })
    }

    /// Bridge names.
    pub fn bridges(&self) -> Vec<String> {
        self.replica(|r| {
            r.rows("Bridge").filter_map(|(_, row)| row.get("name").and_then(Value::as_str).map(str::to_owned)).collect()
        })
    }

    /// The names of the ports on `bridge` (including its internal port); empty if there is no such bridge.
    pub fn bridge_ports(&self, bridge: &str) -> Vec<String> {
        self.replica(|r| {
            let Some((_, row)) = r.find("Bridge", "name", bridge) else {
                return Vec::new();
            };
            row.get("ports")
                .and_then(Value::as_set)
                .unwrap_or_default()
                .iter()
                .filter_map(|port| {
                    let row = r.row("Port", &port.as_uuid()?)?;
                    row.get("name").and_then(Value::as_str).map(str::to_owned)
                })
                .collect()
        })
    }

    /// Port `name` as the database has it.
    pub fn port(&self, name: &str) -> Option<PortInfo> {
        self.replica(|r| {
            let (uuid, row) = r.find("Port", "name", name)?;
            let bridge = r
                .rows("Bridge")
                .find(|(_, b)| {
                    b.get("ports").and_then(Value::as_set).is_some_and(|ports| ports.contains(&Atom::Uuid(uuid)))
                })
                .and_then(|(_, b)| b.get("name").and_then(Value::as_str).map(str::to_owned));
            let interfaces = row
                .get("interfaces")
                .and_then(Value::as_set)
                .unwrap_or_default()
                .iter()
                .filter_map(|i| {
                    let uuid = i.as_uuid()?;
                    Some(interface_info(uuid, r.row("Interface", &uuid)?))
                })
                .collect();
            Some(PortInfo { name: name.to_owned(), uuid, bridge, vlan: vlan_of(row), interfaces })
        })
    }
}

fn vlan_of(port: &Row) -> VlanConfig {
    if let Some(tag) = port.get("tag").and_then(Value::as_i64) {
        return VlanConfig::Access { tag: tag as u16 };
    }
    let trunks: Vec<u16> = port
        .get("trunks")
        .and_then(Value::as_set)
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a.as_i64().map(|v| v as u16))
        .collect();
    if trunks.is_empty() {
        VlanConfig::None
    } else {
        VlanConfig::Trunk { trunks }
    }
}

fn interface_info(uuid: Uuid, row: &Row) -> InterfaceInfo {
    let text = |c: &str| row.get(c).and_then(Value::as_str).unwrap_or_default().to_owned();
    let error = text("error");
    InterfaceInfo {
        name: text("name"),
        uuid,
        kind: text("type"),
        ofport: row.get("ofport").and_then(Value::as_i64),
        error: (!error.is_empty()).then_some(error),
        external_ids: row.get("external_ids").map(Value::to_string_map).unwrap_or_default(),
        mtu_request: row.get("mtu_request").and_then(Value::as_i64),
        ingress_policing_rate: row.get("ingress_policing_rate").and_then(Value::as_i64).unwrap_or(0),
        ingress_policing_burst: row.get("ingress_policing_burst").and_then(Value::as_i64).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hostile_port_specs_are_refused_with_every_field() {
        // Unknown fields (`iface-id` instead of `iface_id`) are refused by serde already.
        let err =
            serde_json::from_value::<PortSpec>(json!({"name": "x", "external_ids": {"iface-id": "x"}})).unwrap_err();
        assert!(err.to_string().contains("unknown field `iface-id`"), "{err}");

        let spec = PortSpec {
            name: "tap 0/x".into(),
            vlan: VlanConfig::Trunk { trunks: vec![0, 10, 4095, 10] },
            external_ids: ExternalIds {
                iface_id: Some("a b".into()),
                attached_mac: Some("01:00:5e:00:00:01".into()),
                extra: BTreeMap::from([("vm-id".into(), "x".into())]),
                ..ExternalIds::default()
            },
            mtu: Some(9),
            ingress_policing: Some(Policing { rate_kbps: 0, burst_kb: 0 }),
            ..PortSpec::new("")
        };
        let err = spec.validate().unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "port.name",
                "port.vlan.trunks[0]",
                "port.vlan.trunks[2]",
                "port.vlan.trunks[3]",
                "port.external_ids.iface_id",
                "port.external_ids.attached_mac",
                "port.external_ids.extra",
                "port.mtu",
                "port.ingress_policing.rate_kbps",
            ]
        );
        assert!(err.to_string().starts_with(r#"port.name: "tap 0/x" contains whitespace"#), "{err}");
        assert!(err.to_string().contains(r#"port.vlan.trunks[2]: "4095" is outside 1..=4094"#), "{err}");
        assert!(err.to_string().contains(r#"port.vlan.trunks[3]: "10" is listed twice"#), "{err}");

        let access = PortSpec { vlan: VlanConfig::Access { tag: 0 }, ..PortSpec::new("tap0") };
        assert_eq!(access.validate().unwrap_err().to_string(), r#"port.vlan.tag: "0" is outside 1..=4094"#);
        let empty = PortSpec { vlan: VlanConfig::Trunk { trunks: vec![] }, ..PortSpec::new("tap0") };
        assert_eq!(empty.validate().unwrap_err().first_field(), "port.vlan.trunks");
    }

    #[test]
    fn bridge_names_are_checked() {
        assert!(BridgeSpec::new("br-int", DatapathType::Netdev).validate().is_ok());
        let err = BridgeSpec::new("br/0", DatapathType::System).validate().unwrap_err();
        assert_eq!(err.to_string(), r#"bridge.name: "br/0" contains '/' or ':'"#);
        let mut spec = BridgeSpec::new("br0", DatapathType::System);
        spec.external_ids.insert("bad key".into(), "v".into());
        assert_eq!(spec.validate().unwrap_err().first_field(), "bridge.external_ids");
    }

    #[test]
    fn specs_deserialize_strictly() {
        let spec: PortSpec = serde_json::from_value(json!({
            "name": "qxabc00",
            "vlan": {"mode": "access", "tag": 10},
            "external_ids": {"vm_id": "5b0c3c4e-55b5-4c55-9d3b-0bdfd0e7a1c2", "attached_mac": "52:54:00:12:34:56"},
            "mtu": 1450
        }))
        .unwrap();
        assert_eq!(spec.vlan, VlanConfig::Access { tag: 10 });
        assert!(spec.validate().is_ok());
        assert!(serde_json::from_value::<PortSpec>(json!({"name": "x", "vlan": {"mode": "access", "tag": 1, "x": 1}}))
            .is_err());
        assert!(serde_json::from_value::<PortSpec>(json!({"name": "x", "colour": "red"})).is_err());
        assert!(serde_json::from_value::<BridgeSpec>(json!({"name": "br0", "datapath_type": "dpdk"})).is_err());
    }

    #[test]
    fn rows_carry_the_spec() {
        let spec = PortSpec {
            kind: PortKind::Internal,
            vlan: VlanConfig::Trunk { trunks: vec![10, 20] },
            external_ids: ExternalIds {
                vm_id: Some(Uuid::nil()),
                iface_id: Some("lsp1".into()),
                attached_mac: Some("52:54:00:AA:BB:CC".into()),
                ..ExternalIds::default()
            },
            mtu: Some(1450),
            ingress_policing: Some(Policing { rate_kbps: 10_000, burst_kb: 1000 }),
            ..PortSpec::new("p1")
        };
        let iface = serde_json::to_value(spec.interface_row()).unwrap();
        assert_eq!(iface["type"], "internal");
        assert_eq!(iface["mtu_request"], json!(["set", [1450]]));
        assert_eq!(iface["ingress_policing_rate"], 10_000);
        let ids = spec.interface_row()["external_ids"].to_string_map();
        assert_eq!(ids["attached-mac"], "52:54:00:aa:bb:cc", "canonical case");
        assert_eq!(ids["iface-id"], "lsp1");
        assert_eq!(ids["vm-id"], Uuid::nil().to_string());
        let port = serde_json::to_value(spec.port_row("i0")).unwrap();
        assert_eq!(port["trunks"], json!(["set", [10, 20]]));
        assert_eq!(port["vlan_mode"], json!(["set", ["trunk"]]));
        assert_eq!(port["tag"], json!(["set", []]));
        assert_eq!(port["interfaces"], json!(["set", [["named-uuid", "i0"]]]));
        assert_eq!(vlan_of(&spec.port_row("i0")), spec.vlan);
    }
}
