//! Which accelerator QEMU gets: KVM when it is usable, TCG otherwise, and why.

use std::fmt;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

use crate::host::HostRoot;

/// `KVM_GET_API_VERSION` = `_IO(KVMIO, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: libc::c_int = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The outcome of looking at the host's KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelProbe {
    /// What the node uses for VMs that ask for `auto`.
    pub accel: Accel,
    /// One sentence an operator can act on.
    pub reason: String,
}

/// Looks at `/dev/kvm` and the loaded KVM modules under `root`.
///
/// PVM (`kvm_pvm`) exposes a `/dev/kvm` that answers the API but cannot run ordinary guest kernels (they hang at
/// boot), so its presence means TCG.
pub fn detect(root: &HostRoot) -> AccelProbe {
    let tcg = |reason: String| AccelProbe { accel: Accel::Tcg, reason };
    if root.path("/sys/module/kvm_pvm").exists() {
        return tcg("/dev/kvm is PVM (kvm_pvm is loaded), which cannot boot ordinary guest kernels; using TCG".into());
    }
    let dev = root.path("/dev/kvm");
    let file = match OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(file) => file,
        Err(e) => return tcg(format!("{} cannot be opened ({e}); using TCG", dev.display())),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only reads kernel state; `file` is open for the call.
    let version = unsafe { libc::ioctl(file.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if version != KVM_API_VERSION {
        return tcg(format!(
            "{} answers KVM_GET_API_VERSION with {version}, not {KVM_API_VERSION}; using TCG",
            dev.display()
        ));
    }
    AccelProbe { accel: Accel::Kvm, reason: format!("{} is usable (KVM API {KVM_API_VERSION})", dev.display()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_means_tcg() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sys/module/kvm_pvm")).unwrap();
        let probe = detect(&HostRoot::new(root.path()));
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("PVM"), "{}", probe.reason);
    }

    #[test]
    fn missing_dev_kvm_means_tcg() {
        let root = tempfile::tempdir().unwrap();
        let probe = detect(&HostRoot::new(root.path()));
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("dev/kvm cannot be opened"), "{}", probe.reason);
    }

    #[test]
    fn a_file_that_is_not_kvm_means_tcg() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/kvm"), b"").unwrap();
        let probe = detect(&HostRoot::new(root.path()));
        assert_eq!(probe.accel, Accel::Tcg);
        assert!(probe.reason.contains("KVM_GET_API_VERSION"), "{}", probe.reason);
    }
}
