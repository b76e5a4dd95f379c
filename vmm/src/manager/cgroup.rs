//! Each running VM's QEMU in a cgroup of its own (`qx_devices::placement::cgroup`, v1 or v2), named by the VM's
//! UUID under `quantix/`: memory limited to the guest's most memory plus QEMU's overhead, a pids limit, the default
//! CPU weight. The QEMU is moved in as soon as it is spawned (cold or from the warm pool, before its vCPUs run) and
//! again on reattach after a daemon restart (kept, not made anew); the cgroup is removed once the QEMU has exited.
//!
//! A host without the controllers (or a test's fake `host_root`) runs VMs without one, saying so in the log: the
//! cgroup contains a VM, it is not what lets it run.

use qx_common::blocking;
use qx_devices::placement::cgroup::{CgroupLimits, VmCgroup};
use tracing::{debug, warn};

use super::VmManager;
use crate::accel::Accel;
use crate::spec::VmSpec;

/// What QEMU itself needs beside guest memory: its own heap, device emulation, I/O buffers.
const OVERHEAD_MIB: u64 = 512;
/// TCG's translated-code cache: QEMU reserves up to 1 GiB of it for a full-system guest.
const TCG_CACHE_MIB: u64 = 1024;
/// QEMU's threads (vCPUs, I/O workers, up to 64 for thread-pool aio) with room to spare.
const PIDS_MAX: u64 = 1024;

/// The limits of `spec`'s cgroup.
pub(crate) fn limits(spec: &VmSpec, accel: Accel) -> CgroupLimits {
    let guest = spec.max_memory_mib.unwrap_or(spec.memory_mib).max(spec.memory_mib);
    let overhead = OVERHEAD_MIB + if accel == Accel::Tcg { TCG_CACHE_MIB } else { 0 };
    CgroupLimits {
        cpu_weight: None,
        cpu_quota_percent: None,
        memory_bytes: Some((guest + overhead) << 20),
        pids_max: Some(PIDS_MAX),
    }
}

impl VmManager {
    /// Puts the QEMU `pid` of `spec`'s VM into its cgroup, creating it (or keeping it) with the VM's limits.
    pub(super) async fn place_in_cgroup(&self, spec: &VmSpec, pid: i32) {
        let accel = self.resolve_accel(spec).unwrap_or(self.inner.config.accel.accel);
        let (host, name, limits) = (self.inner.config.host.clone(), spec.uuid().to_string(), limits(spec, accel));
        let placed = blocking(move || {
            let cgroup = VmCgroup::create(&host, &name, &limits)?;
            cgroup.add_process(pid)
        })
        .await;
        match placed {
            Ok(()) => debug!(pid, "QEMU placed in its cgroup"),
            Err(e) => warn!(pid, error = %qx_common::error_chain(&e), "QEMU runs without a cgroup of its own"),
        }
    }

    /// Removes the cgroup of `spec`'s VM once its QEMU has gone. Absent is fine.
    pub(super) async fn remove_cgroup(&self, spec: &VmSpec) {
        let (host, name) = (self.inner.config.host.clone(), spec.uuid().to_string());
        let removed = blocking(move || match VmCgroup::open(&host, &name)? {
            Some(cgroup) => cgroup.remove(),
            None => Ok(()),
        })
        .await;
        if let Err(e) = removed {
            warn!(error = %qx_common::error_chain(&e), "cannot remove the VM's cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_the_guest_at_its_largest_plus_overhead_and_tcg_cache() {
        let mut spec = VmSpec::from_text("name: a\nmemory_mib: 256\nkernel:\n  kernel: /k\n").unwrap();
        assert_eq!(limits(&spec, Accel::Kvm).memory_bytes, Some((256 + 512) << 20));
        assert_eq!(limits(&spec, Accel::Tcg).memory_bytes, Some((256 + 512 + 1024) << 20));
        spec.max_memory_mib = Some(1024);
        assert_eq!(limits(&spec, Accel::Kvm).memory_bytes, Some((1024 + 512) << 20));
        assert_eq!(limits(&spec, Accel::Kvm).pids_max, Some(PIDS_MAX));
    }
}
