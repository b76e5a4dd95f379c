//! PCI addresses as sysfs and QEMU write them: `DDDD:BB:DD.F` in hex.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A PCI function's address on the host: domain, bus, device (slot) and function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("PCI address {value:?}: {reason}; expected DDDD:BB:DD.F in hex, e.g. 0000:03:00.0")]
pub struct AddressError {
    pub value: String,
    pub reason: &'static str,
}

impl FromStr for PciAddress {
    type Err = AddressError;

    /// Accepts `DDDD:BB:DD.F` and, for domain 0, the short `BB:DD.F` that `lspci` prints.
    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| AddressError { value: value.to_owned(), reason };
        let (rest, function) = value.rsplit_once('.').ok_or(err("no '.' before the function"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [domain, bus, device] => (*domain, *bus, *device),
            [bus, device] => ("0", *bus, *device),
            _ => return Err(err("wrong number of ':'-separated parts")),
        };
        let hex = |text: &str, max_len: usize, what| {
            if text.is_empty() || text.len() > max_len || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(what));
            }
            u32::from_str_radix(text, 16).map_err(|_| err(what))
        };
        let domain = hex(domain, 4, "the domain is not 1-4 hex digits")? as u16;
        let bus = hex(bus, 2, "the bus is not 1-2 hex digits")? as u8;
        let device = hex(device, 2, "the device is not 1-2 hex digits")?;
        let function = hex(function, 1, "the function is not one hex digit")?;
        if device > 0x1f {
            return Err(err("the device is above 1f"));
        }
        if function > 7 {
            return Err(err("the function is above 7"));
        }
        Ok(Self { domain, bus, device: device as u8, function: function as u8 })
    }
}

impl TryFrom<String> for PciAddress {
    type Error = AddressError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<PciAddress> for String {
    fn from(address: PciAddress) -> Self {
        address.to_string()
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        let a: PciAddress = "0000:3b:1f.7".parse().unwrap();
        assert_eq!(a, PciAddress { domain: 0, bus: 0x3b, device: 0x1f, function: 7 });
        assert_eq!(a.to_string(), "0000:3b:1f.7");
        assert_eq!("3B:00.1".parse::<PciAddress>().unwrap().to_string(), "0000:3b:00.1");
        assert_eq!("10000".parse::<PciAddress>().unwrap_err().reason, "no '.' before the function");
    }

    #[test]
    fn refuses_malformed_addresses_naming_them() {
        for (bad, reason) in [
            ("", "no '.' before the function"),
            ("0000:03:00", "no '.' before the function"),
            ("0000:03:00.8", "the function is above 7"),
            ("0000:03:20.0", "the device is above 1f"),
            ("00000:03:00.0", "the domain is not 1-4 hex digits"),
            ("0000:g3:00.0", "the bus is not 1-2 hex digits"),
            ("0000:+3:00.0", "the bus is not 1-2 hex digits"),
            ("1:2:3:4.0", "wrong number of ':'-separated parts"),
            ("../../x:00.0", "the bus is not 1-2 hex digits"),
        ] {
            let e = bad.parse::<PciAddress>().unwrap_err();
            assert_eq!(e.reason, reason, "{bad}");
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }
}
