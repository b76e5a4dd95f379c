//! A fake host for tests: a sysfs/procfs tree in a temp dir, and a [`FakeKernel`] that plays the kernel's part
//! when the code under test writes to it (driver_override, unbind, bind, drivers_probe, sriov_numvfs).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::host::HostRoot;
use crate::kernel::Kernel;
use crate::pci::{link_name, PciAddress};
use crate::sriov::VfNetConfig;

#[derive(Debug)]
pub struct FakeHost {
    pub dir: tempfile::TempDir,
}

impl FakeHost {
    pub fn new() -> Self {
        let host = Self { dir: tempfile::tempdir().unwrap() };
        for d in ["sys/bus/pci/devices", "sys/bus/pci/drivers/vfio-pci", "sys/kernel/iommu_groups", "proc/net"] {
            fs::create_dir_all(host.path(d)).unwrap();
        }
        fs::write(host.path("sys/bus/pci/drivers_probe"), "").unwrap();
        fs::write(host.path("proc/net/route"), "Iface\tDestination\tGateway\n").unwrap();
        fs::write(host.path("proc/mounts"), "proc /proc proc rw 0 0\n").unwrap();
        host
    }

    pub fn root(&self) -> HostRoot {
        HostRoot::new(self.dir.path())
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn device_dir(&self, address: &str) -> PathBuf {
        self.path(&format!("sys/devices/pci0000:00/{address}"))
    }

    /// A PCI function with ids, class, driver (bound) and IOMMU group (`None`: IOMMU off for it).
    pub fn device(&self, address: &str, ids: (u16, u16), class: u32, driver: Option<&str>, group: Option<u32>) {
        let dir = self.device_dir(address);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("vendor"), format!("0x{:04x}\n", ids.0)).unwrap();
        fs::write(dir.join("device"), format!("0x{:04x}\n", ids.1)).unwrap();
        fs::write(dir.join("class"), format!("0x{class:06x}\n")).unwrap();
        fs::write(dir.join("numa_node"), "0\n").unwrap();
        fs::write(dir.join("driver_override"), "(null)\n").unwrap();
        let _ = symlink(&dir, self.path(&format!("sys/bus/pci/devices/{address}")));
        if let Some(driver) = driver {
            fs::create_dir_all(self.path(&format!("sys/bus/pci/drivers/{driver}"))).unwrap();
            self.bind(address, driver);
        }
        if let Some(group) = group {
            let group_dir = self.path(&format!("sys/kernel/iommu_groups/{group}/devices"));
            fs::create_dir_all(&group_dir).unwrap();
            symlink(&dir, group_dir.join(address)).unwrap();
            symlink(self.path(&format!("sys/kernel/iommu_groups/{group}")), dir.join("iommu_group")).unwrap();
        }
    }

    /// Makes `address` an SR-IOV PF with room for `total` VFs.
    pub fn sriov_pf(&self, address: &str, total: u32) {
        let dir = self.device_dir(address);
        fs::write(dir.join("sriov_totalvfs"), format!("{total}\n")).unwrap();
        fs::write(dir.join("sriov_numvfs"), "0\n").unwrap();
    }

    /// Gives `address` a virtio-net interface `name`, under its virtio device as the kernel places it.
    pub fn virtio_net(&self, address: &str, name: &str) {
        fs::create_dir_all(self.device_dir(address).join("virtio0/net").join(name)).unwrap();
    }

    /// Gives `address` the network interface `name` with index `ifindex`.
    pub fn net(&self, address: &str, name: &str, ifindex: u32) {
        let net = self.device_dir(address).join("net").join(name);
        fs::create_dir_all(&net).unwrap();
        fs::write(net.join("ifindex"), format!("{ifindex}\n")).unwrap();
        fs::create_dir_all(self.path("sys/class/net")).unwrap();
        let _ = symlink(&net, self.path(&format!("sys/class/net/{name}")));
    }

    /// The host routes through `iface` (so it carries a host address).
    pub fn route(&self, iface: &str) {
        let mut routes = fs::read_to_string(self.path("proc/net/route")).unwrap();
        routes.push_str(&format!("{iface}\t00000000\t010200C0\n"));
        fs::write(self.path("proc/net/route"), routes).unwrap();
    }

    /// A disk `name` on `address`, with partitions `1..=partitions`.
    pub fn disk(&self, address: &str, name: &str, partitions: u32) {
        let block = self.device_dir(address).join("nvme/nvme0/block").join(name);
        fs::create_dir_all(block.join("holders")).unwrap();
        for p in 1..=partitions {
            let part = block.join(format!("{name}p{p}"));
            fs::create_dir_all(part.join("holders")).unwrap();
            fs::write(part.join("partition"), format!("{p}\n")).unwrap();
        }
        fs::create_dir_all(self.path("sys/block")).unwrap();
        symlink(&block, self.path(&format!("sys/block/{name}"))).unwrap();
    }

    pub fn mount(&self, source: &str, target: &str) {
        let mut mounts = fs::read_to_string(self.path("proc/mounts")).unwrap();
        mounts.push_str(&format!("{source} {target} ext4 rw 0 0\n"));
        fs::write(self.path("proc/mounts"), mounts).unwrap();
    }

    pub fn bind(&self, address: &str, driver: &str) {
        let driver_dir = self.path(&format!("sys/bus/pci/drivers/{driver}"));
        let _ = fs::remove_file(self.device_dir(address).join("driver"));
        symlink(&driver_dir, self.device_dir(address).join("driver")).unwrap();
    }

    pub fn driver_of(&self, address: &str) -> Option<String> {
        link_name(&self.device_dir(address).join("driver"))
    }

    pub fn override_of(&self, address: &str) -> String {
        fs::read_to_string(self.device_dir(address).join("driver_override")).unwrap().trim().to_owned()
    }
}

/// Plays the kernel on a [`FakeHost`] tree and records every write.
#[derive(Debug, Default)]
pub struct FakeKernel {
    root: PathBuf,
    /// The driver each device's id table would match (what drivers_probe picks without an override).
    pub native_drivers: BTreeMap<String, String>,
    /// Devices the VFIO open fails for (a group that is not viable).
    pub vfio_fails: BTreeSet<String>,
    /// Writes that fail with EIO: (path ending, value).
    pub failing_writes: BTreeSet<(String, String)>,
    pub writes: Mutex<Vec<(String, String)>>,
    pub vf_settings: Mutex<Vec<(u32, u32, VfNetConfig)>>,
}

impl FakeKernel {
    pub fn new(host: &FakeHost) -> Self {
        Self { root: host.dir.path().to_owned(), ..Default::default() }
    }

    pub fn writes(&self) -> Vec<(String, String)> {
        self.writes.lock().unwrap().clone()
    }

    fn device_dir(&self, address: &str) -> PathBuf {
        self.root.join("sys/devices/pci0000:00").join(address)
    }

    fn bind(&self, address: &str, driver: &str) -> io::Result<()> {
        let driver_dir = self.root.join("sys/bus/pci/drivers").join(driver);
        if !driver_dir.exists() {
            return Err(io::Error::from_raw_os_error(libc::ENODEV));
        }
        symlink(driver_dir, self.device_dir(address).join("driver"))
    }

    /// What the kernel does on `echo N > sriov_numvfs`: VFs at device 0x10 + i/8 of the PF's bus, each in a group
    /// of its own (100 + i) and driven by iavf.
    fn set_numvfs(&self, pf_dir: &Path, count: u32) -> io::Result<()> {
        let current: u32 = fs::read_to_string(pf_dir.join("sriov_numvfs"))?.trim().parse().unwrap();
        if current != 0 && count != 0 {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let pf: PciAddress = pf_dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
        for i in 0..current.max(count) {
            let vf = PciAddress { device: 0x10 + (i / 8) as u8, function: (i % 8) as u8, ..pf };
            let vf_dir = self.device_dir(&vf.to_string());
            let link = self.root.join("sys/bus/pci/devices").join(vf.to_string());
            let group = self.root.join(format!("sys/kernel/iommu_groups/{}", 100 + i));
            if count == 0 {
                fs::remove_dir_all(&vf_dir)?;
                fs::remove_file(&link)?;
                fs::remove_file(pf_dir.join(format!("virtfn{i}")))?;
                fs::remove_dir_all(&group)?;
                continue;
            }
            fs::create_dir_all(&vf_dir)?;
            fs::write(vf_dir.join("vendor"), fs::read(pf_dir.join("vendor"))?)?;
            fs::write(vf_dir.join("device"), "0x1520\n")?;
            fs::write(vf_dir.join("class"), fs::read(pf_dir.join("class"))?)?;
            fs::write(vf_dir.join("driver_override"), "(null)\n")?;
            symlink(pf_dir, vf_dir.join("physfn"))?;
            symlink(&vf_dir, pf_dir.join(format!("virtfn{i}")))?;
            symlink(&vf_dir, &link)?;
            fs::create_dir_all(group.join("devices"))?;
            symlink(&vf_dir, group.join("devices").join(vf.to_string()))?;
            symlink(&group, vf_dir.join("iommu_group"))?;
            fs::create_dir_all(self.root.join("sys/bus/pci/drivers/iavf"))?;
            self.bind(&vf.to_string(), "iavf")?;
        }
        fs::write(pf_dir.join("sriov_numvfs"), format!("{count}\n"))
    }
}

impl Kernel for FakeKernel {
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        let relative = path.strip_prefix(&self.root).expect("a write under the fake root").display().to_string();
        self.writes.lock().unwrap().push((relative.clone(), value.to_owned()));
        if self.failing_writes.iter().any(|(suffix, v)| relative.ends_with(suffix.as_str()) && v == value) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let file = path.file_name().unwrap().to_str().unwrap();
        let address = value.trim();
        match file {
            "driver_override" => {
                fs::write(path, if address.is_empty() { "(null)\n".into() } else { value.to_owned() + "\n" })
            }
            "unbind" => {
                let link = self.device_dir(address).join("driver");
                if link_name(&link).as_deref() != path.parent().unwrap().file_name().unwrap().to_str() {
                    return Err(io::Error::from_raw_os_error(libc::ENODEV));
                }
                fs::remove_file(link)
            }
            "bind" => {
                let driver = path.parent().unwrap().file_name().unwrap().to_str().unwrap();
                if self.device_dir(address).join("driver").exists() {
                    return Err(io::Error::from_raw_os_error(libc::EBUSY));
                }
                self.bind(address, driver)
            }
            "drivers_probe" => {
                if self.device_dir(address).join("driver").exists() {
                    return Ok(());
                }
                let over = fs::read_to_string(self.device_dir(address).join("driver_override"))?;
                let over = over.trim();
                if over != "(null)" {
                    // With an override set, only that driver may bind; a missing one leaves the device unbound.
                    let _ = self.bind(address, over);
                    return Ok(());
                }
                match self.native_drivers.get(address) {
                    Some(driver) => self.bind(address, driver),
                    None => Ok(()),
                }
            }
            "sriov_numvfs" => self.set_numvfs(path.parent().unwrap(), address.parse().unwrap()),
            other => panic!("the fake kernel does not know {other}"),
        }
    }

    fn vfio_open(&self, device_dir: &Path) -> io::Result<()> {
        let address = device_dir.file_name().unwrap().to_str().unwrap();
        if self.vfio_fails.contains(address) {
            return Err(io::Error::other("VFIO group is not viable"));
        }
        Ok(())
    }

    fn set_vf(&self, pf_ifindex: u32, vf: u32, config: &VfNetConfig) -> io::Result<()> {
        self.vf_settings.lock().unwrap().push((pf_ifindex, vf, config.clone()));
        Ok(())
    }
}
