//! Which accelerator QEMU gets: KVM when `/dev/kvm` answers the KVM API with what QEMU needs, TCG otherwise, and
//! why. Proposed replacement for `qx_vmm::accel` (same `detect`, with the API version and extensions checked
//! through `kvm-ioctls`).

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};

use crate::host::HostRoot;

/// The only KVM API version there has ever been.
pub const KVM_API_VERSION: i32 = 12;

/// What QEMU's KVM accelerator refuses to start without (its `kvm_required_capabilites`, x86 included).
const REQUIRED: [(Cap, &str); 6] = [
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::DestroyMemoryRegionWorks, "KVM_CAP_DESTROY_MEMORY_REGION_WORKS"),
    (Cap::JoinMemoryRegionsWorks, "KVM_CAP_JOIN_MEMORY_REGIONS_WORKS"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
];

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
    /// `KVM_CAP_MAX_VCPUS`, when KVM is usable.
    pub max_vcpus: Option<usize>,
    /// Whether KVM can route device interrupts itself (`KVM_CAP_IRQFD`), which VFIO passthrough relies on.
    pub irqfd: bool,
}

/// Looks at `/dev/kvm` and the loaded KVM modules under `root`.
///
/// PVM (`kvm_pvm`) exposes a `/dev/kvm` that answers the API but cannot run ordinary guest kernels (they hang at
/// boot), so its presence means TCG.
pub fn detect(root: &HostRoot) -> AccelProbe {
    let tcg = |reason: String| AccelProbe { accel: Accel::Tcg, reason, max_vcpus: None, irqfd: false };
    if root.path("/sys/module/kvm_pvm").exists() {
        return tcg("/dev/kvm is PVM (kvm_pvm is loaded), which cannot boot ordinary guest kernels; using TCG".into());
    }
    let dev = root.path("/dev/kvm");
    let Ok(path) = CString::new(dev.as_os_str().as_bytes()) else {
        return tcg(format!("{} is not a usable path; using TCG", dev.display()));
    };
    let kvm = match Kvm::new_with_path(&path) {
        Ok(kvm) => kvm,
        Err(e) => return tcg(format!("{} cannot be opened ({e}); using TCG", dev.display())),
    };
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return tcg(format!(
            "{} answers KVM_GET_API_VERSION with {version}, not {KVM_API_VERSION}; using TCG",
            dev.display()
        ));
    }
    let missing: Vec<&str> = REQUIRED.iter().filter(|(cap, _)| !kvm.check_extension(*cap)).map(|(_, n)| *n).collect();
    if !missing.is_empty() {
        return tcg(format!("{} lacks {}, which QEMU needs; using TCG", dev.display(), missing.join(", ")));
    }
    AccelProbe {
        accel: Accel::Kvm,
        reason: format!("{} is usable (KVM API {KVM_API_VERSION})", dev.display()),
        max_vcpus: Some(kvm.get_max_vcpus()),
        irqfd: kvm.check_extension(Cap::Irqfd),
    }
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

    /// The real /dev/kvm, when there is one that is not PVM, passes every check QEMU makes.
    #[test]
    fn the_hosts_kvm_when_usable_has_what_qemu_needs() {
        let host = HostRoot::default();
        let probe = detect(&host);
        if !std::path::Path::new("/dev/kvm").exists() || host.path("/sys/module/kvm_pvm").exists() {
            assert_eq!(probe.accel, Accel::Tcg, "{}", probe.reason);
            return qx_test_infra::skip(&format!("{}: {}", qx_test_infra::NO_SUCH_HARDWARE, probe.reason));
        }
        assert_eq!(probe.accel, Accel::Kvm, "{}", probe.reason);
        assert!(probe.max_vcpus.is_some_and(|n| n >= 1));
    }
}
