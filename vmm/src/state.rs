//! VM lifecycle states and the events that report moves between them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `stopped → starting → running ⇄ paused → stopping → stopped`; `crashed` when QEMU dies unasked;
/// `running → migrating → (gone | running)` on a migration's source, `incoming → (running | gone)` on its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// No QEMU process. Start, update and delete are allowed.
    Stopped,
    /// QEMU is being spawned and configured; every other operation waits.
    Starting,
    /// vCPUs run. Stop, reboot, reset and pause are allowed.
    Running,
    /// vCPUs are stopped; memory is kept. Resume, stop and reset are allowed.
    Paused,
    /// A stop is under way.
    Stopping,
    /// QEMU exited without being asked (killed, crashed, or lost while the daemon was down). Like `stopped`.
    Crashed,
    /// The guest runs here while it is live-migrated to another node; every other operation waits. It ends
    /// `running` (cancelled or failed) or with the VM gone from this node (it runs on the target).
    Migrating,
    /// A QEMU waits for the guest's state from another node (the source owns the VM until it finishes the
    /// migration); only finishing or aborting the migration applies. It ends `running`, or with the VM gone.
    Incoming,
}

impl VmState {
    /// Whether a QEMU process belongs to this state.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Migrating
                | VmState::Incoming
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
            VmState::Migrating => "migrating",
            VmState::Incoming => "incoming",
        })
    }
}

/// A state change of one VM. `state` is `None` when the VM was deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEvent {
    pub vm: String,
    pub state: Option<VmState>,
    pub previous: Option<VmState>,
    pub reason: String,
    pub at_unix_ms: i64,
}
