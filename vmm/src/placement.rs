//! Pinning a VM's threads to the host CPUs its spec's `placement` names: each vCPU thread (ids from
//! `query-cpus-fast`) and QEMU's other threads, before the vCPUs first run. The kernel keeps the affinity, so a
//! restarted daemon has nothing to redo.

use qx_devices::placement::{emulator_threads, pin_thread, vcpu_threads, PinError};
use qx_qmp::QmpClient;

use crate::host::HostRoot;
use crate::spec::Placement;

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("query-cpus-fast failed")]
    Query(#[source] qx_qmp::Error),
    #[error("placement.vcpu_cpus[{index}]: QEMU has no vCPU {index}")]
    NoVcpu { index: usize },
    #[error("cannot pin QEMU's threads")]
    Pin(#[from] PinError),
}

/// Pins the threads of QEMU `pid` as `placement` says; nothing to do (and no QMP round trip) when it is unset.
pub async fn apply(qmp: &QmpClient, pid: i32, host: &HostRoot, placement: &Placement) -> Result<(), PlacementError> {
    if placement.is_unset() {
        return Ok(());
    }
    // The typed reply would do, but the thread list is all that is needed and `vcpu_threads` reads QEMU's JSON.
    let reply = qmp.execute_raw("query-cpus-fast", None).await.map_err(PlacementError::Query)?;
    let vcpus = vcpu_threads(&reply)?;
    for (index, cpus) in placement.vcpu_cpus.iter().enumerate() {
        let vcpu = vcpus.iter().find(|v| v.cpu_index as usize == index).ok_or(PlacementError::NoVcpu { index })?;
        pin_thread(vcpu.thread_id, cpus)?;
    }
    if let Some(cpus) = &placement.emulator_cpus {
        for thread in emulator_threads(host, pid, &vcpus) {
            match pin_thread(thread, cpus) {
                Ok(()) => {}
                // A worker thread that ended while we looked: nothing left to pin.
                Err(PinError::Set { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
