//! The host's PCI devices as sysfs describes them: ids and names, class, driver, NUMA node, IOMMU group, SR-IOV.

mod address;
mod ids;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use address::{AddressError, PciAddress};
pub use ids::{PciIds, PCI_IDS_PATHS};

use crate::host::HostRoot;

pub const PCI_DEVICES: &str = "/sys/bus/pci/devices";
pub const IOMMU_GROUPS: &str = "/sys/kernel/iommu_groups";

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("PCI device {address} does not exist on this host")]
    NotFound { address: PciAddress },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {value:?}, not a hex number")]
    Parse { path: PathBuf, value: String },
}

/// One PCI function of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciDevice {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    /// From `pci.ids`, when the host has the database and knows the id.
    pub vendor_name: Option<String>,
    pub device_name: Option<String>,
    /// The 24-bit class code (class, subclass, programming interface), e.g. `0x020000` for Ethernet.
    pub class: u32,
    pub class_name: Option<String>,
    /// The bound driver (`vfio-pci` once prepared for a VM), `None` when unbound.
    pub driver: Option<String>,
    /// `None` on hosts without NUMA (sysfs says -1).
    pub numa_node: Option<u32>,
    /// `None` when the IOMMU is off.
    pub iommu_group: Option<u32>,
    /// The other functions in the same IOMMU group: they go to a VM together or not at all.
    pub iommu_group_peers: Vec<PciAddress>,
    /// When this is an SR-IOV physical function.
    pub sriov: Option<Sriov>,
    /// When this is a virtual function: its physical function and its index there.
    pub physfn: Option<(PciAddress, u32)>,
    /// Network interfaces the host has on this function (`eth0`), empty once it is bound to `vfio-pci`.
    pub net_interfaces: Vec<String>,
}

/// A physical function's SR-IOV state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sriov {
    pub total_vfs: u32,
    pub num_vfs: u32,
    /// The VFs that exist now, by index.
    pub vfs: Vec<PciAddress>,
}

impl PciDevice {
    /// Bridges may share an IOMMU group with an assigned device: VFIO leaves them to the host.
    pub fn is_bridge(&self) -> bool {
        self.class >> 16 == 0x06
    }
}

/// The sysfs directory of `address` under `root`.
pub fn sysfs_dir(root: &HostRoot, address: PciAddress) -> PathBuf {
    root.path(PCI_DEVICES).join(address.to_string())
}

/// Every PCI function of the host, sorted by address.
pub fn scan(root: &HostRoot, ids: &PciIds) -> Result<Vec<PciDevice>, InventoryError> {
    let dir = root.path(PCI_DEVICES);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        // A host without PCI (or a fake root without it) has no devices.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(InventoryError::Read { path: dir, source }),
    };
    let mut devices = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| InventoryError::Read { path: dir.clone(), source })?;
        let Some(address) = entry.file_name().to_str().and_then(|name| name.parse().ok()) else {
            continue;
        };
        match read(root, ids, address) {
            Ok(device) => devices.push(device),
            // Removed while we looked (a VF count change): not there, not listed.
            Err(InventoryError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    devices.sort_by_key(|d| d.address);
    Ok(devices)
}

/// The PCI function at `address`.
pub fn read(root: &HostRoot, ids: &PciIds, address: PciAddress) -> Result<PciDevice, InventoryError> {
    let dir = sysfs_dir(root, address);
    if !dir.exists() {
        return Err(InventoryError::NotFound { address });
    }
    let vendor_id = read_hex(&dir.join("vendor"))? as u16;
    let device_id = read_hex(&dir.join("device"))? as u16;
    let class = read_hex(&dir.join("class"))? as u32;
    let numa_node = read_trimmed(&dir.join("numa_node")).and_then(|n| n.parse().ok());
    let iommu_group = link_name(&dir.join("iommu_group")).and_then(|n| n.parse().ok());
    let iommu_group_peers = match iommu_group {
        Some(group) => group_members(root, group)?.into_iter().filter(|a| *a != address).collect(),
        None => Vec::new(),
    };
    let sriov = read_trimmed(&dir.join("sriov_totalvfs")).and_then(|n| n.parse().ok()).map(|total_vfs| Sriov {
        total_vfs,
        num_vfs: read_trimmed(&dir.join("sriov_numvfs")).and_then(|n| n.parse().ok()).unwrap_or(0),
        vfs: virtfns(&dir).into_iter().map(|(_, vf)| vf).collect(),
    });
    let physfn = link_name(&dir.join("physfn")).and_then(|name| name.parse::<PciAddress>().ok()).and_then(|pf| {
        virtfns(&sysfs_dir(root, pf)).into_iter().find(|(_, vf)| *vf == address).map(|(index, _)| (pf, index))
    });
    Ok(PciDevice {
        address,
        vendor_id,
        device_id,
        vendor_name: ids.vendor(vendor_id).map(str::to_owned),
        device_name: ids.device(vendor_id, device_id).map(str::to_owned),
        class,
        class_name: ids.class(class).map(str::to_owned),
        driver: link_name(&dir.join("driver")),
        numa_node,
        iommu_group,
        iommu_group_peers,
        sriov,
        physfn,
        net_interfaces: net_interfaces(&dir),
    })
}

/// The network interfaces on the function in `dir`: under `net/`, or for virtio-net under its virtio device
/// (`virtio2/net/eth0`), which is where a VM's own management NIC sits when the host is itself a VM.
fn net_interfaces(dir: &Path) -> Vec<String> {
    let mut names = dir_names(&dir.join("net"));
    for child in dir_names(dir).into_iter().filter(|name| name.starts_with("virtio")) {
        names.extend(dir_names(&dir.join(child).join("net")));
    }
    names.sort();
    names
}

/// The functions in IOMMU group `group`, sorted.
pub fn group_members(root: &HostRoot, group: u32) -> Result<Vec<PciAddress>, InventoryError> {
    let dir = root.path(IOMMU_GROUPS).join(group.to_string()).join("devices");
    let entries = std::fs::read_dir(&dir).map_err(|source| InventoryError::Read { path: dir.clone(), source })?;
    let mut members: Vec<PciAddress> = entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    members.sort();
    Ok(members)
}

/// Whether the host's IOMMU is on: the kernel then lists at least one IOMMU group.
pub fn iommu_enabled(root: &HostRoot) -> bool {
    std::fs::read_dir(root.path(IOMMU_GROUPS)).is_ok_and(|mut groups| groups.next().is_some())
}

/// A PF's `virtfnN` links: `(N, VF address)`, by index.
pub(crate) fn virtfns(pf_dir: &Path) -> Vec<(u32, PciAddress)> {
    let mut vfs: Vec<(u32, PciAddress)> = std::fs::read_dir(pf_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let index = e.file_name().to_str()?.strip_prefix("virtfn")?.parse().ok()?;
            Some((index, link_name(&e.path())?.parse().ok()?))
        })
        .collect();
    vfs.sort();
    vfs
}

/// The last component of the symlink at `path` (a driver, a group, a PF), `None` when it is absent.
pub(crate) fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_str()?.to_owned())
}

pub(crate) fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

pub(crate) fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).into_iter().flatten().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    names
}

fn read_hex(path: &Path) -> Result<u64, InventoryError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| InventoryError::Read { path: path.to_owned(), source })?;
    let value = text.trim();
    u64::from_str_radix(value.trim_start_matches("0x"), 16)
        .map_err(|_| InventoryError::Parse { path: path.to_owned(), value: value.to_owned() })
}
