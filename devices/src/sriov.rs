//! SR-IOV: creating virtual functions on a physical function, picking a free one, and setting a VF's MAC, VLAN and
//! spoof checking on its PF (over netlink, through [`crate::kernel::Kernel::set_vf`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tracing::info;

use crate::host_use::HostUse;
use crate::passthrough::{DeviceError, HostDevices};
use crate::pci::{self, read_trimmed, PciAddress};

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddress([u8; 6]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MAC address {value:?}: {reason}")]
pub struct MacError {
    pub value: String,
    pub reason: &'static str,
}

impl MacAddress {
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddress {
    type Err = MacError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| MacError { value: value.to_owned(), reason };
        let parts: Vec<&str> = value.split(':').collect();
        if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
            return Err(err("expected six ':'-separated pairs of hex digits, e.g. 52:54:00:12:34:56"));
        }
        let mut octets = [0u8; 6];
        for (octet, part) in octets.iter_mut().zip(&parts) {
            *octet = u8::from_str_radix(part, 16).map_err(|_| err("not hex"))?;
        }
        if octets[0] & 1 == 1 {
            return Err(err("a multicast address cannot be a VF's"));
        }
        if octets == [0; 6] {
            return Err(err("the all-zero address cannot be a VF's"));
        }
        Ok(Self(octets))
    }
}

impl TryFrom<String> for MacAddress {
    type Error = MacError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<MacAddress> for String {
    fn from(mac: MacAddress) -> Self {
        mac.to_string()
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// What the PF enforces for one VF; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfNetConfig {
    pub mac: Option<MacAddress>,
    /// 1-4094 tags the VF's traffic; 0 removes the tag.
    pub vlan: Option<u16>,
    pub spoof_check: Option<bool>,
}

impl VfNetConfig {
    /// `vlan: 4095 is above the maximum 4094`.
    pub fn validate(&self) -> Result<(), String> {
        match self.vlan {
            Some(vlan) if vlan > 4094 => Err(format!("vlan: {vlan} is above the maximum 4094")),
            _ => Ok(()),
        }
    }
}

impl HostDevices {
    /// Sets `pf`'s number of VFs, through 0 when it changes (the kernel refuses one non-zero count over another).
    /// Refused while any VF is given to a VM or used by the host, since going through 0 removes every VF.
    pub fn set_vf_count(&self, pf: PciAddress, count: u32) -> Result<(), DeviceError> {
        let claims = self.lock();
        let device = self.device(pf)?;
        let Some(sriov) = device.sriov.clone() else {
            return Err(DeviceError::NotPf { address: pf });
        };
        if count > sriov.total_vfs {
            return Err(DeviceError::TooManyVfs { address: pf, count, total: sriov.total_vfs });
        }
        if count == sriov.num_vfs {
            return Ok(());
        }
        if let Some(claim) = claims.iter().find(|c| c.address == pf) {
            return Err(DeviceError::Taken { address: pf, owner: claim.owner.clone() });
        }
        let host_use = HostUse::scan(&self.root);
        let mut in_use = Vec::new();
        for &vf in &sriov.vfs {
            if let Some(claim) = claims.iter().find(|c| c.address == vf) {
                in_use.push(format!("{vf} is given to {}", claim.owner));
            } else if let Some(reason) = self.device(vf).ok().and_then(|d| host_use.use_of(&d)) {
                in_use.push(format!("{vf} is used by the host: {reason}"));
            }
        }
        if !in_use.is_empty() {
            return Err(DeviceError::VfsInUse { address: pf, in_use });
        }
        let numvfs = pci::sysfs_dir(&self.root, pf).join("sriov_numvfs");
        if sriov.num_vfs != 0 {
            self.write(pf, "remove the VFs", &numvfs, "0")?;
        }
        if count != 0 {
            self.write(pf, "create the VFs", &numvfs, &count.to_string())?;
        }
        let actual = read_trimmed(&numvfs).and_then(|n| n.parse().ok()).unwrap_or(0);
        if actual != count {
            return Err(DeviceError::VfCountMismatch { address: pf, count, actual });
        }
        info!(pf = %pf, count, "VF count set");
        Ok(())
    }

    /// The first VF of `pf` that no VM has, the host does not use, and `exclude` (picked already for the same VM)
    /// does not hold.
    pub fn free_vf(&self, pf: PciAddress, exclude: &[PciAddress]) -> Result<PciAddress, DeviceError> {
        let claims = self.lock();
        let device = self.device(pf)?;
        let Some(sriov) = device.sriov else {
            return Err(DeviceError::NotPf { address: pf });
        };
        let host_use = HostUse::scan(&self.root);
        sriov
            .vfs
            .iter()
            .copied()
            .find(|vf| {
                !exclude.contains(vf)
                    && !claims.iter().any(|c| c.address == *vf)
                    && self.device(*vf).is_ok_and(|d| host_use.use_of(&d).is_none())
            })
            .ok_or(DeviceError::NoFreeVf { pf, total: sriov.vfs.len() })
    }

    /// Sets `vf`'s MAC, VLAN and spoof checking on its PF. Done before the VF goes to its VM, so the guest gets the
    /// MAC the VM spec keeps.
    pub fn configure_vf(&self, vf: PciAddress, config: &VfNetConfig) -> Result<(), DeviceError> {
        let device = self.device(vf)?;
        let Some((pf, index)) = device.physfn else {
            return Err(DeviceError::NotVf { address: vf });
        };
        let pf_device = self.device(pf)?;
        let Some(interface) = pf_device.net_interfaces.first().cloned() else {
            return Err(DeviceError::PfNoInterface { pf, vf, index });
        };
        let ifindex_path = self.root.path("/sys/class/net").join(&interface).join("ifindex");
        let ifindex = read_trimmed(&ifindex_path).and_then(|n| n.parse().ok()).ok_or_else(|| DeviceError::SetVf {
            vf,
            index,
            interface: interface.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("no {}", ifindex_path.display())),
        })?;
        self.kernel.set_vf(ifindex, index, config).map_err(|source| DeviceError::SetVf {
            vf,
            index,
            interface: interface.clone(),
            source,
        })?;
        info!(vf = %vf, pf = %interface, index, ?config, "VF configured");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses_parse_and_refuse_naming_the_value() {
        let mac: MacAddress = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for (bad, reason) in [
            ("52:54:00:ab:cd", "expected six"),
            ("52-54-00-ab-cd-0f", "expected six"),
            ("52:54:00:ab:cd:zz", "not hex"),
            ("01:00:5e:00:00:01", "multicast"),
            ("00:00:00:00:00:00", "all-zero"),
        ] {
            let e = bad.parse::<MacAddress>().unwrap_err();
            assert!(e.reason.contains(reason), "{bad}: {e}");
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn vlan_above_4094_is_refused() {
        assert_eq!(
            VfNetConfig { vlan: Some(4095), ..Default::default() }.validate(),
            Err("vlan: 4095 is above the maximum 4094".into())
        );
        assert!(VfNetConfig { vlan: Some(0), ..Default::default() }.validate().is_ok());
    }
}
