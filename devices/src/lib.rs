//! Host devices and placement for Quantix VMs: what qx-node does itself, below QEMU.
//!
//! - PCI passthrough: the host's PCI inventory from sysfs ([`pci`]), the checks before a device may go to a VM
//!   (IOMMU on, group complete, not used by the host, not another VM's), the `vfio-pci` binding with the original
//!   driver kept in a crash-safe ledger and restored ([`HostDevices`]), and SR-IOV VFs ([`sriov`]).
//! - The accelerator probe ([`accel`]): KVM through `kvm-ioctls`, TCG and why otherwise.
//! - Firmware and TPM ([`firmware`], [`tpm`]): OVMF with a per-VM NVRAM copy, Secure Boot, `swtpm`.
//! - Placement ([`placement`]): vCPU pinning, guest NUMA nodes, huge pages, cgroup limits.
//!
//! It produces QEMU arguments and host state; it does not start QEMU or know the VM model (that is `qx-vmm`), and
//! knows nothing of gRPC. Host paths all lie under one [`HostRoot`], and the calls that make the kernel act go
//! through [`kernel::Kernel`], so tests run it all on a fake sysfs tree.
//!
//! ```no_run
//! use qx_devices::{kernel::HostKernel, HostDevices, HostRoot};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let devices = HostDevices::open(HostRoot::default(), HostKernel::shared(), "/var/lib/quantix".as_ref())?;
//! // Devices of VMs that died while qx-node was down go back to their drivers.
//! devices.recover(|_vm| false)?;
//! let nic = "0000:03:00.0".parse()?;
//! for assignment in devices.assign("vm-1234", &[nic])? {
//!     println!("-device vfio-pci,host={}", assignment.address);
//! }
//! devices.release("vm-1234")?;
//! # Ok(())
//! # }
//! ```

pub mod accel;
pub mod firmware;
mod host;
pub mod host_use;
pub mod kernel;
mod netlink;
mod passthrough;
pub mod pci;
pub mod placement;
pub mod sriov;
pub mod tpm;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod fake_host_tests;

pub use host::HostRoot;
pub use passthrough::{Assignment, Claim, DeviceError, HostDevice, HostDevices, LEDGER_FILE, VFIO_DRIVER};
pub use pci::{PciAddress, PciDevice};
