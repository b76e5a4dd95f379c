//! Giving host PCI devices to VMs: the checks, the `vfio-pci` binding and its undoing, and the ledger that remembers
//! every device's original driver so that a daemon crash at any step is undone at the next start.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::host::HostRoot;
use crate::host_use::HostUse;
use crate::kernel::Kernel;
use crate::pci::{self, link_name, InventoryError, PciAddress, PciDevice, PciIds};

pub const VFIO_DRIVER: &str = "vfio-pci";
/// The ledger's file name in the state directory.
pub const LEDGER_FILE: &str = "hostdevs.json";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("cannot give {address} to a VM: the IOMMU is off (no groups under /sys/kernel/iommu_groups); boot the host with intel_iommu=on or amd_iommu=on")]
    IommuOff { address: PciAddress },
    #[error("cannot give {address} to a VM: its IOMMU group {group} also holds {}, which must go to the same VM", join(.peers))]
    GroupShared { address: PciAddress, group: u32, peers: Vec<PciAddress> },
    #[error("cannot give {address} to a VM: the host uses it ({reason})")]
    HostUses { address: PciAddress, reason: String },
    #[error("{address} is already given to {owner}")]
    Taken { address: PciAddress, owner: String },
    #[error("cannot give {address} to a VM: it has {count} SR-IOV VFs, which its driver would take away; set its VF count to 0 first")]
    HasVfs { address: PciAddress, count: u32 },
    #[error("{address} is a PCI bridge, which stays with the host")]
    Bridge { address: PciAddress },
    #[error("cannot {step} for {address} ({path})")]
    Sysfs {
        address: PciAddress,
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{address} is driven by {} after binding, not vfio-pci; is the vfio-pci module loaded?", .driver.as_deref().unwrap_or("no driver"))]
    NotVfio { address: PciAddress, driver: Option<String> },
    #[error("{address} is bound to vfio-pci but cannot be opened through VFIO")]
    VfioOpen {
        address: PciAddress,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the device ledger {path}")]
    LedgerWrite {
        path: PathBuf,
        #[source]
        source: qx_storage::atomic::AtomicError,
    },
    #[error("cannot read the device ledger {path}")]
    LedgerRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the device ledger {path} is not valid")]
    LedgerParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{address} is not an SR-IOV physical function")]
    NotPf { address: PciAddress },
    #[error("{address} is not an SR-IOV virtual function")]
    NotVf { address: PciAddress },
    #[error("sriov_numvfs: {count} is above {address}'s sriov_totalvfs {total}")]
    TooManyVfs { address: PciAddress, count: u32, total: u32 },
    #[error("cannot change the VF count of {address}: {} (changing the count removes every VF)", in_use.join(", "))]
    VfsInUse { address: PciAddress, in_use: Vec<String> },
    #[error("{address} has sriov_numvfs {actual} after writing {count}")]
    VfCountMismatch { address: PciAddress, count: u32, actual: u32 },
    #[error("{pf} has no free VF ({total} exist, each given to a VM or used by the host)")]
    NoFreeVf { pf: PciAddress, total: usize },
    #[error("{pf}, the PF of {vf}, has no network interface to set VF {index} through")]
    PfNoInterface { pf: PciAddress, vf: PciAddress, index: u32 },
    #[error("cannot set VF {index} ({vf}) on {interface}")]
    SetVf {
        vf: PciAddress,
        index: u32,
        interface: String,
        #[source]
        source: std::io::Error,
    },
}

impl DeviceError {
    /// Whether the request itself was wrong (the caller's fix) rather than the host's state.
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Self::Inventory(InventoryError::NotFound { .. }) | Self::TooManyVfs { .. } | Self::Bridge { .. })
    }
}

fn join(addresses: &[PciAddress]) -> String {
    addresses.iter().map(PciAddress::to_string).collect::<Vec<_>>().join(", ")
}

/// A device promised to a VM. Written before the device is touched, so that every binding the daemon may have
/// started is in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    pub address: PciAddress,
    /// The VM (its id) the device is given to.
    pub owner: String,
    /// The driver to give the device back to; `None` when it had none.
    pub original_driver: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerFile {
    claims: Vec<Claim>,
}

/// A device bound to `vfio-pci` for a VM: what QEMU's `vfio-pci` device needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Assignment {
    pub address: PciAddress,
    pub iommu_group: u32,
    /// `/dev/vfio/<group>`, which QEMU opens.
    pub group_device: PathBuf,
}

/// A device in the inventory, with what the daemon knows of its use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostDevice {
    #[serde(flatten)]
    pub device: PciDevice,
    /// The VM it is given to.
    pub assigned_to: Option<String>,
    /// Why the host keeps it, when it does.
    pub host_use: Option<String>,
}

/// The host's PCI devices and the VMs they are given to. Every method blocks on sysfs: call it from a blocking
/// thread. Operations are serialized by one lock; they are rare and short.
#[derive(Debug)]
pub struct HostDevices {
    pub(crate) root: HostRoot,
    pub(crate) kernel: Arc<dyn Kernel>,
    ids: PciIds,
    ledger_path: PathBuf,
    claims: Mutex<Vec<Claim>>,
}

impl HostDevices {
    /// Reads the ledger in `state_dir` (none yet is an empty one). Claims of VMs that are gone stay until
    /// [`HostDevices::recover`] gives their devices back.
    pub fn open(root: HostRoot, kernel: Arc<dyn Kernel>, state_dir: &Path) -> Result<Self, DeviceError> {
        let ledger_path = state_dir.join(LEDGER_FILE);
        let claims = match std::fs::read(&ledger_path) {
            Ok(raw) => {
                serde_json::from_slice::<LedgerFile>(&raw)
                    .map_err(|source| DeviceError::LedgerParse { path: ledger_path.clone(), source })?
                    .claims
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(DeviceError::LedgerRead { path: ledger_path, source }),
        };
        let ids = PciIds::load(&root);
        Ok(Self { root, kernel, ids, ledger_path, claims: Mutex::new(claims) })
    }

    pub fn root(&self) -> &HostRoot {
        &self.root
    }

    /// Every PCI function, with its VM or its host use.
    pub fn list(&self) -> Result<Vec<HostDevice>, DeviceError> {
        let claims = self.lock();
        let host_use = HostUse::scan(&self.root);
        let devices = pci::scan(&self.root, &self.ids)?;
        Ok(devices
            .into_iter()
            .map(|device| HostDevice {
                assigned_to: claims.iter().find(|c| c.address == device.address).map(|c| c.owner.clone()),
                host_use: host_use.use_of(&device),
                device,
            })
            .collect())
    }

    pub fn device(&self, address: PciAddress) -> Result<PciDevice, DeviceError> {
        Ok(pci::read(&self.root, &self.ids, address)?)
    }

    /// The devices given to `owner`.
    pub fn claims_of(&self, owner: &str) -> Vec<PciAddress> {
        self.lock().iter().filter(|c| c.owner == owner).map(|c| c.address).collect()
    }

    /// Every claim in the ledger.
    pub fn claims(&self) -> Vec<Claim> {
        self.lock().clone()
    }

    /// Binds `addresses` to `vfio-pci` for the VM `owner`, after checking every one of them: it exists, the host
    /// does not use it, no other VM has it, the IOMMU is on, and each other member of its IOMMU group is a bridge
    /// or in `addresses` too. A device `owner` already has is kept as it is. On any failure nothing stays bound:
    /// the devices bound by this call go back to their drivers.
    pub fn assign(&self, owner: &str, addresses: &[PciAddress]) -> Result<Vec<Assignment>, DeviceError> {
        let mut claims = self.lock();
        let host_use = HostUse::scan(&self.root);
        let wanted: BTreeSet<PciAddress> = addresses.iter().copied().collect();
        let mut todo = Vec::new();
        for &address in &wanted {
            let device = self.device(address)?;
            if let Some(claim) = claims.iter().find(|c| c.address == address) {
                if claim.owner == owner {
                    continue;
                }
                return Err(DeviceError::Taken { address, owner: claim.owner.clone() });
            }
            self.check_assignable(&device, &wanted, &host_use)?;
            todo.push(device);
        }
        let mut bound = Vec::new();
        for device in &todo {
            let claim =
                Claim { address: device.address, owner: owner.to_owned(), original_driver: device.driver.clone() };
            claims.push(claim.clone());
            let result = self.save(&claims).and_then(|()| self.bind(device));
            if let Err(e) = result {
                warn!(address = %device.address, error = %e, "assigning failed; giving back what was bound");
                bound.push(claim);
                for claim in bound.iter().rev() {
                    if let Err(undo) = self.restore(claim) {
                        warn!(address = %claim.address, error = %undo, "cannot give the device back");
                        continue;
                    }
                    claims.retain(|c| c.address != claim.address);
                }
                self.save(&claims)?;
                return Err(e);
            }
            info!(address = %device.address, vm = owner, "bound to vfio-pci");
            bound.push(claim);
        }
        wanted.iter().map(|&address| self.assignment(address)).collect()
    }

    /// Gives every device of `owner` back to its original driver; returns those given back. Idempotent.
    pub fn release(&self, owner: &str) -> Result<Vec<PciAddress>, DeviceError> {
        self.release_where(|c| c.owner == owner)
    }

    /// Gives one device of `owner` back (a detach).
    pub fn release_device(&self, owner: &str, address: PciAddress) -> Result<(), DeviceError> {
        self.release_where(|c| c.owner == owner && c.address == address).map(drop)
    }

    /// At daemon start, after the VMs still running are known: gives back every device whose owner
    /// `is_running` says is gone (its VM stopped or crashed while the daemon was down, or the daemon died half-way
    /// through binding it).
    pub fn recover(&self, is_running: impl Fn(&str) -> bool) -> Result<Vec<PciAddress>, DeviceError> {
        self.release_where(|c| !is_running(&c.owner))
    }

    fn release_where(&self, matches: impl Fn(&Claim) -> bool) -> Result<Vec<PciAddress>, DeviceError> {
        let mut claims = self.lock();
        let mut released = Vec::new();
        let mut first_error = None;
        for claim in claims.iter().filter(|c| matches(c)) {
            match self.restore(claim) {
                Ok(()) => {
                    info!(address = %claim.address, vm = %claim.owner, driver = ?claim.original_driver, "given back");
                    released.push(claim.address);
                }
                Err(e) => {
                    warn!(address = %claim.address, error = %e, "cannot give the device back; kept in the ledger");
                    first_error.get_or_insert(e);
                }
            }
        }
        claims.retain(|c| !released.contains(&c.address));
        self.save(&claims)?;
        first_error.map_or(Ok(released), Err)
    }

    fn check_assignable(
        &self,
        device: &PciDevice,
        wanted: &BTreeSet<PciAddress>,
        host_use: &HostUse,
    ) -> Result<(), DeviceError> {
        let address = device.address;
        if device.is_bridge() {
            return Err(DeviceError::Bridge { address });
        }
        if let Some(reason) = host_use.use_of(device) {
            return Err(DeviceError::HostUses { address, reason });
        }
        if let Some(sriov) = device.sriov.as_ref().filter(|s| s.num_vfs > 0) {
            return Err(DeviceError::HasVfs { address, count: sriov.num_vfs });
        }
        if !pci::iommu_enabled(&self.root) {
            return Err(DeviceError::IommuOff { address });
        }
        let Some(group) = device.iommu_group else {
            return Err(DeviceError::IommuOff { address });
        };
        let mut left_out = Vec::new();
        for &peer in &device.iommu_group_peers {
            if wanted.contains(&peer) {
                continue;
            }
            match self.device(peer) {
                Ok(peer_device) if peer_device.is_bridge() => {}
                _ => left_out.push(peer),
            }
        }
        if !left_out.is_empty() {
            return Err(DeviceError::GroupShared { address, group, peers: left_out });
        }
        Ok(())
    }

    /// driver_override, unbind, drivers_probe: the kernel's documented way to move one device to another driver;
    /// then the VFIO open QEMU will do. Undone by [`HostDevices::restore`] when anything fails.
    fn bind(&self, device: &PciDevice) -> Result<(), DeviceError> {
        let address = device.address;
        if device.driver.as_deref() != Some(VFIO_DRIVER) {
            let dir = pci::sysfs_dir(&self.root, address);
            self.write(address, "set driver_override", &dir.join("driver_override"), VFIO_DRIVER)?;
            if let Some(driver) = &device.driver {
                let unbind = self.root.path("/sys/bus/pci/drivers").join(driver).join("unbind");
                self.write(address, "unbind the driver", &unbind, &address.to_string())?;
            }
            self.write(address, "probe drivers", &self.root.path("/sys/bus/pci/drivers_probe"), &address.to_string())?;
            let driver = link_name(&dir.join("driver"));
            if driver.as_deref() != Some(VFIO_DRIVER) {
                return Err(DeviceError::NotVfio { address, driver });
            }
        }
        self.kernel
            .vfio_open(&pci::sysfs_dir(&self.root, address))
            .map_err(|source| DeviceError::VfioOpen { address, source })
    }

    /// Clears driver_override and hands the device back to its original driver (or to none).
    fn restore(&self, claim: &Claim) -> Result<(), DeviceError> {
        let address = claim.address;
        let dir = pci::sysfs_dir(&self.root, address);
        if !dir.exists() {
            // A VF removed since, or a device unplugged: nothing to give back.
            return Ok(());
        }
        if claim.original_driver.as_deref() == Some(VFIO_DRIVER) {
            return Ok(());
        }
        self.write(address, "clear driver_override", &dir.join("driver_override"), "\n")?;
        let current = link_name(&dir.join("driver"));
        if current.is_some() && current != claim.original_driver {
            let unbind = self.root.path("/sys/bus/pci/drivers").join(current.as_deref().unwrap_or_default());
            self.write(address, "unbind vfio-pci", &unbind.join("unbind"), &address.to_string())?;
        }
        if let Some(original) = &claim.original_driver {
            if link_name(&dir.join("driver")).as_ref() != Some(original) {
                let bind = self.root.path("/sys/bus/pci/drivers").join(original).join("bind");
                self.write(address, "bind the original driver", &bind, &address.to_string())?;
            }
        }
        Ok(())
    }

    fn assignment(&self, address: PciAddress) -> Result<Assignment, DeviceError> {
        let device = self.device(address)?;
        let iommu_group = device.iommu_group.ok_or(DeviceError::IommuOff { address })?;
        Ok(Assignment { address, iommu_group, group_device: PathBuf::from(format!("/dev/vfio/{iommu_group}")) })
    }

    pub(crate) fn write(
        &self,
        address: PciAddress,
        step: &'static str,
        path: &Path,
        value: &str,
    ) -> Result<(), DeviceError> {
        self.kernel.write(path, value).map_err(|source| DeviceError::Sysfs { address, step, path: path.into(), source })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Vec<Claim>> {
        self.claims.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn save(&self, claims: &[Claim]) -> Result<(), DeviceError> {
        let file = LedgerFile { claims: claims.to_vec() };
        let text = serde_json::to_vec_pretty(&file).expect("the ledger serializes");
        qx_storage::atomic::write_atomic(&self.ledger_path, &text)
            .map_err(|source| DeviceError::LedgerWrite { path: self.ledger_path.clone(), source })
    }
}
