//! Whether the host itself uses a PCI device: a network interface of it carries a host address (the management
//! address among them), or a disk on it is mounted, used as swap or held by device-mapper/md that is.
//! Such a device is never handed to a VM.

use std::collections::BTreeSet;
use std::path::Path;

use crate::host::HostRoot;
use crate::pci::{dir_names, read_trimmed, PciDevice};

/// How deep under a PCI device's sysfs directory its disks may sit (ahci: `ata1/host0/target0:0:0/0:0:0:0/block`).
const BLOCK_SEARCH_DEPTH: usize = 6;

/// What the host uses, read once from `/proc` and `/sys` and checked against each device.
#[derive(Debug, Default)]
pub struct HostUse {
    /// Interfaces with an IPv4 route (a configured address gives one) or a global IPv6 address.
    addressed_interfaces: BTreeSet<String>,
    /// Block device names (`vda`, `sda1`, `dm-0`) that are mounted or used as swap.
    used_block_devices: BTreeSet<String>,
    /// Where the devices' disks are looked up.
    root: HostRoot,
}

impl HostUse {
    pub fn scan(root: &HostRoot) -> Self {
        let mut addressed_interfaces = BTreeSet::new();
        // /proc/net/route: a header line, then one route per line with the interface first.
        for line in read_lines(&root.path("/proc/net/route")).into_iter().skip(1) {
            if let Some(iface) = line.split_whitespace().next() {
                addressed_interfaces.insert(iface.to_owned());
            }
        }
        // /proc/net/if_inet6: address, ifindex, prefix length, scope, flags, name. Scope 0x20 is link-local, which
        // every interface that is up has.
        for line in read_lines(&root.path("/proc/net/if_inet6")) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [_, _, _, scope, _, name] = fields.as_slice() {
                if *scope != "20" && *name != "lo" {
                    addressed_interfaces.insert((*name).to_owned());
                }
            }
        }
        let mut used_block_devices = BTreeSet::new();
        for line in read_lines(&root.path("/proc/mounts")) {
            if let Some(source) = line.split_whitespace().next() {
                used_block_devices.extend(block_name(root, source));
            }
        }
        for line in read_lines(&root.path("/proc/swaps")).into_iter().skip(1) {
            if let Some(source) = line.split_whitespace().next() {
                used_block_devices.extend(block_name(root, source));
            }
        }
        Self { addressed_interfaces, used_block_devices, root: root.clone() }
    }

    /// Why the host needs `device`, or `None` when a VM may have it.
    pub fn use_of(&self, device: &PciDevice) -> Option<String> {
        if let Some(iface) = device.net_interfaces.iter().find(|i| self.addressed_interfaces.contains(*i)) {
            return Some(format!("its network interface {iface} carries a host address"));
        }
        let dir = crate::pci::sysfs_dir(&self.root, device.address);
        for disk in disks_under(&dir, BLOCK_SEARCH_DEPTH) {
            let disk_dir = self.root.path("/sys/block").join(&disk);
            let mut names = vec![disk.clone()];
            names.extend(dir_names(&disk_dir).into_iter().filter(|p| disk_dir.join(p).join("partition").exists()));
            for name in names {
                let dev_dir = if name == disk { disk_dir.clone() } else { disk_dir.join(&name) };
                let mut users = vec![name.clone()];
                users.extend(dir_names(&dev_dir.join("holders")));
                if let Some(user) = users.iter().find(|u| self.used_block_devices.contains(*u)) {
                    return Some(if *user == name {
                        format!("it holds /dev/{name}, which the host has mounted or uses as swap")
                    } else {
                        format!("it holds /dev/{name}, under {user}, which the host has mounted or uses as swap")
                    });
                }
            }
        }
        None
    }
}

/// The kernel name (`sda1`, `dm-0`) of a mount or swap source like `/dev/sda1` or `/dev/mapper/vg-root`.
fn block_name(root: &HostRoot, source: &str) -> Option<String> {
    let name = source.strip_prefix("/dev/")?;
    if let Some(mapper) = name.strip_prefix("mapper/") {
        // Each /sys/block/dm-N/dm/name holds its mapper name.
        return dir_names(&root.path("/sys/block"))
            .into_iter()
            .find(|dm| read_trimmed(&root.path("/sys/block").join(dm).join("dm/name")).as_deref() == Some(mapper));
    }
    Some(name.to_owned())
}

/// Disk names found in `block/` directories under `dir`, not following symlinks (sysfs links back up the tree).
fn disks_under(dir: &Path, depth: usize) -> Vec<String> {
    let mut disks = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return disks;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else { continue };
        if !kind.is_dir() {
            continue;
        }
        if entry.file_name() == "block" {
            disks.extend(dir_names(&entry.path()));
        } else if depth > 0 {
            disks.extend(disks_under(&entry.path(), depth - 1));
        }
    }
    disks
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|s| s.lines().map(str::to_owned).collect()).unwrap_or_default()
}
