//! [`VmError`]: what a VM operation can fail with, each variant naming the VM and the value at fault.

use std::time::Duration;

use super::BoxError;
use crate::spec::{ValidationErrors, VmSpec};
use crate::state::VmState;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The problems are the message, not a cause: they are what the caller must fix.
    #[error("invalid VM spec: {0}")]
    Invalid(ValidationErrors),
    #[error("VM {0:?} not found")]
    NotFound(String),
    #[error("VM {0:?} already exists")]
    AlreadyExists(String),
    #[error("VM {name:?} is {state}; {operation} needs it {needs}")]
    WrongState { name: String, state: VmState, operation: &'static str, needs: &'static str },
    #[error("cannot write the files of VM {name:?}")]
    Persist {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start VM {name:?}: {stage}{}", qemu_said(.log))]
    Start {
        name: String,
        stage: &'static str,
        log: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("QMP {command} failed on VM {name:?}")]
    Qmp {
        name: String,
        command: &'static str,
        #[source]
        source: qx_qmp::Error,
    },
    #[error("VM {name:?} has no serial console")]
    NoConsole { name: String },
    /// Disks name volumes other running VMs write to; the problems name the disks.
    #[error("volumes in use: {0}")]
    VolumesInUse(ValidationErrors),
    #[error("VM {name:?} still has a QEMU running (pid {pid}) that qx-node cannot drive; stop that process first")]
    Orphan { name: String, pid: i32 },
    #[error("VM {name:?} has no {kind} {id:?}")]
    NoDevice { name: String, kind: &'static str, id: String },
    /// The guest did not release the device in time; it stays attached (in QEMU and in the spec) until it does.
    #[error("VM {name:?} did not release device {device:?} within {waited:?}; it stays attached, and its removal finishes when the guest releases it")]
    DetachTimeout { name: String, device: String, waited: Duration },
    /// The target node cannot host the VM (a live migration's refusal before anything moved).
    #[error("node {target} cannot take VM {name:?}: {reason}")]
    MigrationRefused { name: String, target: String, reason: String },
    /// A live migration was cancelled; the VM runs here as before.
    #[error("the migration of VM {name:?} was cancelled; it keeps running here")]
    MigrationCancelled { name: String },
    /// A live migration failed at `stage`; `outcome` says where the VM is.
    #[error("the migration of VM {name:?} to {target} failed while {stage}; {outcome}")]
    Migration {
        name: String,
        target: String,
        stage: &'static str,
        outcome: &'static str,
        #[source]
        source: BoxError,
    },
    /// The guest agent did not answer, refused, or its answer did not decode.
    #[error("guest agent of VM {name:?}")]
    GuestAgent {
        name: String,
        #[source]
        source: qx_qmp::qga::QgaError,
    },
    /// A program started through the guest agent did not exit in time.
    #[error("the program started in VM {name:?} (guest pid {pid}) did not exit within {timeout:?}; {}", killed_text(*.killed))]
    GuestExecTimeout { name: String, pid: i64, timeout: Duration, killed: bool },
    #[error("VM {name:?} has no snapshot {snapshot:?}")]
    NoSnapshot { name: String, snapshot: String },
    #[error("VM {name:?} already has a snapshot {snapshot:?}")]
    SnapshotExists { name: String, snapshot: String },
    /// The VM's disks cannot hold the snapshot; the problems name them.
    #[error("cannot snapshot: {0}")]
    SnapshotRefused(ValidationErrors),
    /// QEMU or qemu-img failed; the VM's disks and records are as before the operation.
    #[error("snapshot {snapshot:?} of VM {name:?}: {stage} failed")]
    Snapshot {
        name: String,
        snapshot: String,
        stage: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// QEMU refused a hotplug step; what earlier steps added was removed again.
    #[error("cannot hotplug {device:?} into VM {name:?}: {stage} failed")]
    Hotplug {
        name: String,
        device: String,
        stage: &'static str,
        #[source]
        source: Box<qx_qmp::Error>,
    },
}

impl From<ValidationErrors> for VmError {
    fn from(errors: ValidationErrors) -> Self {
        VmError::Invalid(errors)
    }
}

fn killed_text(killed: bool) -> &'static str {
    if killed {
        "it was killed"
    } else {
        "killing it failed"
    }
}

fn qemu_said(log: &str) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("; QEMU said: {log}")
    }
}

/// A device the tree cannot place, as a field error on the device.
pub(super) fn place_error(spec: &VmSpec, error: crate::device_tree::PlaceError) -> VmError {
    use crate::device_tree::PlaceError;
    let id = match &error {
        PlaceError::NoFreePort { id, .. } | PlaceError::MachineFull { id, .. } | PlaceError::NoTapSlot { id } => id,
    };
    let field = match spec.disks.iter().position(|d| d.id.as_deref() == Some(id.as_str())) {
        Some(i) => format!("disks[{i}]"),
        None => spec
            .nics
            .iter()
            .position(|n| n.id.as_deref() == Some(id.as_str()))
            .map_or_else(|| "devices".to_owned(), |i| format!("nics[{i}]")),
    };
    ValidationErrors::one(field, id, error.to_string()).into()
}
