//! QMP events and run states as types: what `vmm` matches on instead of event names and status strings.
//!
//! [`QmpEvent::typed`] reads an event's `data` into [`QemuEvent`]; an event this crate does not model, or whose data
//! does not have the shape QEMU 7.2 documents, stays whole as [`QemuEvent::Other`] so nothing is lost.
//! [`RunState`] is every state `query-status` reports on QEMU 7.2, plus [`RunState::Other`] for a later QEMU's.

use std::fmt;

use serde::Deserialize;
use serde_json::Value;

pub use qapi_qmp::{JobStatus, MigrationStatus, ShutdownCause};

use crate::protocol::QmpEvent;

/// A QMP event with its data decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum QemuEvent {
    /// `SHUTDOWN`: the guest or the host asked to power off (with `-no-shutdown` or `set-action shutdown=pause`
    /// QEMU pauses instead of exiting).
    Shutdown {
        /// The guest asked (ACPI, reset of a guest that does not reboot, ...), not the host.
        guest: bool,
        /// Why.
        reason: ShutdownCause,
    },
    /// `POWERDOWN`: the ACPI power button was pressed (`system_powerdown`).
    Powerdown,
    /// `STOP`: the vCPUs stopped (`stop`, an I/O error, a watchdog, migration's last phase, ...).
    Stop,
    /// `RESUME`: the vCPUs run again.
    Resume,
    /// `RESET`: the machine was reset.
    Reset {
        /// The guest asked.
        guest: bool,
        /// Why.
        reason: ShutdownCause,
    },
    /// `GUEST_PANICKED`: the guest reported a panic (pvpanic, Hyper-V crash MSRs).
    GuestPanicked {
        /// What QEMU does about it: `pause`, `poweroff` or `run`.
        action: String,
    },
    /// `DEVICE_DELETED`: a device, or a child object of one, is gone after `device_del`.
    ///
    /// QEMU sends one for the device (`device` is its id) and, for some devices, first one per child object with
    /// only a QOM `path` (`/machine/peripheral/virtio-disk1/virtio-backend`): use [`QemuEvent::deleted`] to match
    /// the device itself.
    DeviceDeleted {
        /// The device's id; `None` for a child object or a device created without an id.
        device: Option<String>,
        /// The QOM path of what was deleted.
        path: String,
    },
    /// `JOB_STATUS_CHANGE`: a background job (block job, snapshot job) moved to another state.
    JobStatusChange {
        /// The job id.
        id: String,
        /// Its new state.
        status: JobStatus,
    },
    /// `MIGRATION`: the outgoing or incoming migration moved to another state.
    Migration {
        /// The new state.
        status: MigrationStatus,
    },
    /// `MIGRATION_PASS`: a new RAM pass started.
    MigrationPass {
        /// Passes so far.
        pass: i64,
    },
    /// `BLOCK_JOB_COMPLETED`: a block job finished, with `error` set when it failed.
    BlockJobCompleted(BlockJobInfo),
    /// `BLOCK_JOB_CANCELLED`: a block job was cancelled.
    BlockJobCancelled(BlockJobInfo),
    /// `BLOCK_JOB_READY`: a mirror-like job is in sync and waits for `block-job-complete`.
    BlockJobReady(BlockJobInfo),
    /// `BLOCK_JOB_PENDING`: a job waits for `block-job-finalize` (with `auto-finalize: false`).
    BlockJobPending {
        /// The job type, e.g. `mirror`, `backup`.
        job_type: String,
        /// The job id.
        id: String,
    },
    /// `BLOCK_JOB_ERROR`: a block job hit an I/O error.
    BlockJobError {
        /// The job id (`device` in QMP, for history's sake).
        id: String,
        /// `read` or `write`.
        operation: String,
        /// What the job does about it: `ignore`, `report` or `stop`.
        action: String,
    },
    /// `VSERPORT_CHANGE`: the guest opened or closed a virtio-serial port (qemu-ga starting or stopping, for the
    /// guest agent's port).
    VserportChange {
        /// The port device's id.
        id: String,
        /// Whether the guest has it open now.
        open: bool,
    },
    /// Any other event, or one whose data does not decode: kept whole.
    Other {
        /// The event name.
        name: String,
        /// Its data (`Value::Null` without).
        data: Value,
    },
}

/// What the `BLOCK_JOB_COMPLETED`, `_CANCELLED` and `_READY` events say about the job.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobInfo {
    /// The job type, e.g. `mirror`, `commit`, `stream`, `backup`.
    #[serde(rename = "type")]
    pub job_type: String,
    /// The job id (`device` in QMP, for history's sake).
    #[serde(rename = "device")]
    pub id: String,
    /// The work to do, in bytes (an estimate that can grow).
    pub len: i64,
    /// The work done.
    pub offset: i64,
    /// The speed limit in bytes per second; 0 for none.
    pub speed: i64,
    /// Why the job failed (only in `BLOCK_JOB_COMPLETED`).
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Deserialize)]
struct ShutdownData {
    guest: bool,
    reason: ShutdownCause,
}

#[derive(Deserialize)]
struct VserportChangeData {
    id: String,
    open: bool,
}

#[derive(Deserialize)]
struct DeviceDeletedData {
    #[serde(default)]
    device: Option<String>,
    path: String,
}

#[derive(Deserialize)]
struct JobStatusData {
    id: String,
    status: JobStatus,
}

#[derive(Deserialize)]
struct MigrationData {
    status: MigrationStatus,
}

#[derive(Deserialize)]
struct MigrationPassData {
    pass: i64,
}

#[derive(Deserialize)]
struct GuestPanickedData {
    action: String,
}

#[derive(Deserialize)]
struct BlockJobPendingData {
    #[serde(rename = "type")]
    job_type: String,
    id: String,
}

#[derive(Deserialize)]
struct BlockJobErrorData {
    device: String,
    operation: String,
    action: String,
}

impl QmpEvent {
    /// This event with its data decoded; [`QemuEvent::Other`] for events not modelled here or with data of a
    /// shape QEMU 7.2 does not send.
    pub fn typed(&self) -> QemuEvent {
        fn data<T: serde::de::DeserializeOwned>(event: &QmpEvent) -> Option<T> {
            serde_json::from_value(event.data.clone()).ok()
        }
        let typed = match self.name.as_str() {
            "SHUTDOWN" => data(self).map(|d: ShutdownData| QemuEvent::Shutdown { guest: d.guest, reason: d.reason }),
            "POWERDOWN" => Some(QemuEvent::Powerdown),
            "STOP" => Some(QemuEvent::Stop),
            "RESUME" => Some(QemuEvent::Resume),
            "RESET" => data(self).map(|d: ShutdownData| QemuEvent::Reset { guest: d.guest, reason: d.reason }),
            "GUEST_PANICKED" => data(self).map(|d: GuestPanickedData| QemuEvent::GuestPanicked { action: d.action }),
            "DEVICE_DELETED" => {
                data(self).map(|d: DeviceDeletedData| QemuEvent::DeviceDeleted { device: d.device, path: d.path })
            }
            "JOB_STATUS_CHANGE" => {
                data(self).map(|d: JobStatusData| QemuEvent::JobStatusChange { id: d.id, status: d.status })
            }
            "VSERPORT_CHANGE" => {
                data(self).map(|d: VserportChangeData| QemuEvent::VserportChange { id: d.id, open: d.open })
            }
            "MIGRATION" => data(self).map(|d: MigrationData| QemuEvent::Migration { status: d.status }),
            "MIGRATION_PASS" => data(self).map(|d: MigrationPassData| QemuEvent::MigrationPass { pass: d.pass }),
            "BLOCK_JOB_COMPLETED" => data(self).map(QemuEvent::BlockJobCompleted),
            "BLOCK_JOB_CANCELLED" => data(self).map(QemuEvent::BlockJobCancelled),
            "BLOCK_JOB_READY" => data(self).map(QemuEvent::BlockJobReady),
            "BLOCK_JOB_PENDING" => {
                data(self).map(|d: BlockJobPendingData| QemuEvent::BlockJobPending { job_type: d.job_type, id: d.id })
            }
            "BLOCK_JOB_ERROR" => data(self).map(|d: BlockJobErrorData| QemuEvent::BlockJobError {
                id: d.device,
                operation: d.operation,
                action: d.action,
            }),
            _ => None,
        };
        typed.unwrap_or_else(|| QemuEvent::Other { name: self.name.clone(), data: self.data.clone() })
    }
}

impl QemuEvent {
    /// Whether this is the `DEVICE_DELETED` of the device `id` itself, not of one of its child objects: the
    /// event that finishes a `device_del`.
    pub fn deleted(&self, id: &str) -> bool {
        matches!(self, QemuEvent::DeviceDeleted { device: Some(device), .. } if device == id)
    }
}

/// QEMU's run state, as `query-status` reports it: every state of QEMU 7.2.
///
/// Only [`RunState::Running`] has the vCPUs running; every other state has them stopped, for reasons that
/// matter: a VM in `inmigrate` waits for incoming migration and a VM in `postmigrate` was migrated away, neither is
/// "paused" by anyone.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Stopped by the debugger (gdbstub).
    Debug,
    /// Waiting for an incoming migration (`-incoming`).
    Inmigrate,
    /// An internal error stopped the emulation (e.g. KVM failed); only `system_reset` leaves it.
    InternalError,
    /// An I/O error paused the guest (`werror=stop`).
    IoError,
    /// Paused (`stop`, `-S` after start).
    Paused,
    /// Migrated away: the vCPUs will not run here again without a new start.
    Postmigrate,
    /// Not started yet (`-S` before the first `cont`).
    Prelaunch,
    /// The last phase of an outgoing migration, vCPUs stopped.
    FinishMigrate,
    /// Loading a snapshot (`loadvm`).
    RestoreVm,
    /// The vCPUs run.
    Running,
    /// Saving a snapshot (`savevm`).
    SaveVm,
    /// The guest shut down and QEMU waits (`-no-shutdown`, `set-action shutdown=pause`).
    Shutdown,
    /// The guest is suspended to RAM (S3).
    Suspended,
    /// A watchdog fired and paused the guest.
    Watchdog,
    /// The guest panicked and QEMU paused it.
    GuestPanicked,
    /// COLO fault tolerance.
    Colo,
    /// A state of a later QEMU, kept by name.
    Other(String),
}

impl RunState {
    /// The state named as QMP names it (`finish-migrate`); an unknown name is [`RunState::Other`].
    pub fn from_name(name: &str) -> Self {
        match name {
            "debug" => Self::Debug,
            "inmigrate" => Self::Inmigrate,
            "internal-error" => Self::InternalError,
            "io-error" => Self::IoError,
            "paused" => Self::Paused,
            "postmigrate" => Self::Postmigrate,
            "prelaunch" => Self::Prelaunch,
            "finish-migrate" => Self::FinishMigrate,
            "restore-vm" => Self::RestoreVm,
            "running" => Self::Running,
            "save-vm" => Self::SaveVm,
            "shutdown" => Self::Shutdown,
            "suspended" => Self::Suspended,
            "watchdog" => Self::Watchdog,
            "guest-panicked" => Self::GuestPanicked,
            "colo" => Self::Colo,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The QMP name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Debug => "debug",
            Self::Inmigrate => "inmigrate",
            Self::InternalError => "internal-error",
            Self::IoError => "io-error",
            Self::Paused => "paused",
            Self::Postmigrate => "postmigrate",
            Self::Prelaunch => "prelaunch",
            Self::FinishMigrate => "finish-migrate",
            Self::RestoreVm => "restore-vm",
            Self::Running => "running",
            Self::SaveVm => "save-vm",
            Self::Shutdown => "shutdown",
            Self::Suspended => "suspended",
            Self::Watchdog => "watchdog",
            Self::GuestPanicked => "guest-panicked",
            Self::Colo => "colo",
            Self::Other(name) => name,
        }
    }

    /// Whether the vCPUs run.
    pub fn is_running(&self) -> bool {
        *self == Self::Running
    }

    /// Whether the guest was stopped and can simply be resumed with `cont` (paused by an operator, an I/O error,
    /// a watchdog, a debugger, or suspended): what `vmm` shows as a paused VM. Migration, snapshot, shutdown,
    /// panic and error states are not.
    pub fn is_resumable_pause(&self) -> bool {
        matches!(self, Self::Paused | Self::IoError | Self::Watchdog | Self::Debug | Self::Suspended)
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<qapi_qmp::RunState> for RunState {
    fn from(state: qapi_qmp::RunState) -> Self {
        let name = serde_json::to_value(state).ok();
        Self::from_name(name.as_ref().and_then(Value::as_str).unwrap_or_default())
    }
}

/// What `query-status` says: [`QmpClient::query_status`](crate::QmpClient::query_status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state.
    pub state: RunState,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, data: Value) -> QmpEvent {
        QmpEvent { name: name.to_owned(), data, seconds: 1, microseconds: 2 }
    }

    #[test]
    fn lifecycle_events_decode() {
        assert_eq!(
            event("SHUTDOWN", json!({"guest": true, "reason": "guest-shutdown"})).typed(),
            QemuEvent::Shutdown { guest: true, reason: ShutdownCause::guest_shutdown }
        );
        assert_eq!(
            event("RESET", json!({"guest": false, "reason": "host-qmp-system-reset"})).typed(),
            QemuEvent::Reset { guest: false, reason: ShutdownCause::host_qmp_system_reset }
        );
        assert_eq!(event("STOP", Value::Null).typed(), QemuEvent::Stop);
        assert_eq!(event("RESUME", Value::Null).typed(), QemuEvent::Resume);
        assert_eq!(event("POWERDOWN", Value::Null).typed(), QemuEvent::Powerdown);
        assert_eq!(
            event("GUEST_PANICKED", json!({"action": "pause", "info": {"type": "hyper-v"}})).typed(),
            QemuEvent::GuestPanicked { action: "pause".into() }
        );
    }

    #[test]
    fn vserport_change_decodes() {
        assert_eq!(
            event("VSERPORT_CHANGE", json!({"id": "qga0", "open": true})).typed(),
            QemuEvent::VserportChange { id: "qga0".into(), open: true }
        );
    }

    #[test]
    fn device_deleted_with_and_without_device() {
        let device =
            event("DEVICE_DELETED", json!({"device": "virtio-disk1", "path": "/machine/peripheral/virtio-disk1"}))
                .typed();
        assert!(device.deleted("virtio-disk1"));
        assert!(!device.deleted("virtio-disk2"));
        // The child object's event comes first and has no `device`: it must not finish the detach.
        let child = event("DEVICE_DELETED", json!({"path": "/machine/peripheral/virtio-disk1/virtio-backend"})).typed();
        assert_eq!(
            child,
            QemuEvent::DeviceDeleted { device: None, path: "/machine/peripheral/virtio-disk1/virtio-backend".into() }
        );
        assert!(!child.deleted("virtio-disk1"));
    }

    #[test]
    fn job_and_migration_events_decode() {
        assert_eq!(
            event("JOB_STATUS_CHANGE", json!({"id": "snap0", "status": "concluded"})).typed(),
            QemuEvent::JobStatusChange { id: "snap0".into(), status: JobStatus::concluded }
        );
        assert_eq!(
            event("MIGRATION", json!({"status": "postcopy-active"})).typed(),
            QemuEvent::Migration { status: MigrationStatus::postcopy_active }
        );
        assert_eq!(event("MIGRATION_PASS", json!({"pass": 3})).typed(), QemuEvent::MigrationPass { pass: 3 });
        let completed = event(
            "BLOCK_JOB_COMPLETED",
            json!({"type": "mirror", "device": "job0", "len": 100, "offset": 100, "speed": 0, "error": "No space"}),
        );
        let QemuEvent::BlockJobCompleted(info) = completed.typed() else { panic!("{:?}", completed.typed()) };
        assert_eq!(
            (info.job_type.as_str(), info.id.as_str(), info.error.as_deref()),
            ("mirror", "job0", Some("No space"))
        );
        let ready =
            event("BLOCK_JOB_READY", json!({"type": "mirror", "device": "job0", "len": 5, "offset": 5, "speed": 0}));
        assert!(matches!(ready.typed(), QemuEvent::BlockJobReady(BlockJobInfo { error: None, .. })));
        let cancelled = event(
            "BLOCK_JOB_CANCELLED",
            json!({"type": "commit", "device": "job1", "len": 9, "offset": 1, "speed": 0}),
        );
        assert!(matches!(cancelled.typed(), QemuEvent::BlockJobCancelled(BlockJobInfo { offset: 1, .. })));
        assert_eq!(
            event("BLOCK_JOB_PENDING", json!({"type": "backup", "id": "job2"})).typed(),
            QemuEvent::BlockJobPending { job_type: "backup".into(), id: "job2".into() }
        );
        assert_eq!(
            event("BLOCK_JOB_ERROR", json!({"device": "job0", "operation": "write", "action": "stop"})).typed(),
            QemuEvent::BlockJobError { id: "job0".into(), operation: "write".into(), action: "stop".into() }
        );
    }

    #[test]
    fn unknown_and_malformed_events_stay_raw() {
        let unknown = event("NIC_RX_FILTER_CHANGED", json!({"name": "nic0", "path": "/x"}));
        assert_eq!(
            unknown.typed(),
            QemuEvent::Other { name: "NIC_RX_FILTER_CHANGED".into(), data: unknown.data.clone() }
        );
        let malformed = event("SHUTDOWN", json!({"guest": "yes"}));
        assert_eq!(malformed.typed(), QemuEvent::Other { name: "SHUTDOWN".into(), data: json!({"guest": "yes"}) });
        let new_status = event("MIGRATION", json!({"status": "teleporting"}));
        assert!(matches!(new_status.typed(), QemuEvent::Other { .. }));
    }

    #[test]
    fn every_run_state_round_trips_and_only_running_runs() {
        let names = [
            "debug",
            "inmigrate",
            "internal-error",
            "io-error",
            "paused",
            "postmigrate",
            "prelaunch",
            "finish-migrate",
            "restore-vm",
            "running",
            "save-vm",
            "shutdown",
            "suspended",
            "watchdog",
            "guest-panicked",
            "colo",
        ];
        for name in names {
            let state = RunState::from_name(name);
            assert!(!matches!(state, RunState::Other(_)), "{name}");
            assert_eq!(state.as_str(), name);
            assert_eq!(state.is_running(), name == "running", "{name}");
            let typed: qapi_qmp::RunState = serde_json::from_value(json!(name)).unwrap();
            assert_eq!(RunState::from(typed), state);
        }
        assert_eq!(RunState::from_name("teleporting"), RunState::Other("teleporting".into()));
        for not_a_pause in ["inmigrate", "postmigrate", "finish-migrate", "prelaunch", "guest-panicked", "shutdown"] {
            assert!(!RunState::from_name(not_a_pause).is_resumable_pause(), "{not_a_pause}");
        }
        assert!(RunState::Paused.is_resumable_pause());
        assert!(RunState::IoError.is_resumable_pause());
    }
}
