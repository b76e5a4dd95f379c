//! Vendor, device and class names from the `pci.ids` database (Debian's `pci.ids` package), when the host has it.

use std::collections::HashMap;

use crate::host::HostRoot;

/// Where distributions put `pci.ids`, in the order looked at.
pub const PCI_IDS_PATHS: [&str; 2] = ["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// The names `pci.ids` gives; empty when the host has no database, so every lookup answers `None`.
#[derive(Debug, Default)]
pub struct PciIds {
    vendors: HashMap<u16, String>,
    devices: HashMap<(u16, u16), String>,
    classes: HashMap<u8, String>,
    subclasses: HashMap<(u8, u8), String>,
}

impl PciIds {
    /// Reads the first database found under `root`; an unreadable or absent one gives an empty table.
    pub fn load(root: &HostRoot) -> Self {
        PCI_IDS_PATHS
            .iter()
            .find_map(|path| std::fs::read(root.path(path)).ok())
            .map(|raw| Self::parse(&String::from_utf8_lossy(&raw)))
            .unwrap_or_default()
    }

    /// Parses the `pci.ids` format: `vvvv  name` lines with tab-indented `dddd  name` devices beneath (deeper
    /// lines are subsystems, skipped), then a `C cc  name` class section with tab-indented subclasses.
    pub fn parse(text: &str) -> Self {
        let mut ids = Self::default();
        let mut vendor = None;
        let mut class = None;
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let depth = line.bytes().take_while(|b| *b == b'\t').count();
            let body = &line[depth..];
            if depth == 0 {
                vendor = None;
                class = None;
                if let Some(rest) = body.strip_prefix("C ") {
                    if let Some((id, name)) = split_id(rest, 2) {
                        class = Some(id as u8);
                        ids.classes.insert(id as u8, name);
                    }
                } else if let Some((id, name)) = split_id(body, 4) {
                    vendor = Some(id as u16);
                    ids.vendors.insert(id as u16, name);
                }
            } else if depth == 1 {
                if let (Some(vendor), Some((id, name))) = (vendor, split_id(body, 4)) {
                    ids.devices.insert((vendor, id as u16), name);
                } else if let (Some(class), Some((id, name))) = (class, split_id(body, 2)) {
                    ids.subclasses.insert((class, id as u8), name);
                }
            }
        }
        ids
    }

    pub fn vendor(&self, vendor: u16) -> Option<&str> {
        self.vendors.get(&vendor).map(String::as_str)
    }

    pub fn device(&self, vendor: u16, device: u16) -> Option<&str> {
        self.devices.get(&(vendor, device)).map(String::as_str)
    }

    /// The subclass name when known (e.g. "Ethernet controller"), else the class name ("Network controller").
    pub fn class(&self, class_code: u32) -> Option<&str> {
        let (class, subclass) = ((class_code >> 16) as u8, (class_code >> 8) as u8);
        self.subclasses.get(&(class, subclass)).or_else(|| self.classes.get(&class)).map(String::as_str)
    }
}

/// `"8086  Intel Corporation"` → `(0x8086, "Intel Corporation")`, for an id of exactly `digits` hex digits.
fn split_id(body: &str, digits: usize) -> Option<(u32, String)> {
    let id = body.get(..digits)?;
    let name = body.get(digits..)?;
    if !name.starts_with(' ') {
        return None;
    }
    Some((u32::from_str_radix(id, 16).ok()?, name.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SAMPLE: &str = "\
# comment
8086  Intel Corporation
\t1521  I350 Gigabit Network Connection
\t\t8086 0001  Ethernet Server Adapter I350-T4
\t1520  I350 Ethernet Controller Virtual Function
1af4  Red Hat, Inc.
\t1041  Virtio network device
C 02  Network controller
\t00  Ethernet controller
\t\t00  prog-if
C 06  Bridge
\t04  PCI bridge
";

    #[test]
    fn names_vendors_devices_and_classes() {
        let ids = PciIds::parse(SAMPLE);
        assert_eq!(ids.vendor(0x8086), Some("Intel Corporation"));
        assert_eq!(ids.device(0x8086, 0x1521), Some("I350 Gigabit Network Connection"));
        assert_eq!(ids.device(0x8086, 0x8086), None, "a subsystem line is not a device");
        assert_eq!(ids.device(0x1af4, 0x1041), Some("Virtio network device"));
        assert_eq!(ids.class(0x020000), Some("Ethernet controller"));
        assert_eq!(ids.class(0x028000), Some("Network controller"), "unknown subclass falls back to the class");
        assert_eq!(ids.class(0x060400), Some("PCI bridge"));
        assert_eq!(ids.class(0xff0000), None);
    }

    #[test]
    fn no_database_means_no_names() {
        let root = tempfile::tempdir().unwrap();
        let ids = PciIds::load(&HostRoot::new(root.path()));
        assert_eq!(ids.vendor(0x8086), None);
    }
}
