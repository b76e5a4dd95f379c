//! The device tree: where each disk and NIC of a VM sits, chosen once and stored.
//!
//! A device's identity is its `id` (in the spec), and everything QEMU and the host know it by is derived once,
//! when the device is attached, and kept in `devices.json` beside the spec: its PCIe root port, its QEMU names
//! (block nodes, device, netdev) and, for a NIC, its tap slot (the tap's name and OVS port). The command line, the
//! warm pool, hotplug and (later) a migration target all render from this tree, so adding or removing a device never
//! moves another, and a VM restarted or rebuilt elsewhere gets the same machine.
//!
//! Root ports (q35 only; i440fx puts devices on its root bus): a machine gets
//! `devices + SPARE_HOTPLUG_PORTS`, at least `MIN_ROOT_PORTS` and at most `MAX_ROOT_PORTS`, fixed at launch. Eight
//! spare ports (Incus keeps eight as well) let a running VM take a batch of disks and NICs; sixteen at least make
//! every machine with up to eight devices look alike, so one warm-pool QEMU fits them all; 28 at most is what
//! pcie.0 holds besides the host bridge, the ICH9 functions at slot 0x1f and a VGA card. A stopped VM that needs
//! more ports gets them at its next start; a running one with none free refuses the attach, naming the limit.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::VmSpec;

/// Free root ports kept for hotplug beyond the devices a q35 machine starts with.
pub const SPARE_HOTPLUG_PORTS: u32 = 8;
/// Every q35 machine gets at least this many root ports.
pub const MIN_ROOT_PORTS: u32 = 16;
/// Slots of pcie.0 left for root ports (0x00 is the host bridge, 0x1f the ICH9 functions, one for VGA).
pub const MAX_ROOT_PORTS: u32 = 28;
/// Taps are named from a byte (`qx_net::names::tap_name`).
pub const MAX_TAP_SLOTS: u32 = 256;
/// The format `devices.json` is written in.
pub const TREE_VERSION: u32 = 1;

/// Every device of a VM and where it sits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTree {
    /// Format of this file; [`TREE_VERSION`].
    pub version: u32,
    /// PCIe root ports the machine is launched with (`rp1`..`rpN`); 0 on machines without PCIe.
    pub root_ports: u32,
    /// Disks, in spec order.
    #[serde(default)]
    pub disks: Vec<DiskSlot>,
    /// NICs, in spec order.
    #[serde(default)]
    pub nics: Vec<NicSlot>,
}

/// Where one disk sits and what QEMU calls its parts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSlot {
    pub id: String,
    /// Root port number (`rpN`), on q35.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// The format node; the protocol node is `<node>-file`.
    pub node: String,
    /// The `virtio-blk-pci` device id.
    pub device: String,
}

/// Where one NIC sits and what QEMU and the host call it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSlot {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    pub netdev: String,
    /// The `virtio-net-pci` device id.
    pub device: String,
    /// Names the NIC's tap (and OVS port) on the host, with the VM's UUID; unique among the VM's NICs.
    pub tap: u8,
}

impl DiskSlot {
    /// The protocol (file) node under the format node.
    pub fn file_node(&self) -> String {
        format!("{}-file", self.node)
    }
}

/// Why a device cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("no free PCIe root port for {kind} {id:?}: all {ports} root ports of the running machine are in use (ports are fixed at launch; attach it while the VM is stopped)")]
    NoFreePort { kind: &'static str, id: String, ports: u32 },
    #[error("no free PCIe root port for {kind} {id:?}: the machine has the maximum of {MAX_ROOT_PORTS}")]
    MachineFull { kind: &'static str, id: String },
    #[error("no free tap slot for NIC {id:?}")]
    NoTapSlot { id: String },
}

/// Whether `machine` is PCIe (q35), where every device needs a root port of its own.
pub fn is_pcie(machine: &str) -> bool {
    machine == "q35" || machine.starts_with("pc-q35-")
}

/// Root ports for a new q35 machine with `devices` disks and NICs.
pub fn root_ports_for(devices: usize) -> u32 {
    (devices as u32 + SPARE_HOTPLUG_PORTS).clamp(MIN_ROOT_PORTS, MAX_ROOT_PORTS)
}

/// Whether the machine may change to make room (a stopped VM) or not (a running QEMU, whose ports are fixed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// The VM is stopped: root ports may be added for its next launch.
    Allowed,
    /// A QEMU runs with these ports.
    Fixed,
}

impl DeviceTree {
    /// The tree a new VM gets: every device of `spec` (ids filled in) placed in spec order.
    pub fn new(spec: &VmSpec) -> Result<Self, PlaceError> {
        let mut tree = DeviceTree { version: TREE_VERSION, ..Default::default() };
        if is_pcie(&spec.machine) {
            tree.root_ports = root_ports_for(spec.disks.len() + spec.nics.len());
        }
        tree.reconcile(spec, Growth::Allowed)?;
        Ok(tree)
    }

    /// The tree of a VM created before devices had ids (no `devices.json`): the places that version gave its
    /// devices from their list positions (disks, then NICs, on consecutive root ports; `disk{i}`/`nic{i}`/`net{i}`
    /// in QEMU; tap slot = NIC position), so a QEMU it launched is still described exactly, and the VM boots the
    /// same machine again. `spec`'s ids must already be filled in.
    pub fn legacy(spec: &VmSpec) -> Self {
        let pcie = is_pcie(&spec.machine);
        let devices = spec.disks.len() + spec.nics.len();
        let root_ports = if pcie { (devices as u32 + 2).max(8) } else { 0 };
        let port = |n: usize| pcie.then_some(n as u32 + 1);
        let disks = spec
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| DiskSlot {
                id: d.id.clone().unwrap_or_default(),
                port: port(i),
                node: format!("disk{i}"),
                device: format!("virtio-disk{i}"),
            })
            .collect();
        let nics = spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| NicSlot {
                id: n.id.clone().unwrap_or_default(),
                port: port(spec.disks.len() + i),
                netdev: format!("net{i}"),
                device: format!("nic{i}"),
                tap: i as u8,
            })
            .collect();
        DeviceTree { version: TREE_VERSION, root_ports, disks, nics }
    }

    /// Makes the tree describe exactly `spec`'s devices (ids filled in): devices the tree knows keep their places,
    /// devices it does not know get the lowest free port and tap slot, devices gone from the spec are dropped.
    /// Returns whether anything changed. On error the tree is unchanged.
    pub fn reconcile(&mut self, spec: &VmSpec, growth: Growth) -> Result<bool, PlaceError> {
        let mut next = self.clone();
        let pcie = is_pcie(&spec.machine);
        if !pcie {
            next.root_ports = 0;
        }
        let disk_ids: Vec<&str> = spec.disks.iter().filter_map(|d| d.id.as_deref()).collect();
        let nic_ids: Vec<&str> = spec.nics.iter().filter_map(|n| n.id.as_deref()).collect();
        next.disks.retain(|d| disk_ids.contains(&d.id.as_str()));
        next.nics.retain(|n| nic_ids.contains(&n.id.as_str()));
        if !pcie {
            next.disks.iter_mut().for_each(|d| d.port = None);
            next.nics.iter_mut().for_each(|n| n.port = None);
        }
        let mut disks = Vec::with_capacity(disk_ids.len());
        for id in &disk_ids {
            let slot = match next.disks.iter().find(|d| d.id == *id) {
                Some(slot) => slot.clone(),
                None => {
                    let port = if pcie { Some(next.take_port("disk", id, growth, &disks, &[])?) } else { None };
                    DiskSlot { id: id.to_string(), port, node: format!("drive-{id}"), device: format!("disk-{id}") }
                }
            };
            disks.push(slot);
        }
        let mut nics: Vec<NicSlot> = Vec::with_capacity(nic_ids.len());
        for id in &nic_ids {
            let slot = match next.nics.iter().find(|n| n.id == *id) {
                Some(slot) => slot.clone(),
                None => {
                    let port = if pcie { Some(next.take_port("NIC", id, growth, &disks, &nics)?) } else { None };
                    let used: BTreeSet<u8> = next.nics.iter().chain(&nics).map(|n| n.tap).collect();
                    let tap = (0..MAX_TAP_SLOTS)
                        .map(|t| t as u8)
                        .find(|t| !used.contains(t))
                        .ok_or_else(|| PlaceError::NoTapSlot { id: id.to_string() })?;
                    NicSlot {
                        id: id.to_string(),
                        port,
                        netdev: format!("netdev-{id}"),
                        device: format!("nic-{id}"),
                        tap,
                    }
                }
            };
            nics.push(slot);
        }
        next.disks = disks;
        next.nics = nics;
        next.version = TREE_VERSION;
        let changed = next != *self;
        *self = next;
        Ok(changed)
    }

    /// The lowest root port not used by the tree or by the slots placed so far in this pass.
    fn take_port(
        &mut self,
        kind: &'static str,
        id: &str,
        growth: Growth,
        disks: &[DiskSlot],
        nics: &[NicSlot],
    ) -> Result<u32, PlaceError> {
        let used: BTreeSet<u32> = self
            .disks
            .iter()
            .map(|d| d.port)
            .chain(self.nics.iter().map(|n| n.port))
            .chain(disks.iter().map(|d| d.port))
            .chain(nics.iter().map(|n| n.port))
            .flatten()
            .collect();
        if let Some(port) = (1..=self.root_ports).find(|p| !used.contains(p)) {
            return Ok(port);
        }
        match growth {
            Growth::Fixed => Err(PlaceError::NoFreePort { kind, id: id.to_owned(), ports: self.root_ports }),
            Growth::Allowed if self.root_ports >= MAX_ROOT_PORTS => {
                Err(PlaceError::MachineFull { kind, id: id.to_owned() })
            }
            Growth::Allowed => {
                self.root_ports += 1;
                Ok(self.root_ports)
            }
        }
    }

    pub fn disk(&self, id: &str) -> Option<&DiskSlot> {
        self.disks.iter().find(|d| d.id == id)
    }

    pub fn nic(&self, id: &str) -> Option<&NicSlot> {
        self.nics.iter().find(|n| n.id == id)
    }

    /// Root ports no device uses.
    pub fn free_ports(&self) -> u32 {
        let used = self.disks.iter().filter(|d| d.port.is_some()).count()
            + self.nics.iter().filter(|n| n.port.is_some()).count();
        self.root_ports.saturating_sub(used as u32)
    }
}

impl fmt::Display for DiskSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{} on rp{port}", self.id),
            None => f.write_str(&self.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicKind, NicSpec};

    fn spec(disks: &[&str], nics: &[&str]) -> VmSpec {
        let mut spec = VmSpec::from_text("name: t\nkernel:\n  kernel: /k\n").unwrap();
        for id in disks {
            spec.disks.push(DiskSpec { id: Some(id.to_string()), path: Some(format!("/img/{id}").into()), ..disk() });
        }
        for id in nics {
            spec.nics.push(NicSpec {
                id: Some(id.to_string()),
                kind: NicKind::User,
                network: None,
                mac: None,
                host_forwards: Vec::new(),
                security_groups: Vec::new(),
                ipv4: None,
            });
        }
        spec
    }

    fn disk() -> DiskSpec {
        VmSpec::from_text("name: t\ndisks:\n  - path: /x\n").unwrap().disks.remove(0)
    }

    #[test]
    fn new_machines_get_spare_ports_and_places_in_order() {
        let tree = DeviceTree::new(&spec(&["root", "data"], &["lan"])).unwrap();
        assert_eq!(tree.root_ports, MIN_ROOT_PORTS);
        assert_eq!(
            tree.disks[0],
            DiskSlot { id: "root".into(), port: Some(1), node: "drive-root".into(), device: "disk-root".into() }
        );
        assert_eq!(tree.disks[1].port, Some(2));
        assert_eq!(
            tree.nics[0],
            NicSlot { id: "lan".into(), port: Some(3), netdev: "netdev-lan".into(), device: "nic-lan".into(), tap: 0 }
        );
        assert_eq!(tree.free_ports(), MIN_ROOT_PORTS - 3);
        let many: Vec<String> = (0..24).map(|i| format!("d{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(DeviceTree::new(&spec(&many, &[])).unwrap().root_ports, MAX_ROOT_PORTS);
    }

    #[test]
    fn removing_a_device_moves_no_other() {
        let mut tree = DeviceTree::new(&spec(&["a", "b", "c"], &["n0", "n1"])).unwrap();
        let before = tree.clone();
        assert!(tree.reconcile(&spec(&["b", "c"], &["n1"]), Growth::Fixed).unwrap());
        assert_eq!(tree.disks, before.disks[1..]);
        assert_eq!(tree.nics, before.nics[1..]);
        // A new disk takes the lowest free port (the one "a" left), a new NIC the lowest free tap slot.
        tree.reconcile(&spec(&["b", "c", "new"], &["n1", "n2"]), Growth::Fixed).unwrap();
        assert_eq!(tree.disk("new").unwrap().port, Some(1));
        assert_eq!(tree.nic("n2").unwrap().tap, 0);
        assert_eq!(tree.nic("n1"), before.nic("n1"));
        assert!(!tree.clone().reconcile(&spec(&["b", "c", "new"], &["n1", "n2"]), Growth::Fixed).unwrap(), "stable");
    }

    #[test]
    fn a_full_running_machine_refuses_and_a_stopped_one_grows() {
        let ids: Vec<String> = (0..MIN_ROOT_PORTS).map(|i| format!("d{i}")).collect();
        let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut tree = DeviceTree::new(&spec(&ids[..8], &[])).unwrap();
        tree.reconcile(&spec(&ids, &[]), Growth::Fixed).unwrap();
        assert_eq!(tree.free_ports(), 0);
        ids.push("one-more");
        let before = tree.clone();
        let err = tree.reconcile(&spec(&ids, &[]), Growth::Fixed).unwrap_err();
        assert_eq!(err, PlaceError::NoFreePort { kind: "disk", id: "one-more".into(), ports: MIN_ROOT_PORTS });
        assert!(err.to_string().contains("all 16 root ports"), "{err}");
        assert_eq!(tree, before, "unchanged on error");
        tree.reconcile(&spec(&ids, &[]), Growth::Allowed).unwrap();
        assert_eq!(tree.root_ports, MIN_ROOT_PORTS + 1);
        assert_eq!(tree.disk("one-more").unwrap().port, Some(MIN_ROOT_PORTS + 1));
        let all: Vec<String> = (0..=MAX_ROOT_PORTS).map(|i| format!("d{i}")).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let err = tree.reconcile(&spec(&all, &[]), Growth::Allowed).unwrap_err();
        assert!(matches!(err, PlaceError::MachineFull { .. }), "{err}");
    }

    #[test]
    fn legacy_trees_match_what_the_old_version_launched() {
        let tree = DeviceTree::legacy(&spec(&["disk0", "disk1"], &["nic0"]));
        assert_eq!(tree.root_ports, 8);
        assert_eq!((tree.disks[1].node.as_str(), tree.disks[1].device.as_str()), ("disk1", "virtio-disk1"));
        assert_eq!(tree.disks[1].port, Some(2));
        assert_eq!(
            tree.nics[0],
            NicSlot { id: "nic0".into(), port: Some(3), netdev: "net0".into(), device: "nic0".into(), tap: 0 }
        );
        let mut pc = spec(&["disk0"], &[]);
        pc.machine = "pc".into();
        assert_eq!(DeviceTree::legacy(&pc).root_ports, 0);
        assert_eq!(DeviceTree::legacy(&pc).disks[0].port, None);
    }

    #[test]
    fn the_tree_round_trips_and_refuses_unknown_fields() {
        let tree = DeviceTree::new(&spec(&["a"], &["n"])).unwrap();
        let json = serde_json::to_string(&tree).unwrap();
        assert_eq!(serde_json::from_str::<DeviceTree>(&json).unwrap(), tree);
        let err = serde_json::from_str::<DeviceTree>(r#"{"version":1,"root_ports":8,"portz":1}"#).unwrap_err();
        assert!(err.to_string().contains("portz"), "{err}");
    }
}
