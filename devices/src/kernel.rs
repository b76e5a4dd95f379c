//! The calls that make the kernel act on a device: sysfs writes, the VFIO open, SR-IOV VF settings over netlink.
//!
//! Reading sysfs works the same on a fake tree; these do not, so they sit behind [`Kernel`]: [`HostKernel`] on a
//! real host, and in tests a fake that plays the kernel's part on a temp-dir tree.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice};

use crate::sriov::VfNetConfig;

pub trait Kernel: Send + Sync + std::fmt::Debug {
    /// Writes `value` to the sysfs attribute at `path` in one `write`, as sysfs expects.
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;

    /// Opens the device whose sysfs directory is `device_dir` the way QEMU will: the VFIO container, the device's
    /// group (which must be viable, `VFIO_GROUP_GET_STATUS`), the IOMMU type, the device fd; then closes it all
    /// again, since a group has one user at a time.
    fn vfio_open(&self, device_dir: &Path) -> io::Result<()>;

    /// Sets VF `vf`'s MAC, VLAN and spoof checking on the PF with interface index `pf_ifindex`.
    fn set_vf(&self, pf_ifindex: u32, vf: u32, config: &VfNetConfig) -> io::Result<()>;
}

/// The real host's kernel.
#[derive(Debug, Default)]
pub struct HostKernel;

impl HostKernel {
    pub fn shared() -> Arc<dyn Kernel> {
        Arc::new(Self)
    }
}

impl Kernel for HostKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let mut file = OpenOptions::new().write(true).open(path)?;
        file.write_all(value.as_bytes())
    }

    fn vfio_open(&self, device_dir: &Path) -> io::Result<()> {
        let container = VfioContainer::new(None).map_err(io::Error::other)?;
        // Dropping the device closes its fd and takes the group out of the container.
        VfioDevice::new(device_dir, Arc::new(container), false).map(drop).map_err(io::Error::other)
    }

    fn set_vf(&self, pf_ifindex: u32, vf: u32, config: &VfNetConfig) -> io::Result<()> {
        crate::netlink::set_vf(pf_ifindex, vf, config)
    }
}
