//! [`Northbound`]: typed writes and monitored reads of the `OVN_Northbound` database.
//!
//! Every change is one transaction. Its first operation is a `wait` (timeout 0) asserting that what the change
//! was decided on is still what the database holds: the switch's `ports` for a new port (so a static IP or MAC
//! checked free stays free), every switch's name and subnet for a new switch (no overlapping subnets), a port
//! group's `acls` when its ACLs are replaced. A concurrent writer therefore makes the transaction fail instead of
//! being overwritten; it is retried on the fresh replica, a few times, then reported as [`Error::Conflict`].
//!
//! A successful write returns once the monitor's replica shows it, so a caller reads its own writes.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::spec::{check_ovn_name, check_port_group_name, AclSpec, Ipv4Cidr, PortAddress, PortSpec, SwitchSpec};
use crate::names::{Problems, ValidationErrors};
use crate::ovsdb::{
    self, Atom, Client, ClientOptions, Condition, Endpoint, Monitor, MonitorRequest, Mutation, Operation,
    OperationResult, Replica, Row, Value, WaitUntil,
};

/// The database name.
pub const DB: &str = "OVN_Northbound";

const LS: &str = "Logical_Switch";
const LSP: &str = "Logical_Switch_Port";
const DHCP: &str = "DHCP_Options";
const PG: &str = "Port_Group";
const ACL: &str = "ACL";

/// The `external_ids` key naming the switch a DHCP_Options row belongs to.
pub const KEY_SWITCH: &str = "qx-switch";
/// How often a write is retried after a concurrent change made its precondition fail.
const ATTEMPTS: usize = 10;
/// How long a write waits for its own change to show in the replica, and for a resync after a reconnect.
const SETTLE: Duration = Duration::from_secs(10);

/// What went wrong, named by the operation, with the object.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is invalid; every problem is listed with its field and value. Nothing was written.
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationErrors),

    /// Connecting or starting the monitor failed.
    #[error("starting the {DB} monitor")]
    Monitor {
        #[source]
        source: ovsdb::Error,
    },

    #[error("logical switch {name} already exists")]
    SwitchExists { name: String },

    #[error("logical switch {name} does not exist")]
    SwitchNotFound { name: String },

    #[error("logical switch port {name} already exists{}", switch.as_deref().map(|s| format!(" on switch {s}")).unwrap_or_default())]
    PortExists { name: String, switch: Option<String> },

    #[error("logical switch port {name} does not exist")]
    PortNotFound { name: String },

    #[error("port group {name} already exists")]
    PortGroupExists { name: String },

    #[error("port group {name} does not exist")]
    PortGroupNotFound { name: String },

    /// Other writers kept changing what this change depends on.
    #[error("{what}: the database kept changing under a concurrent writer; gave up after {ATTEMPTS} attempts")]
    Conflict { what: String },

    /// The transaction failed (or the connection was lost and the outcome could not be settled).
    #[error("{what}")]
    Transact {
        what: String,
        #[source]
        source: ovsdb::Error,
    },

    /// ovn-controller did not bind the port (`up`) in time.
    #[error("logical switch port {name} was not bound by any chassis (up) within {timeout:?}")]
    UpTimeout { name: String, timeout: Duration },
}

/// A logical switch as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchInfo {
    pub name: String,
    pub uuid: Uuid,
    pub subnet: Option<Ipv4Cidr>,
    /// Its DHCP_Options row, when it has DHCP.
    pub dhcp: Option<Uuid>,
    /// Its ports' names, sorted.
    pub ports: Vec<String>,
    pub external_ids: BTreeMap<String, String>,
}

/// A logical switch port as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    pub name: String,
    pub uuid: Uuid,
    /// The switch it is on.
    pub switch: Option<String>,
    /// `type` (`""` for a VM port, `localnet`, ...).
    pub kind: String,
    pub addresses: Vec<String>,
    /// The IPv4 address: the static one, or the one OVN picked (`dynamic_addresses`).
    pub ipv4: Option<Ipv4Addr>,
    /// Whether a chassis has bound it (`up`).
    pub up: bool,
    pub requested_chassis: Option<String>,
    pub external_ids: BTreeMap<String, String>,
}

/// An ACL as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclInfo {
    pub uuid: Uuid,
    pub spec: AclSpec,
}

/// A port group as the database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroupInfo {
    pub name: String,
    pub uuid: Uuid,
    /// Member ports' names, sorted.
    pub ports: Vec<String>,
    pub acls: Vec<AclInfo>,
    pub external_ids: BTreeMap<String, String>,
}

/// The OVN northbound database over our OVSDB client. Cheap to clone; clones share the client and the monitor.
#[derive(Clone)]
pub struct Northbound {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    monitor: Monitor,
    /// Serializes this client's guarded writes, so that they never invalidate each other's preconditions: only
    /// other control planes' writes make one retry.
    writes: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Northbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Northbound").field("client", &self.inner.client).finish_non_exhaustive()
    }
}

/// Why an operation is in a transaction, to turn a failed precondition into what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The state the change was decided on is unchanged (retry on failure).
    Unchanged,
    /// A switch of this name does not exist.
    SwitchAbsent,
    /// The port `i` of the request does not exist.
    PortAbsent(usize),
    /// The port group `i` of the request does not exist.
    GroupAbsent(usize),
    /// The port `i` of the request exists.
    PortPresent(usize),
    /// The port group `i` of the request exists.
    GroupPresent(usize),
    Other,
}

type Txn = ovsdb::Txn<Role>;

/// How one attempt ended.
enum Attempt<T> {
    Done(T),
    /// A precondition failed or the connection dropped: look at the replica again.
    Retry,
}

impl Northbound {
    /// Connects to the NB ovsdb-server and starts the monitor.
    pub async fn connect(endpoint: Endpoint, opts: ClientOptions) -> Result<Self, Error> {
        let client = Client::connect(endpoint, opts).await.map_err(|source| Error::Monitor { source })?;
        Self::new(client).await
    }

    /// Starts the monitor on an existing client.
    pub async fn new(client: Client) -> Result<Self, Error> {
        let request = MonitorRequest::new()
            .table(LS, &["name", "ports", "other_config", "external_ids"])
            .table(
                LSP,
                &[
                    "name",
                    "type",
                    "addresses",
                    "dynamic_addresses",
                    "port_security",
                    "up",
                    "options",
                    "dhcpv4_options",
                    "external_ids",
                ],
            )
            .table(DHCP, &["cidr", "options", "external_ids"])
            .table(PG, &["name", "ports", "acls", "external_ids"])
            .table(ACL, &["direction", "priority", "match", "action", "external_ids"]);
        let monitor = client.monitor_cond(DB, request).await.map_err(|source| Error::Monitor { source })?;
        Ok(Self { inner: Arc::new(Inner { client, monitor, writes: tokio::sync::Mutex::new(()) }) })
    }

    /// The OVSDB client (connection state, raw calls).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The monitor behind the reads: subscribe to it for changes.
    pub fn monitor(&self) -> &Monitor {
        &self.inner.monitor
    }

    fn replica<R>(&self, f: impl FnOnce(&Replica) -> R) -> R {
        self.inner.monitor.with_replica(f)
    }

    // ---- reads ----

    /// Every logical switch, by name.
    pub fn switches(&self) -> Vec<SwitchInfo> {
        let mut list: Vec<SwitchInfo> =
            self.replica(|r| r.rows(LS).map(|(uuid, row)| switch_info(r, *uuid, row)).collect());
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// One switch.
    pub fn switch(&self, name: &str) -> Option<SwitchInfo> {
        self.replica(|r| r.find(LS, "name", name).map(|(uuid, row)| switch_info(r, uuid, row)))
    }

    /// One port.
    pub fn port(&self, name: &str) -> Option<PortInfo> {
        self.replica(|r| r.find(LSP, "name", name).map(|(uuid, row)| port_info(r, uuid, row)))
    }

    /// Every port of `switch`, by name.
    pub fn switch_ports(&self, switch: &str) -> Vec<PortInfo> {
        let mut list: Vec<PortInfo> = self.replica(|r| {
            let Some((_, ls)) = r.find(LS, "name", switch) else {
                return Vec::new();
            };
            uuids(ls, "ports")
                .into_iter()
                .filter_map(|uuid| r.row(LSP, &uuid).map(|row| port_info(r, uuid, row)))
                .collect()
        });
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// One port group with its ACLs.
    pub fn port_group(&self, name: &str) -> Option<PortGroupInfo> {
        self.replica(|r| r.find(PG, "name", name).map(|(uuid, row)| group_info(r, uuid, row)))
    }

    /// Every port group, by name.
    pub fn port_groups(&self) -> Vec<PortGroupInfo> {
        let mut list: Vec<PortGroupInfo> =
            self.replica(|r| r.rows(PG).map(|(uuid, row)| group_info(r, *uuid, row)).collect());
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// What is wrong with `ip` as the static address of port `port` on `switch`, as the replica stands: not a host
    /// address of the switch's subnet, the address of its DHCP server, or another port's address. `None` when it is
    /// free (the port's own current address counts as free). [`add_ports`](Self::add_ports) checks the same again
    /// in its guarded transaction.
    pub fn static_address_problem(&self, switch: &str, ip: Ipv4Addr, port: &str) -> Option<String> {
        self.replica(|r| {
            let Some((_, row)) = r.find(LS, "name", switch) else {
                return Some(format!("cannot be checked: logical switch {switch} does not exist"));
            };
            let Some(subnet) = subnet_of(row) else {
                return Some(format!("needs a subnet on logical switch {switch}"));
            };
            if !subnet.is_host(ip) {
                return Some(format!("is not a host address of subnet {subnet}"));
            }
            if dhcp_of(r, switch).is_some() && ip == dhcp_server_ip(subnet, dhcp_router(r, switch)) {
                return Some("is the address of the subnet's DHCP server".into());
            }
            uuids(row, "ports").into_iter().find_map(|uuid| {
                let row = r.row(LSP, &uuid)?;
                let name = row.get("name").and_then(Value::as_str).unwrap_or_default();
                (name != port && ipv4_of(row) == Some(ip))
                    .then(|| format!("is used by port {name} on logical switch {switch}"))
            })
        })
    }

    /// Waits until a chassis has bound port `name` (`up` is true), through the monitor: no polling.
    pub async fn wait_port_up(&self, name: &str, timeout: Duration) -> Result<(), Error> {
        match self.wait_for_port(name, timeout, |p| p.up.then_some(())).await {
            Err(Error::Transact { source: ovsdb::Error::WaitTimeout { .. }, .. }) => {
                Err(Error::UpTimeout { name: name.to_owned(), timeout })
            }
            other => other,
        }
    }

    /// Waits until `f` returns `Some` for port `name` as the monitor has it (e.g. the address northd picked:
    /// `|p| p.ipv4`), at most `timeout`.
    pub async fn wait_for_port<T>(
        &self,
        name: &str,
        timeout: Duration,
        mut f: impl FnMut(&PortInfo) -> Option<T>,
    ) -> Result<T, Error> {
        self.inner
            .monitor
            .wait_for(timeout, |r| r.find(LSP, "name", name).and_then(|(uuid, row)| f(&port_info(r, uuid, row))))
            .await
            .map_err(|source| Error::Transact { what: format!("waiting on logical port {name}"), source })
    }

    // ---- switches ----

    /// Creates a logical switch with its subnet, DHCP_Options and localnet port, in one transaction. Refuses a
    /// subnet overlapping another switch's ([`Error::Invalid`] on `subnet`) and a taken name.
    pub async fn create_switch(&self, spec: &SwitchSpec) -> Result<Uuid, Error> {
        spec.validate()?;
        let what = || format!("creating logical switch {}", spec.name);
        let _writing = self.inner.writes.lock().await;
        for _ in 0..ATTEMPTS {
            let decided = self.replica(|r| {
                let mut snapshot = Vec::new();
                for (_, row) in r.rows(LS) {
                    let name = row.get("name").and_then(Value::as_str).unwrap_or_default();
                    if name == spec.name {
                        return Err(Error::SwitchExists { name: spec.name.clone() });
                    }
                    if let (Some(mine), Some(theirs)) = (spec.subnet, subnet_of(row)) {
                        if mine.overlaps(theirs) {
                            return Err(ValidationErrors::one(
                                "subnet",
                                mine,
                                format!("overlaps subnet {theirs} of logical switch {name}"),
                            )
                            .into());
                        }
                    }
                    snapshot.push(project(row, &["name", "other_config"]));
                }
                Ok(snapshot)
            })?;
            let mut txn = Txn::new();
            txn.push(
                Role::Unchanged,
                Operation::wait(LS, vec![], &["name", "other_config"], WaitUntil::Eq, decided, Some(0)),
            );
            txn.push(Role::SwitchAbsent, Operation::assert_absent(LS, vec![Condition::eq("name", spec.name.as_str())]));
            let mut other_config = BTreeMap::new();
            let mut ls = Row::new();
            ls.insert("name".into(), spec.name.as_str().into());
            if let Some(subnet) = spec.subnet {
                other_config.insert("subnet".to_owned(), subnet.to_string());
                if let Some(dhcp) = &spec.dhcp {
                    let server = dhcp_server_ip(subnet, dhcp.router);
                    if dhcp.router.is_none() {
                        // OVN's allocator must not hand out the address DHCP answers from.
                        other_config.insert("exclude_ips".to_owned(), server.to_string());
                    }
                    let mut options = BTreeMap::new();
                    options.insert("server_id".to_owned(), server.to_string());
                    options.insert("server_mac".to_owned(), server_mac(&spec.name));
                    options.insert("lease_time".to_owned(), dhcp.lease_seconds.to_string());
                    if let Some(router) = dhcp.router {
                        options.insert("router".to_owned(), router.to_string());
                    }
                    if !dhcp.dns_servers.is_empty() {
                        let list: Vec<String> = dhcp.dns_servers.iter().map(ToString::to_string).collect();
                        options.insert("dns_server".to_owned(), format!("{{{}}}", list.join(", ")));
                    }
                    if let Some(mtu) = dhcp.mtu {
                        options.insert("mtu".to_owned(), mtu.to_string());
                    }
                    let mut row = Row::new();
                    row.insert("cidr".into(), subnet.to_string().into());
                    row.insert("options".into(), Value::map(options));
                    row.insert("external_ids".into(), Value::map([(KEY_SWITCH, spec.name.as_str())]));
                    txn.push(Role::Other, Operation::insert(DHCP, row));
                }
            }
            ls.insert("other_config".into(), Value::map(other_config));
            ls.insert("external_ids".into(), Value::map(spec.external_ids.clone()));
            if let Some(localnet) = &spec.localnet {
                let mut lsp = Row::new();
                lsp.insert("name".into(), localnet_port(&spec.name).into());
                lsp.insert("type".into(), "localnet".into());
                lsp.insert("addresses".into(), Value::set(["unknown"]));
                lsp.insert("options".into(), Value::map([("network_name", localnet.network.as_str())]));
                if let Some(vlan) = localnet.vlan {
                    lsp.insert("tag_request".into(), i64::from(vlan).into());
                }
                txn.push(Role::Other, Operation::insert_named(LSP, lsp, "ln"));
                ls.insert("ports".into(), Value::set([Atom::NamedUuid("ln".into())]));
            }
            let insert = txn.push(Role::Other, Operation::insert(LS, ls));
            txn.push(Role::Other, Operation::comment(format!("qx-node: create logical switch {}", spec.name)));
            match self.run(&txn, &what).await? {
                Attempt::Done(results) => {
                    let uuid = inserted(&results, insert, &what)?;
                    self.settle(&what, |r| r.row(LS, &uuid).is_some()).await?;
                    info!(switch = %spec.name, subnet = ?spec.subnet.map(|s| s.to_string()), dhcp = spec.dhcp.is_some(), "logical switch created");
                    return Ok(uuid);
                }
                Attempt::Retry => {
                    if let Some(found) = self.switch(&spec.name) {
                        if found.subnet == spec.subnet && found.external_ids == spec.external_ids {
                            // Our own transaction, committed just before the connection dropped.
                            return Ok(found.uuid);
                        }
                    }
                }
            }
        }
        Err(Error::Conflict { what: what() })
    }

    /// Deletes a switch with its ports and its DHCP_Options. `false` if there was no such switch.
    pub async fn delete_switch(&self, name: &str) -> Result<bool, Error> {
        if self.switch(name).is_none() {
            return Ok(false);
        }
        let ops = [
            Operation::delete(LS, vec![Condition::eq("name", name)]),
            Operation::delete(DHCP, vec![Condition::includes("external_ids", Value::map([(KEY_SWITCH, name)]))]),
            Operation::comment(format!("qx-node: delete logical switch {name}")),
        ];
        let what = || format!("deleting logical switch {name}");
        let results = self.transact(&ops, &what).await?;
        self.settle(&what, |r| r.find(LS, "name", name).is_none()).await?;
        let deleted = results[0].count.unwrap_or(0) > 0;
        if deleted {
            info!(switch = name, "logical switch deleted");
        }
        Ok(deleted)
    }

    // ---- ports ----

    /// Adds one port to `switch`. See [`add_ports`](Self::add_ports).
    pub async fn add_port(&self, switch: &str, spec: &PortSpec) -> Result<Uuid, Error> {
        let uuids = self.add_ports(switch, std::slice::from_ref(spec)).await?;
        Ok(uuids[0])
    }

    /// Adds ports to `switch` in one transaction, all or none. Static addresses must be free host addresses of
    /// the switch's subnet (not its DHCP server's), MACs unused on the switch, names unused anywhere. With DHCP
    /// on the switch, ports with an address get its DHCP_Options.
    ///
    /// If the connection drops before the reply, the outcome is read back once the monitor has resynced: a port
    /// is neither lost nor added twice.
    pub async fn add_ports(&self, switch: &str, specs: &[PortSpec]) -> Result<Vec<Uuid>, Error> {
        let mut p = Problems::default();
        let many = specs.len() > 1;
        for (i, spec) in specs.iter().enumerate() {
            spec.validate_into(&mut p, &if many { format!("ports[{i}].") } else { String::new() });
        }
        p.into_result()?;
        if specs.is_empty() {
            return Ok(Vec::new());
        }
        let what = || match specs {
            [one] => format!("adding port {} to logical switch {switch}", one.name),
            _ => format!("adding {} ports to logical switch {switch}", specs.len()),
        };
        let _writing = self.inner.writes.lock().await;
        for _ in 0..ATTEMPTS {
            let (ls, ports, dhcp) = self.replica(|r| check_new_ports(r, switch, specs))?;
            let mut txn = Txn::new();
            txn.push(
                Role::Unchanged,
                Operation::wait(
                    LS,
                    vec![Condition::uuid(ls)],
                    &["ports"],
                    WaitUntil::Eq,
                    vec![Row::from([("ports".to_owned(), Value::set(ports))])],
                    Some(0),
                ),
            );
            let mut inserts = Vec::with_capacity(specs.len());
            let mut named = Vec::with_capacity(specs.len());
            let mut members: BTreeMap<&str, Vec<Atom>> = BTreeMap::new();
            for (i, spec) in specs.iter().enumerate() {
                txn.push(
                    Role::PortAbsent(i),
                    Operation::assert_absent(LSP, vec![Condition::eq("name", spec.name.as_str())]),
                );
                let dhcp = dhcp.filter(|_| spec.address != PortAddress::None);
                let name = format!("p{i}");
                inserts.push(txn.push(Role::Other, Operation::insert_named(LSP, port_row(spec, dhcp), &name)));
                for group in &spec.port_groups {
                    members.entry(group.as_str()).or_default().push(Atom::NamedUuid(name.clone()));
                }
                named.push(Atom::NamedUuid(name));
            }
            txn.push(
                Role::Other,
                Operation::mutate(LS, vec![Condition::uuid(ls)], vec![Mutation::insert("ports", Value::Set(named))]),
            );
            let groups: Vec<&str> = members.keys().copied().collect();
            for (g, (group, ports)) in members.into_iter().enumerate() {
                // Port_Group.ports is weak: joining a group deleted meanwhile must fail, not vanish.
                txn.push(
                    Role::GroupPresent(g),
                    Operation::wait(PG, vec![Condition::eq("name", group)], &["name"], WaitUntil::Ne, vec![], Some(0)),
                );
                txn.push(
                    Role::Other,
                    Operation::mutate(
                        PG,
                        vec![Condition::eq("name", group)],
                        vec![Mutation::insert("ports", Value::Set(ports))],
                    ),
                );
            }
            txn.push(Role::Other, Operation::comment(format!("qx-node: {}", what())));
            match self.run(&txn, &what).await {
                Ok(Attempt::Done(results)) => {
                    let uuids = inserts.iter().map(|i| inserted(&results, *i, &what)).collect::<Result<Vec<_>, _>>()?;
                    self.settle(&what, |r| uuids.iter().all(|u| r.row(LSP, u).is_some())).await?;
                    match specs {
                        [one] => info!(port = %one.name, switch, address = ?one.address, "logical port added"),
                        _ => info!(ports = specs.len(), switch, "logical ports added"),
                    }
                    return Ok(uuids);
                }
                Ok(Attempt::Retry) => {
                    // After a lost connection our transaction may have committed: the resynced replica says.
                    if let Some(uuids) = self.replica(|r| already_added(r, switch, specs)) {
                        debug!(switch, ports = specs.len(), "ports found committed after a reconnect");
                        return Ok(uuids);
                    }
                }
                Err(Error::Transact { source, .. })
                    if matches!(txn.failed_role(&source), Some(Role::PortAbsent(_))) =>
                {
                    let Some(Role::PortAbsent(i)) = txn.failed_role(&source) else { unreachable!() };
                    let name = specs[i].name.clone();
                    return Err(Error::PortExists { switch: self.port(&name).and_then(|p| p.switch), name });
                }
                Err(Error::Transact { source, .. })
                    if matches!(txn.failed_role(&source), Some(Role::GroupPresent(_))) =>
                {
                    let Some(Role::GroupPresent(g)) = txn.failed_role(&source) else { unreachable!() };
                    return Err(Error::PortGroupNotFound { name: groups[g].to_owned() });
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict { what: what() })
    }

    /// Removes port `name` from its switch (which deletes it). `false` if there was no such port.
    pub async fn remove_port(&self, name: &str) -> Result<bool, Error> {
        let Some(uuid) = self.replica(|r| r.find(LSP, "name", name).map(|(uuid, _)| uuid)) else {
            return Ok(false);
        };
        let ops = [
            Operation::mutate(
                LS,
                vec![Condition::includes("ports", Value::set([uuid]))],
                vec![Mutation::delete("ports", Value::set([uuid]))],
            ),
            Operation::comment(format!("qx-node: remove logical port {name}")),
        ];
        let what = || format!("removing logical port {name}");
        let results = self.transact(&ops, &what).await?;
        self.settle(&what, |r| r.row(LSP, &uuid).is_none()).await?;
        let removed = results[0].count.unwrap_or(0) > 0;
        if removed {
            info!(port = name, "logical port removed");
        }
        Ok(removed)
    }

    /// Sets (or clears) the chassis that should bind port `name` (`options:requested-chassis`), as a migration
    /// moves it.
    pub async fn set_requested_chassis(&self, name: &str, chassis: Option<&str>) -> Result<(), Error> {
        if let Some(chassis) = chassis {
            check_ovn_name(chassis).map_err(|problem| ValidationErrors::one("requested_chassis", chassis, problem))?;
        }
        if self.port(name).is_none() {
            return Err(Error::PortNotFound { name: name.to_owned() });
        }
        let mut mutations = vec![Mutation::delete("options", Value::set(["requested-chassis"]))];
        if let Some(chassis) = chassis {
            mutations.push(Mutation::insert("options", Value::map([("requested-chassis", chassis)])));
        }
        let ops = [Operation::mutate(LSP, vec![Condition::eq("name", name)], mutations)];
        let what = || format!("setting the requested chassis of logical port {name}");
        let results = self.transact(&ops, &what).await?;
        if results[0].count != Some(1) {
            return Err(Error::PortNotFound { name: name.to_owned() });
        }
        let want = chassis.map(str::to_owned);
        self.settle(&what, |r| {
            r.find(LSP, "name", name).is_some_and(|(_, row)| {
                row.get("options")
                    .and_then(|o| o.map_get("requested-chassis"))
                    .and_then(Atom::as_str)
                    .map(str::to_owned)
                    == want
            })
        })
        .await
    }

    // ---- port groups and ACLs ----

    /// Creates an empty port group without ACLs.
    pub async fn create_port_group(&self, name: &str, external_ids: &BTreeMap<String, String>) -> Result<Uuid, Error> {
        self.create_port_group_with_acls(name, external_ids, &[]).await
    }

    /// Creates an empty port group with its ACLs, in one transaction.
    pub async fn create_port_group_with_acls(
        &self,
        name: &str,
        external_ids: &BTreeMap<String, String>,
        acls: &[AclSpec],
    ) -> Result<Uuid, Error> {
        let uuids = self.create_port_groups(&[(name, external_ids, acls)]).await?;
        Ok(uuids[0])
    }

    /// Creates empty port groups, each `(name, external_ids, acls)` with its ACLs, in one transaction: all or none
    /// (a taken name is [`Error::PortGroupExists`]).
    pub async fn create_port_groups(
        &self,
        groups: &[(&str, &BTreeMap<String, String>, &[AclSpec])],
    ) -> Result<Vec<Uuid>, Error> {
        let mut p = Problems::default();
        let many = groups.len() > 1;
        for (g, (name, _, acls)) in groups.iter().enumerate() {
            let prefix = if many { format!("groups[{g}].") } else { String::new() };
            p.check(format!("{prefix}name"), name, check_port_group_name(name));
            for (i, acl) in acls.iter().enumerate() {
                acl.validate_into(&mut p, &format!("{prefix}acls[{i}]."));
            }
        }
        p.into_result()?;
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut txn = Txn::new();
        let mut inserts = Vec::with_capacity(groups.len());
        for (g, (name, external_ids, acls)) in groups.iter().enumerate() {
            txn.push(Role::GroupAbsent(g), Operation::assert_absent(PG, vec![Condition::eq("name", *name)]));
            let mut named = Vec::new();
            for (i, acl) in acls.iter().enumerate() {
                let acl_name = format!("g{g}a{i}");
                txn.push(Role::Other, Operation::insert_named(ACL, acl_row(acl), &acl_name));
                named.push(Atom::NamedUuid(acl_name));
            }
            let mut row = Row::new();
            row.insert("name".into(), (*name).into());
            row.insert("acls".into(), Value::Set(named));
            row.insert("external_ids".into(), Value::map((*external_ids).clone()));
            inserts.push(txn.push(Role::Other, Operation::insert(PG, row)));
        }
        let what = || match groups {
            [(name, ..)] => format!("creating port group {name}"),
            _ => format!("creating {} port groups", groups.len()),
        };
        txn.push(Role::Other, Operation::comment(format!("qx-node: {}", what())));
        let results = match self.transact_txn(&txn, &what).await {
            Ok(results) => results,
            Err(Error::Transact { source, .. }) if matches!(txn.failed_role(&source), Some(Role::GroupAbsent(_))) => {
                let Some(Role::GroupAbsent(g)) = txn.failed_role(&source) else { unreachable!() };
                return Err(Error::PortGroupExists { name: groups[g].0.to_owned() });
            }
            Err(e) => return Err(e),
        };
        let uuids = inserts.iter().map(|i| inserted(&results, *i, &what)).collect::<Result<Vec<_>, _>>()?;
        self.settle(&what, |r| uuids.iter().all(|u| r.row(PG, u).is_some())).await?;
        match groups {
            [(name, _, acls)] => info!(group = name, acls = acls.len(), "port group created"),
            _ => info!(groups = groups.len(), "port groups created"),
        }
        Ok(uuids)
    }

    /// Deletes a port group with its ACLs. `false` if there was none.
    pub async fn delete_port_group(&self, name: &str) -> Result<bool, Error> {
        let ops = [
            Operation::delete(PG, vec![Condition::eq("name", name)]),
            Operation::comment(format!("qx-node: delete port group {name}")),
        ];
        let what = || format!("deleting port group {name}");
        let results = self.transact(&ops, &what).await?;
        self.settle(&what, |r| r.find(PG, "name", name).is_none()).await?;
        Ok(results[0].count.unwrap_or(0) > 0)
    }

    /// Adds ports (by name) to a port group; each must exist.
    pub async fn add_to_port_group(&self, group: &str, ports: &[&str]) -> Result<(), Error> {
        self.change_port_group(group, ports, true).await
    }

    /// Removes ports (by name) from a port group; names not in it are ignored.
    pub async fn remove_from_port_group(&self, group: &str, ports: &[&str]) -> Result<(), Error> {
        self.change_port_group(group, ports, false).await
    }

    async fn change_port_group(&self, group: &str, ports: &[&str], add: bool) -> Result<(), Error> {
        let uuids = self.replica(|r| {
            if r.find(PG, "name", group).is_none() {
                return Err(Error::PortGroupNotFound { name: group.to_owned() });
            }
            ports
                .iter()
                .filter_map(|name| match r.find(LSP, "name", name) {
                    Some((uuid, _)) => Some(Ok(uuid)),
                    None if add => Some(Err(Error::PortNotFound { name: (*name).to_owned() })),
                    None => None,
                })
                .collect::<Result<Vec<Uuid>, Error>>()
        })?;
        if uuids.is_empty() {
            return Ok(());
        }
        let mut txn = Txn::new();
        if add {
            for (i, uuid) in uuids.iter().enumerate() {
                // A weak reference to a deleted row would vanish silently: assert the port is still there.
                txn.push(
                    Role::PortPresent(i),
                    Operation::wait(LSP, vec![Condition::uuid(*uuid)], &["name"], WaitUntil::Ne, vec![], Some(0)),
                );
            }
        }
        let mutation = if add { Mutation::insert } else { Mutation::delete };
        let change = txn.push(
            Role::Other,
            Operation::mutate(
                PG,
                vec![Condition::eq("name", group)],
                vec![mutation("ports", Value::set(uuids.clone()))],
            ),
        );
        let verb = if add { "add" } else { "remove" };
        txn.push(
            Role::Other,
            Operation::comment(format!("qx-node: {verb} {} ports of port group {group}", uuids.len())),
        );
        let what = || format!("changing the ports of port group {group}");
        let results = match self.transact_txn(&txn, &what).await {
            Ok(results) => results,
            Err(Error::Transact { source, .. }) if matches!(txn.failed_role(&source), Some(Role::PortPresent(_))) => {
                let Some(Role::PortPresent(i)) = txn.failed_role(&source) else { unreachable!() };
                return Err(Error::PortNotFound { name: ports[i].to_owned() });
            }
            Err(e) => return Err(e),
        };
        if results[change].count != Some(1) {
            return Err(Error::PortGroupNotFound { name: group.to_owned() });
        }
        self.settle(&what, |r| {
            r.find(PG, "name", group).is_some_and(|(_, row)| {
                let members = uuids_of(row, "ports");
                uuids.iter().all(|u| members.contains(u) == add)
            })
        })
        .await
    }

    /// Replaces every ACL of a port group with `acls`, atomically: a concurrent change to the group's ACLs makes
    /// this retry on the fresh state rather than overwrite it. Returns the new ACLs' uuids.
    pub async fn set_port_group_acls(&self, group: &str, acls: &[AclSpec]) -> Result<Vec<Uuid>, Error> {
        let mut p = Problems::default();
        for (i, acl) in acls.iter().enumerate() {
            acl.validate_into(&mut p, &format!("acls[{i}]."));
        }
        p.into_result()?;
        let what = || format!("setting the ACLs of port group {group}");
        let _writing = self.inner.writes.lock().await;
        for _ in 0..ATTEMPTS {
            let (pg, current) = self
                .replica(|r| r.find(PG, "name", group).map(|(uuid, row)| (uuid, uuids_of(row, "acls"))))
                .ok_or_else(|| Error::PortGroupNotFound { name: group.to_owned() })?;
            let mut txn = Txn::new();
            txn.push(
                Role::Unchanged,
                Operation::wait(
                    PG,
                    vec![Condition::uuid(pg)],
                    &["acls"],
                    WaitUntil::Eq,
                    vec![Row::from([("acls".to_owned(), Value::set(current))])],
                    Some(0),
                ),
            );
            let mut inserts = Vec::new();
            let mut named = Vec::new();
            for (i, acl) in acls.iter().enumerate() {
                let name = format!("a{i}");
                inserts.push(txn.push(Role::Other, Operation::insert_named(ACL, acl_row(acl), &name)));
                named.push(Atom::NamedUuid(name));
            }
            txn.push(
                Role::Other,
                Operation::update(PG, vec![Condition::uuid(pg)], Row::from([("acls".to_owned(), Value::Set(named))])),
            );
            txn.push(
                Role::Other,
                Operation::comment(format!("qx-node: set {} ACLs of port group {group}", acls.len())),
            );
            match self.run(&txn, &what).await? {
                Attempt::Done(results) => {
                    let uuids = inserts.iter().map(|i| inserted(&results, *i, &what)).collect::<Result<Vec<_>, _>>()?;
                    self.settle(&what, |r| {
                        r.row(PG, &pg).is_some_and(|row| {
                            let now = uuids_of(row, "acls");
                            now.len() == uuids.len() && uuids.iter().all(|u| now.contains(u) && r.row(ACL, u).is_some())
                        })
                    })
                    .await?;
                    info!(group, acls = acls.len(), "port group ACLs set");
                    return Ok(uuids);
                }
                Attempt::Retry => {}
            }
        }
        Err(Error::Conflict { what: what() })
    }

    // ---- transactions ----

    async fn transact(
        &self,
        ops: &[Operation],
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<Vec<OperationResult>, Error> {
        self.inner.client.transact(DB, ops).await.map_err(|source| Error::Transact { what: what(), source })
    }

    async fn transact_txn(&self, txn: &Txn, what: &(dyn Fn() -> String + Sync)) -> Result<Vec<OperationResult>, Error> {
        self.transact(txn.ops(), what).await
    }

    /// Runs a transaction whose precondition may fail: `Retry` when it did (or the connection dropped, once the
    /// monitor has resynced), `Done` with the results when it committed, the error otherwise.
    async fn run(&self, txn: &Txn, what: &(dyn Fn() -> String + Sync)) -> Result<Attempt<Vec<OperationResult>>, Error> {
        match self.inner.client.transact(DB, txn.ops()).await {
            Ok(results) => Ok(Attempt::Done(results)),
            Err(source) if txn.failed_role(&source) == Some(Role::Unchanged) => {
                debug!(what = %what(), "a concurrent change invalidated the precondition; retrying");
                self.await_fresh_replica().await;
                Ok(Attempt::Retry)
            }
            Err(source @ ovsdb::Error::Disconnected { .. }) => {
                warn!(what = %what(), error = %source, "NB connection lost mid-transaction; reading the outcome back");
                self.await_resync(what).await?;
                Ok(Attempt::Retry)
            }
            Err(source) => Err(Error::Transact { what: what(), source }),
        }
    }

    /// Lets the monitor catch up with a change it may not have delivered yet (one round trip: ovsdb-server sends
    /// the update of a committed transaction before it answers a later request).
    async fn await_fresh_replica(&self) {
        let _ = self.inner.client.echo(vec![]).await;
    }

    /// Waits until the client has reconnected and the monitor has resynced its replica.
    async fn await_resync(&self, what: &(dyn Fn() -> String + Sync)) -> Result<(), Error> {
        self.inner.monitor.wait_synced(SETTLE).await.map_err(|source| Error::Transact {
            what: format!("{} (waiting for the NB database to come back)", what()),
            source,
        })
    }

    /// Waits until the replica shows a committed change.
    async fn settle(
        &self,
        what: &(dyn Fn() -> String + Sync),
        mut done: impl FnMut(&Replica) -> bool,
    ) -> Result<(), Error> {
        self.inner.monitor.wait_for(SETTLE, |r| done(r).then_some(())).await.map_err(|source| Error::Transact {
            what: format!("{} (waiting for the monitor to show it)", what()),
            source,
        })
    }
}

fn inserted(results: &[OperationResult], index: usize, what: &(dyn Fn() -> String + Sync)) -> Result<Uuid, Error> {
    ovsdb::inserted_uuid(results, index).map_err(|source| Error::Transact { what: what(), source })
}

/// Checks new ports against the replica: the switch exists, names are free, MACs and static addresses unused.
/// Returns the switch, its current ports (the precondition) and its DHCP_Options.
fn check_new_ports(r: &Replica, switch: &str, specs: &[PortSpec]) -> Result<(Uuid, Vec<Uuid>, Option<Uuid>), Error> {
    let (ls, row) = r.find(LS, "name", switch).ok_or_else(|| Error::SwitchNotFound { name: switch.to_owned() })?;
    let ports = uuids_of(row, "ports");
    let subnet = subnet_of(row);
    let dhcp = dhcp_of(r, switch);
    let server = dhcp.and(subnet).map(|s| dhcp_server_ip(s, dhcp_router(r, switch)));
    let mut used_macs: BTreeMap<String, String> = BTreeMap::new();
    let mut used_ips: BTreeMap<Ipv4Addr, String> = BTreeMap::new();
    // From the rows alone (not `port_info`, which looks up each port's switch): this runs on every port added.
    for uuid in &ports {
        let Some(port) = r.row(LSP, uuid) else { continue };
        let name = port.get("name").and_then(Value::as_str).unwrap_or_default();
        for address in strings(port, "addresses") {
            if let Some(mac) = address.split_whitespace().next().filter(|m| m.contains(':')) {
                used_macs.insert(mac.to_ascii_lowercase(), name.to_owned());
            }
        }
        if let Some(ip) = ipv4_of(port) {
            used_ips.insert(ip, name.to_owned());
        }
    }
    let mut p = Problems::default();
    let many = specs.len() > 1;
    for (i, spec) in specs.iter().enumerate() {
        let field = |f: &str| if many { format!("ports[{i}].{f}") } else { f.to_owned() };
        if let Some((_, existing)) = r.find(LSP, "name", &spec.name) {
            let _ = existing;
            return Err(Error::PortExists { name: spec.name.clone(), switch: port_switch(r, &spec.name) });
        }
        if let Some(group) = spec.port_groups.iter().find(|g| r.find(PG, "name", g).is_none()) {
            return Err(Error::PortGroupNotFound { name: group.clone() });
        }
        let mac = spec.mac_lower();
        if let Some(other) = used_macs.insert(mac.clone(), spec.name.clone()) {
            p.add(field("mac"), &spec.mac, format!("is used by port {other} on logical switch {switch}"));
        }
        match (spec.address, subnet) {
            (PortAddress::None, _) => {}
            (_, None) => p.add(
                field("address"),
                address_text(spec.address),
                format!("needs a subnet on logical switch {switch}"),
            ),
            (PortAddress::Dynamic, Some(_)) => {}
            (PortAddress::Static(ip), Some(subnet)) => {
                if !subnet.is_host(ip) {
                    p.add(field("address"), ip, format!("is not a host address of subnet {subnet}"));
                } else if Some(ip) == server {
                    p.add(field("address"), ip, "is the address of the subnet's DHCP server");
                } else if let Some(other) = used_ips.insert(ip, spec.name.clone()) {
                    p.add(field("address"), ip, format!("is used by port {other} on logical switch {switch}"));
                }
            }
        }
    }
    p.into_result()?;
    Ok((ls, ports, dhcp))
}

fn address_text(address: PortAddress) -> String {
    match address {
        PortAddress::None => "none".into(),
        PortAddress::Dynamic => "dynamic".into(),
        PortAddress::Static(ip) => ip.to_string(),
    }
}

/// The ports' uuids if all of them are on `switch` as asked (a transaction that committed before its reply was
/// lost).
fn already_added(r: &Replica, switch: &str, specs: &[PortSpec]) -> Option<Vec<Uuid>> {
    specs
        .iter()
        .map(|spec| {
            let (uuid, row) = r.find(LSP, "name", &spec.name)?;
            let same = strings(row, "addresses") == vec![spec.addresses()]
                && port_switch(r, &spec.name).as_deref() == Some(switch);
            same.then_some(uuid)
        })
        .collect()
}

fn port_row(spec: &PortSpec, dhcp: Option<Uuid>) -> Row {
    let mut row = Row::new();
    row.insert("name".into(), spec.name.as_str().into());
    row.insert("addresses".into(), Value::set([spec.addresses()]));
    row.insert("port_security".into(), Value::set(spec.port_security_entry()));
    if let Some(chassis) = &spec.requested_chassis {
        row.insert("options".into(), Value::map([("requested-chassis", chassis.as_str())]));
    }
    if let Some(dhcp) = dhcp {
        row.insert("dhcpv4_options".into(), Value::set([dhcp]));
    }
    row.insert("external_ids".into(), Value::map(spec.external_ids.clone()));
    row
}

fn acl_row(acl: &AclSpec) -> Row {
    let mut row = Row::new();
    row.insert("direction".into(), acl.direction.as_str().into());
    row.insert("priority".into(), i64::from(acl.priority).into());
    row.insert("match".into(), acl.match_.as_str().into());
    row.insert("action".into(), acl.action.as_str().into());
    row.insert("external_ids".into(), Value::map(acl.external_ids.clone()));
    row
}

/// The localnet port's name on `switch`.
pub fn localnet_port(switch: &str) -> String {
    format!("ln-{switch}")
}

/// The address OVN's DHCP answers from: the router when given, else the subnet's first host.
fn dhcp_server_ip(subnet: Ipv4Cidr, router: Option<Ipv4Addr>) -> Ipv4Addr {
    router.or_else(|| subnet.nth(1)).unwrap_or(subnet.network())
}

/// A stable locally administered MAC for a switch's DHCP server.
fn server_mac(switch: &str) -> String {
    let digest = Sha256::digest(format!("qx-ovn-dhcp:{switch}").as_bytes());
    format!("0a:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", digest[0], digest[1], digest[2], digest[3], digest[4])
}

fn project(row: &Row, columns: &[&str]) -> Row {
    columns.iter().filter_map(|c| row.get(*c).map(|v| ((*c).to_owned(), v.clone()))).collect()
}

fn strings(row: &Row, column: &str) -> Vec<String> {
    row.get(column)
        .and_then(Value::as_set)
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

fn uuids(row: &Row, column: &str) -> Vec<Uuid> {
    row.get(column).and_then(Value::as_set).unwrap_or_default().iter().filter_map(Atom::as_uuid).collect()
}

fn uuids_of(row: &Row, column: &str) -> Vec<Uuid> {
    uuids(row, column)
}

fn string_map(row: &Row, column: &str) -> BTreeMap<String, String> {
    row.get(column).map(Value::to_string_map).unwrap_or_default()
}

fn subnet_of(row: &Row) -> Option<Ipv4Cidr> {
    row.get("other_config").and_then(|c| c.map_get("subnet")).and_then(Atom::as_str).and_then(|s| s.parse().ok())
}

fn dhcp_of(r: &Replica, switch: &str) -> Option<Uuid> {
    r.rows(DHCP)
        .find(|(_, row)| {
            row.get("external_ids").and_then(|ids| ids.map_get(KEY_SWITCH)).and_then(Atom::as_str) == Some(switch)
        })
        .map(|(uuid, _)| *uuid)
}

fn dhcp_router(r: &Replica, switch: &str) -> Option<Ipv4Addr> {
    let uuid = dhcp_of(r, switch)?;
    r.row(DHCP, &uuid)?.get("options")?.map_get("router")?.as_str()?.parse().ok()
}

fn port_switch(r: &Replica, port: &str) -> Option<String> {
    let (uuid, _) = r.find(LSP, "name", port)?;
    r.rows(LS)
        .find(|(_, row)| uuids(row, "ports").contains(&uuid))
        .and_then(|(_, row)| row.get("name").and_then(Value::as_str).map(str::to_owned))
}

fn switch_info(r: &Replica, uuid: Uuid, row: &Row) -> SwitchInfo {
    let name = row.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut ports: Vec<String> =
        uuids(row, "ports").iter().filter_map(|u| r.row(LSP, u)?.get("name")?.as_str().map(str::to_owned)).collect();
    ports.sort();
    SwitchInfo {
        dhcp: dhcp_of(r, &name),
        name,
        uuid,
        subnet: subnet_of(row),
        ports,
        external_ids: string_map(row, "external_ids"),
    }
}

/// A port's IPv4 address: the static one in `addresses`, else the one northd picked (`dynamic_addresses`).
fn ipv4_of(row: &Row) -> Option<Ipv4Addr> {
    let ip_of = |address: &String| address.split_whitespace().nth(1).and_then(|ip| ip.parse::<Ipv4Addr>().ok());
    strings(row, "addresses")
        .iter()
        .find_map(ip_of)
        .or_else(|| strings(row, "dynamic_addresses").iter().find_map(ip_of))
}

fn port_info(r: &Replica, uuid: Uuid, row: &Row) -> PortInfo {
    let name = row.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
    let addresses = strings(row, "addresses");
    let ipv4 = ipv4_of(row);
    PortInfo {
        switch: port_switch(r, &name),
        kind: row.get("type").and_then(Value::as_str).unwrap_or_default().to_owned(),
        up: row.get("up").and_then(Value::as_bool).unwrap_or(false),
        requested_chassis: row
            .get("options")
            .and_then(|o| o.map_get("requested-chassis"))
            .and_then(Atom::as_str)
            .map(str::to_owned),
        external_ids: string_map(row, "external_ids"),
        name,
        uuid,
        addresses,
        ipv4,
    }
}

fn group_info(r: &Replica, uuid: Uuid, row: &Row) -> PortGroupInfo {
    let mut ports: Vec<String> =
        uuids(row, "ports").iter().filter_map(|u| r.row(LSP, u)?.get("name")?.as_str().map(str::to_owned)).collect();
    ports.sort();
    let mut acls: Vec<AclInfo> = uuids(row, "acls")
        .into_iter()
        .filter_map(|u| {
            let acl = r.row(ACL, &u)?;
            let direction = match acl.get("direction")?.as_str()? {
                "from-lport" => super::spec::AclDirection::FromLport,
                _ => super::spec::AclDirection::ToLport,
            };
            let action = match acl.get("action")?.as_str()? {
                "allow" => super::spec::AclAction::Allow,
                "allow-related" => super::spec::AclAction::AllowRelated,
                "reject" => super::spec::AclAction::Reject,
                _ => super::spec::AclAction::Drop,
            };
            let spec = AclSpec {
                direction,
                priority: u16::try_from(acl.get("priority")?.as_i64()?).ok()?,
                match_: acl.get("match")?.as_str()?.to_owned(),
                action,
                external_ids: string_map(acl, "external_ids"),
            };
            Some(AclInfo { uuid: u, spec })
        })
        .collect();
    acls.sort_by(|a, b| (b.spec.priority, &a.spec.match_).cmp(&(a.spec.priority, &b.spec.match_)));
    PortGroupInfo {
        name: row.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
        uuid,
        ports,
        acls,
        external_ids: string_map(row, "external_ids"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dhcp_server_defaults_to_the_first_host() {
        let subnet: Ipv4Cidr = "10.7.0.0/24".parse().unwrap();
        assert_eq!(dhcp_server_ip(subnet, None), Ipv4Addr::new(10, 7, 0, 1));
        assert_eq!(dhcp_server_ip(subnet, Some(Ipv4Addr::new(10, 7, 0, 254))), Ipv4Addr::new(10, 7, 0, 254));
        let mac = server_mac("net1");
        assert!(mac.starts_with("0a:") && mac.len() == 17, "{mac}");
        assert_eq!(mac, server_mac("net1"));
        assert_ne!(mac, server_mac("net2"));
    }

    #[test]
    fn rows_carry_the_spec() {
        let mut spec = PortSpec::new("vm1-nic0", "52:54:00:00:00:01");
        spec.address = PortAddress::Static(Ipv4Addr::new(10, 0, 0, 5));
        spec.requested_chassis = Some("hv1".into());
        let dhcp = Uuid::from_u128(7);
        let row = port_row(&spec, Some(dhcp));
        assert_eq!(row["addresses"].as_set().unwrap()[0].as_str(), Some("52:54:00:00:00:01 10.0.0.5"));
        assert_eq!(row["port_security"].as_set().unwrap()[0].as_str(), Some("52:54:00:00:00:01 10.0.0.5"));
        assert_eq!(row["options"].map_get("requested-chassis").and_then(Atom::as_str), Some("hv1"));
        assert_eq!(row["dhcpv4_options"].as_uuid(), Some(dhcp));
        spec.port_security = false;
        assert!(port_row(&spec, None)["port_security"].as_set().unwrap().is_empty());
    }
}
