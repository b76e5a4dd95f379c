//! The VM model of a Quantix node and the supervisor that runs it: specs and their validation, the QEMU command
//! line, QEMU processes that outlive the daemon, their serial consoles, and the lifecycle state machine.
//!
//! This crate drives QEMU through QMP (`qx-qmp`) and knows nothing of gRPC: the `agent` crate puts a network API
//! in front of [`VmManager`]. Host networking, storage pools and device passthrough live in their own crates and
//! feed devices into [`cmdline::Hardware`].
//!
//! ```no_run
//! use std::time::Duration;
//! use qx_vmm::{accel, HostRoot, ManagerConfig, VmManager, VmSpec};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let host = HostRoot::default();
//! let manager = VmManager::open(ManagerConfig {
//!     data_dir: "/var/lib/quantix".into(),
//!     qemu_binary: "qemu-system-x86_64".into(),
//!     accel: accel::detect(&host),
//!     host,
//!     stop_timeout: Duration::from_secs(60),
//!     warm_pool: Vec::new(),
//! }, Default::default())
//! .await?;
//! let spec = VmSpec::from_text("name: web1\nkernel:\n  kernel: /boot/vmlinuz\n")?;
//! manager.create(spec).await?;
//! manager.start("web1").await?;
//! manager.stop("web1", false, None).await?;
//! # Ok(()) }
//! ```

pub mod accel;
pub mod cmdline;
pub mod console;
pub mod device_tree;
pub mod firmware;
pub mod guest_agent;
pub mod host;
pub mod machine;
mod manager;
pub mod migration;
pub mod network;
pub mod persist;
pub mod placement;
pub mod process;
mod qmp_ops;
pub mod snapshot;
pub mod spec;
pub mod state;
pub mod tpm;
pub mod volumes;
pub mod warm;

pub use accel::{Accel, AccelProbe};
pub use console::SerialConsole;
pub use device_tree::{DeviceTree, DiskSlot, NicSlot};
pub use guest_agent::{AgentState, AgentStatus};
pub use host::HostRoot;
pub use manager::guest_ops::{ExecOutcome, GuestInfo, MAX_GUEST_FILE_BYTES};
pub use manager::hotplug::{DEFAULT_DETACH_TIMEOUT, MEMORY_STEP_MIB};
pub use manager::live_migration::{IncomingPeer, PeerError, SourceFacts};
pub use manager::stats::DiskStats;
pub use manager::{Backends, ManagerConfig, StartOptions, VmError, VmInfo, VmManager};
pub use network::NetworkBackend;
/// The guest agent client the manager's guest operations speak through, re-exported for their types.
pub use qx_qmp::qga;
pub use snapshot::{Snapshot, SnapshotKind, SnapshotState, SnapshotTree};
pub use spec::{ValidationErrors, VmSpec};
pub use state::{VmEvent, VmState};
pub use volumes::VolumeBackend;
pub use warm::WarmShape;
