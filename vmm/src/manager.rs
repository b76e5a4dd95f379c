//! `VmManager`: every VM on the node, their lifecycle operations, and the supervisor task of each running QEMU.
//!
//! Each VM has an operation lock, so its operations run one at a time, and a status behind a short-lived mutex that
//! is never held across an await; different VMs never wait on each other. Force stop alone skips the operation lock,
//! so that it can cut short a graceful stop that hangs.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qx_qmp::qapi_qmp::ShutdownAction;
use qx_qmp::{ConnectOptions, Event, QemuEvent, QmpClient};
use tokio::sync::{broadcast, watch};
use tracing::{debug, error, info, warn, Instrument};

use crate::accel::{Accel, AccelProbe};
use crate::cmdline::{qemu_args, Hardware, LaunchLayout, NetworkNic};
use crate::console::{ConsoleError, SerialConsole};
use crate::device_tree::{DeviceTree, Growth};
use crate::guest_agent::{agent_options, GuestAgent, AGENT_PORT_ID};
use crate::host::HostRoot;
use crate::machine::{QemuCaps, HOST_CPU};
use crate::network::{network_nics, NetworkBackend};
use crate::persist::{read_tail, write_atomic, StateRecord, VmDir};
use crate::process::{read_pidfile, ProcessError, QemuProcess};
use crate::qmp_ops::{self, plug_device, Found, Simple};
use crate::spec::{AccelChoice, RealFiles, ValidationErrors, VmSpec};
use crate::state::{VmEvent, VmState};
use crate::volumes::VolumeBackend;
use crate::warm::{launch_key, Warm, WarmPool, WarmShape};
use qx_common::blocking;
use uuid::Uuid;

/// Fd numbers QEMU finds its pre-bound sockets at.
const QMP_FD: i32 = 3;
const SERIAL_FD: i32 = 4;
const QGA_FD: i32 = 5;
/// How long `quit` gets after the guest ignored the power button, before SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(5);
/// How much of `qemu.log` a failed start quotes.
const START_LOG_TAIL: u64 = 2048;
/// How long the warm pool waits after a failed launch, and how often it looks for QEMUs that died.
const WARM_RETRY: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// Child modules, so that they work on the VM entries like the lifecycle operations here do.
#[path = "guest_ops.rs"]
pub(crate) mod guest_ops;
#[path = "hotplug.rs"]
pub(crate) mod hotplug;
#[path = "live_migration.rs"]
pub(crate) mod live_migration;
#[path = "snapshot_ops.rs"]
pub(crate) mod snapshot_ops;
#[path = "stats.rs"]
pub(crate) mod stats;

/// What the daemon provides for VM resources beyond QEMU; `None` where the node has none (such VMs are refused
/// at start, naming the field).
#[derive(Default, Clone)]
pub struct Backends {
    /// NICs on node networks.
    pub network: Option<Arc<dyn NetworkBackend>>,
    /// Disks that name pool volumes.
    pub volumes: Option<Arc<dyn VolumeBackend>>,
}

/// What the manager needs from the node's configuration.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// VMs live in `<data_dir>/vms/<name>/`.
    pub data_dir: PathBuf,
    pub qemu_binary: PathBuf,
    /// Stands for `/` when looking at `/proc`, `/sys`, `/dev`.
    pub host: HostRoot,
    /// What `auto` means on this node.
    pub accel: AccelProbe,
    /// How long a graceful stop or reboot waits for the guest.
    pub stop_timeout: Duration,
    /// Shapes of pre-launched QEMUs to keep ready; empty disables the pool (no QEMU, no task).
    pub warm_pool: Vec<WarmShape>,
}

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

/// A VM as callers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmInfo {
    pub spec: VmSpec,
    /// Where each disk and NIC sits.
    pub devices: DeviceTree,
    pub state: VmState,
    pub pid: Option<i32>,
    pub started_at_unix: Option<i64>,
    pub accel: Option<Accel>,
    /// Why the VM is in its state (e.g. how QEMU exited).
    pub reason: String,
    /// The guest agent as last seen, while QEMU runs.
    pub agent: Option<crate::guest_agent::AgentStatus>,
}

/// A QEMU that runs for a VM.
struct Runtime {
    process: QemuProcess,
    qmp: QmpClient,
    console: Option<SerialConsole>,
    /// The guest agent on the VM's `qga.sock`.
    agent: GuestAgent,
    /// Set before qx-node stops QEMU, so its exit counts as a stop rather than a crash.
    stop_requested: AtomicBool,
    /// The guest powered off (SHUTDOWN event), so QEMU's exit is a stop rather than a crash.
    guest_shutdown: AtomicBool,
}

struct Status {
    spec: VmSpec,
    devices: DeviceTree,
    record: StateRecord,
    runtime: Option<Arc<Runtime>>,
}

struct Entry {
    name: String,
    dir: VmDir,
    op: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
    state_tx: watch::Sender<VmState>,
    /// Serializes writes of `state.json`; each write takes the record current at write time.
    persist: tokio::sync::Mutex<()>,
}

impl Entry {
    fn new(name: String, dir: VmDir, spec: VmSpec, devices: DeviceTree, record: StateRecord) -> Arc<Self> {
        let (state_tx, _) = watch::channel(record.state);
        Arc::new(Self {
            name,
            dir,
            op: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status { spec, devices, record, runtime: None }),
            state_tx,
            persist: tokio::sync::Mutex::new(()),
        })
    }

    fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> VmState {
        self.status().record.state
    }

    /// Sets the state in memory; returns the one before.
    fn record_state(&self, state: VmState, reason: &str) -> VmState {
        let mut status = self.status();
        let previous = status.record.state;
        status.record.state = state;
        status.record.reason = reason.to_owned();
        previous
    }

    fn runtime(&self) -> Option<Arc<Runtime>> {
        self.status().runtime.clone()
    }

    fn info(&self) -> VmInfo {
        let status = self.status();
        VmInfo {
            spec: status.spec.clone(),
            devices: status.devices.clone(),
            state: status.record.state,
            pid: status.record.pid,
            started_at_unix: status.record.started_at_unix,
            accel: status.record.accel,
            reason: status.record.reason.clone(),
            agent: status.runtime.as_ref().map(|runtime| runtime.agent.status()),
        }
    }

    fn require(&self, operation: &'static str, needs: &'static str, ok: &[VmState]) -> Result<VmState, VmError> {
        let state = self.state();
        if ok.contains(&state) {
            Ok(state)
        } else {
            Err(VmError::WrongState { name: self.name.clone(), state, operation, needs })
        }
    }

    fn qmp_error(&self, command: &'static str) -> impl FnOnce(qx_qmp::Error) -> VmError + '_ {
        move |source| VmError::Qmp { name: self.name.clone(), command, source }
    }

    async fn wait_inactive(&self, timeout: Option<Duration>) -> bool {
        let mut rx = self.state_tx.subscribe();
        let wait = rx.wait_for(|state| !state.is_active());
        match timeout {
            Some(limit) => matches!(tokio::time::timeout(limit, wait).await, Ok(Ok(_))),
            None => wait.await.is_ok(),
        }
    }
}

struct Inner {
    config: ManagerConfig,
    backends: Backends,
    vms_dir: PathBuf,
    vms: RwLock<BTreeMap<String, Arc<Entry>>>,
    /// Serializes create and delete, which change the set of VMs and their directories.
    membership: tokio::sync::Mutex<()>,
    events: broadcast::Sender<VmEvent>,
    warm: WarmPool,
    /// Machine types and CPU models of the node's QEMU, read once at open.
    caps: QemuCaps,
}

/// Every VM of the node. Cheap to clone.
#[derive(Clone)]
pub struct VmManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmManager").field("data_dir", &self.inner.config.data_dir).finish()
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn qmp_options() -> ConnectOptions {
    ConnectOptions { connect_timeout: Duration::from_secs(10), command_timeout: Duration::from_secs(30) }
}

impl VmManager {
    /// Loads every VM under the data directory and reattaches to the QEMUs that still run.
    pub async fn open(config: ManagerConfig, backends: Backends) -> std::io::Result<Self> {
        let vms_dir = config.data_dir.join("vms");
        fs::create_dir_all(&vms_dir)?;
        let (events, _) = broadcast::channel(1024);
        let warm = WarmPool::new(config.warm_pool.clone(), config.accel.accel);
        let warm_root = config.data_dir.join("warm");
        let host = config.host.clone();
        blocking(move || crate::warm::clear_stale(&warm_root, &host)).await;
        let binary = config.qemu_binary.clone();
        let caps = blocking(move || QemuCaps::probe(&binary)).await;
        let manager = Self {
            inner: Arc::new(Inner {
                config,
                backends,
                vms_dir,
                vms: RwLock::new(BTreeMap::new()),
                membership: tokio::sync::Mutex::new(()),
                events,
                warm,
                caps,
            }),
        };
        let found = {
            let vms_dir = manager.inner.vms_dir.clone();
            let caps = manager.inner.caps.clone();
            blocking(move || load_dir(&vms_dir, &caps)).await?
        };
        let reattach = found.into_iter().map(|(name, spec, devices, record)| {
            let manager = manager.clone();
            async move { manager.load_one(name, spec, devices, record).await }
        });
        futures_join_all(reattach).await;
        if manager.inner.warm.enabled() {
            let span = tracing::info_span!(parent: None, "warm_pool");
            tokio::spawn(manager.clone().refill_warm_pool().instrument(span));
        }
        Ok(manager)
    }

    async fn load_one(&self, name: String, spec: VmSpec, devices: DeviceTree, record: StateRecord) {
        let dir = VmDir::new(&self.inner.vms_dir, &name);
        let was = record.state;
        let entry = Entry::new(name.clone(), dir.clone(), spec.clone(), devices, record.clone());
        self.vms_write().insert(name.clone(), Arc::clone(&entry));
        if !was.is_active() {
            return;
        }
        if was == VmState::Incoming {
            return self.stale_incoming(&entry, record.pid).await;
        }
        if was == VmState::Migrating {
            self.migration_cut_short(&entry).await;
        }
        let span = tracing::info_span!("vm", vm = %name);
        async {
            let pid = read_pidfile(&dir.pidfile()).or(record.pid);
            let process = match pid.map(|pid| QemuProcess::adopt(pid, spec.uuid(), &self.inner.config.host)) {
                Some(Ok(Some(process))) => process,
                Some(Err(e)) => {
                    error!(error = %e, "cannot watch the QEMU of this VM");
                    self.lost(&entry, format!("QEMU could not be watched after the restart: {e}"), false).await;
                    return;
                }
                _ => {
                    info!("QEMU exited while qx-node was not running");
                    self.lost(&entry, "QEMU exited while qx-node was not running".into(), true).await;
                    return;
                }
            };
            match self.reattach(&entry, process).await {
                Ok(state) => info!(pid = ?pid, %state, "reattached to running QEMU"),
                Err(reason) => {
                    error!(%reason, "QEMU runs but cannot be driven; it is left running");
                    self.lost(&entry, reason, false).await;
                }
            }
        }
        .instrument(span)
        .await;
    }

    async fn reattach(&self, entry: &Arc<Entry>, process: QemuProcess) -> Result<VmState, String> {
        let qmp = QmpClient::connect(entry.dir.qmp_socket(), qmp_options())
            .await
            .map_err(|e| format!("QMP does not answer: {e}"))?;
        let status = qmp.query_status().await.map_err(|e| format!("query-status failed: {e}"))?;
        let state = match qmp_ops::found(&status.state) {
            Found::Keep(state) => state,
            Found::Discard(why) => {
                info!(qemu = %status.state, why, "stopping a QEMU whose guest does not run here");
                let _ = process.kill();
                process.exited().await;
                self.lost(entry, format!("QEMU was {}: {why}", status.state), true).await;
                return Ok(VmState::Stopped);
            }
        };
        // An earlier daemon may have died halfway through a reboot, which pauses on guest shutdown.
        if let Err(e) = qmp_ops::set_shutdown_action(&qmp, ShutdownAction::poweroff).await {
            warn!(error = %e, "cannot reset the shutdown action");
        }
        let console = if entry.status().spec.serial {
            Some(
                SerialConsole::attach(&entry.dir.serial_socket(), &entry.dir.console_log())
                    .await
                    .map_err(|e| format!("serial console: {e}"))?,
            )
        } else {
            None
        };
        let runtime = Arc::new(Runtime {
            process,
            qmp,
            console,
            agent: GuestAgent::new(entry.dir.qga_socket(), agent_options()),
            stop_requested: AtomicBool::new(false),
            guest_shutdown: AtomicBool::new(false),
        });
        {
            let mut status = entry.status();
            // A daemon killed between StartVm's answer and the deferred `running` write left no pid on disk.
            status.record.pid = Some(runtime.process.pid());
            status.runtime = Some(Arc::clone(&runtime));
        }
        let reason = format!("reattached after a qx-node restart (QEMU reports {})", status.state);
        self.set_state(entry, state, &reason).await;
        self.supervise(Arc::clone(entry), Arc::clone(&runtime));
        self.reconcile_devices(entry, &runtime).await;
        // The port may have opened while no daemon watched: ask the agent instead of waiting for an event.
        if state == VmState::Running {
            let probed = Arc::clone(&runtime);
            tokio::spawn(async move { probed.agent.probe_and_thaw().await }.instrument(tracing::Span::current()));
        }
        Ok(state)
    }

    /// The VM's QEMU is gone or unusable after a restart. A QEMU that still runs keeps its sockets and taps.
    async fn lost(&self, entry: &Arc<Entry>, reason: String, qemu_gone: bool) {
        if !qemu_gone {
            // `crashed` with the pid kept: start refuses while that QEMU lives (see `start`).
            self.set_state(entry, VmState::Crashed, &reason).await;
            return;
        }
        let dir = entry.dir.clone();
        blocking(move || dir.remove_runtime_files()).await;
        self.detach_networks(entry).await;
        {
            let mut status = entry.status();
            status.record.pid = None;
            status.record.started_at_unix = None;
        }
        self.set_state(entry, VmState::Stopped, &reason).await;
    }

    fn vms_read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.inner.vms.read().unwrap_or_else(|e| e.into_inner())
    }

    fn vms_write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Entry>>> {
        self.inner.vms.write().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, name: &str) -> Result<Arc<Entry>, VmError> {
        self.vms_read().get(name).cloned().ok_or_else(|| VmError::NotFound(name.to_owned()))
    }

    /// State changes of every VM from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<VmEvent> {
        self.inner.events.subscribe()
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.inner.config
    }

    /// Every VM, by name.
    pub fn list(&self) -> Vec<VmInfo> {
        self.vms_read().values().map(|entry| entry.info()).collect()
    }

    pub fn get(&self, name: &str) -> Result<VmInfo, VmError> {
        Ok(self.entry(name)?.info())
    }

    /// Defines a VM. Valid in no state: the name must be new. The VM starts out stopped.
    pub async fn create(&self, mut spec: VmSpec) -> Result<VmInfo, VmError> {
        spec = validated(spec).await?;
        let _membership = self.inner.membership.lock().await;
        if self.vms_read().contains_key(&spec.name) {
            return Err(VmError::AlreadyExists(spec.name));
        }
        spec.pin_shape(&self.inner.caps);
        spec.validate_shape(&self.inner.caps)?;
        spec.fill_device_ids();
        let devices = DeviceTree::new(&spec).map_err(|e| place_error(&spec, e))?;
        if spec.uuid.is_none() {
            if let Ok(accel) = self.resolve_accel(&spec) {
                spec.uuid = self.inner.warm.reserve(&spec, &devices, accel, &spec.name);
            }
        }
        spec.fill_generated();
        if let Some(other) = self.vms_read().values().find(|e| e.status().spec.uuid == spec.uuid) {
            return Err(
                ValidationErrors::one("uuid", spec.uuid(), format!("is already used by VM {:?}", other.name)).into()
            );
        }
        let dir = VmDir::new(&self.inner.vms_dir, &spec.name);
        let record = StateRecord::default();
        let write = {
            let (dir, spec, devices, record) = (dir.clone(), spec.clone(), devices.clone(), record.clone());
            blocking(move || create_vm_dir(&dir, &spec, &devices, &record)).await
        };
        if let Err(source) = write {
            self.inner.warm.release(&spec.name);
            return Err(VmError::Persist { name: spec.name.clone(), source });
        }
        let entry = Entry::new(spec.name.clone(), dir, spec.clone(), devices, record);
        self.vms_write().insert(spec.name.clone(), Arc::clone(&entry));
        info!(vm = %spec.name, "created");
        self.emit(&entry, Some(VmState::Stopped), None, "created");
        Ok(entry.info())
    }

    /// Replaces the spec of a VM. Valid when stopped or crashed. The uuid and generated MACs are kept; devices are
    /// matched by id (devices without one get the lowest free generated id, so an unchanged list keeps its ids),
    /// and devices the VM had keep their places.
    pub async fn update(&self, mut spec: VmSpec) -> Result<VmInfo, VmError> {
        let entry = self.entry(&spec.name)?;
        let _op = entry.op.lock().await;
        entry.require("update", "stopped", &[VmState::Stopped, VmState::Crashed])?;
        let old = entry.status().spec.clone();
        match spec.uuid {
            Some(uuid) if Some(uuid) != old.uuid => {
                return Err(ValidationErrors::one("uuid", uuid, "cannot change; it identifies the VM").into());
            }
            _ => spec.uuid = old.uuid,
        }
        // The machine shape stays pinned unless the update names another one: an alias (`q35`, what a spec
        // without `machine` says) of the family the VM is pinned in keeps the pinned version.
        let alias = matches!(spec.machine.as_str(), "q35" | "pc");
        if alias && crate::device_tree::is_pcie(&spec.machine) == crate::device_tree::is_pcie(&old.machine) {
            spec.machine = old.machine.clone();
        }
        spec.machine = self.inner.caps.pin_machine(&spec.machine);
        if spec.cpu.is_none() {
            spec.cpu = old.cpu.clone();
        }
        spec.validate_shape(&self.inner.caps)?;
        spec.fill_device_ids();
        for nic in &mut spec.nics {
            if nic.mac.is_none() {
                nic.mac = nic.id.as_deref().and_then(|id| old.nic(id)).and_then(|old_nic| old_nic.mac.clone());
            }
        }
        spec = validated(spec).await?;
        spec.fill_generated();
        let mut devices = entry.status().devices.clone();
        devices.reconcile(&spec, Growth::Allowed).map_err(|e| place_error(&spec, e))?;
        let (dir, written_spec, written_devices) = (entry.dir.clone(), spec.clone(), devices.clone());
        // The tree first: one that lists devices the spec lacks is trimmed at load, so a crash between the two
        // writes leaves the old spec with a consistent tree.
        blocking(move || {
            write_atomic(&dir.devices(), &serde_json::to_vec_pretty(&written_devices)?)?;
            write_atomic(&dir.spec(), &serde_json::to_vec_pretty(&written_spec)?)
        })
        .await
        .map_err(|source| VmError::Persist { name: entry.name.clone(), source })?;
        {
            let mut status = entry.status();
            status.spec = spec;
            status.devices = devices;
        }
        // A reserved warm QEMU may no longer fit; the next start is cold either way.
        self.inner.warm.release(&entry.name);
        info!(vm = %entry.name, "spec updated");
        Ok(entry.info())
    }

    /// Removes a VM and its directory. Valid when stopped or crashed.
    pub async fn delete(&self, name: &str) -> Result<(), VmError> {
        let entry = self.entry(name)?;
        let _membership = self.inner.membership.lock().await;
        let _op = entry.op.lock().await;
        entry.require("delete", "stopped", &[VmState::Stopped, VmState::Crashed])?;
        let dir = entry.dir.path().to_owned();
        let graveyard = self.inner.vms_dir.join(format!(".deleted-{name}-{}", entry.status().spec.uuid()));
        // Renaming first makes the delete atomic: a crash halfway leaves a hidden directory, never half a VM.
        blocking(move || {
            fs::rename(&dir, &graveyard)?;
            fs::remove_dir_all(&graveyard)
        })
        .await
        .map_err(|source| VmError::Persist { name: name.to_owned(), source })?;
        self.vms_write().remove(name);
        self.inner.warm.release(name);
        info!(vm = %name, "deleted");
        self.emit(&entry, None, Some(entry.state()), "deleted");
        Ok(())
    }

    /// Spawns QEMU and runs the guest. Valid when stopped or crashed; a failed start leaves the VM as it was.
    pub async fn start(&self, name: &str) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let previous = entry.require("start", "stopped", &[VmState::Stopped, VmState::Crashed])?;
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        // Two QEMUs on the same disks would corrupt them: never start next to one qx-node could not take back.
        let (pidfile, host, uuid) = (entry.dir.pidfile(), self.inner.config.host.clone(), spec.uuid());
        let orphan =
            blocking(move || read_pidfile(&pidfile).filter(|pid| crate::process::is_qemu_of(&host, *pid, uuid))).await;
        if let Some(pid) = orphan {
            return Err(VmError::Orphan { name: name.to_owned(), pid });
        }
        let spec = validated(spec).await?;
        let accel = self.resolve_accel(&spec)?;
        self.check_networks(&spec).await?;
        let spec = self.resolve_volumes(name, spec).await?;
        let starting = self.set_state(&entry, VmState::Starting, "start requested");
        let launched = match self.inner.warm.take(&spec, &devices, accel) {
            Some(warm) => match self.launch_warm(&entry, &spec, &devices, warm, starting).await {
                Ok(runtime) => Ok(runtime),
                Err(e) => {
                    warn!(vm = %name, error = %e, "warm start failed; starting cold");
                    // The warm attempt may have ended before `starting` was written.
                    self.set_state(&entry, VmState::Starting, "start requested").await;
                    self.launch(&entry, &spec, &devices, accel).await
                }
            },
            None => {
                starting.await;
                self.launch(&entry, &spec, &devices, accel).await
            }
        };
        match launched {
            Ok(runtime) => {
                {
                    let mut status = entry.status();
                    status.record.pid = Some(runtime.process.pid());
                    status.record.started_at_unix = Some(now_unix_ms() / 1000);
                    status.record.accel = Some(accel);
                    status.runtime = Some(Arc::clone(&runtime));
                }
                info!(vm = %name, pid = runtime.process.pid(), %accel, "started");
                self.set_state_deferred(&entry, VmState::Running, "started");
                self.supervise(Arc::clone(&entry), runtime);
                Ok(entry.info())
            }
            Err(e) => {
                warn!(vm = %name, error = %e, "start failed");
                self.set_state(&entry, previous, &format!("start failed: {e}")).await;
                Err(e)
            }
        }
    }

    /// `spec` with every volume disk given its file and format; refuses missing volumes and volumes a running VM
    /// writes to (or that this one would write to while another runs), naming the disk.
    async fn resolve_volumes(&self, name: &str, mut spec: VmSpec) -> Result<VmSpec, VmError> {
        let mut problems = Vec::new();
        let mut in_use = Vec::new();
        for i in 0..spec.disks.len() {
            let Some(volume) = spec.disks[i].volume.clone() else { continue };
            let field = format!("disks[{i}].volume");
            let read_only = spec.disks[i].read_only;
            let users: Vec<String> = self
                .vms_read()
                .values()
                .filter(|other| other.name != name && other.state().is_active())
                .filter(|other| {
                    let status = other.status();
                    let disks = &status.spec.disks;
                    disks.iter().any(|d| d.volume.as_ref() == Some(&volume) && !(d.read_only && read_only))
                })
                .map(|other| other.name.clone())
                .collect();
            if !users.is_empty() {
                in_use.push((field, volume, format!("is in use by running VM {}", users.join(", "))));
                continue;
            }
            let Some(backend) = &self.inner.backends.volumes else {
                problems.push((field, volume, "cannot be used: this node has no storage pools".to_owned()));
                continue;
            };
            match backend.resolve(&volume).await {
                Ok((path, format)) => {
                    spec.disks[i].path = Some(path);
                    spec.disks[i].format = format;
                }
                Err(problem) => problems.push((field, volume, problem)),
            }
        }
        let errors = |list: Vec<(String, String, String)>| {
            let list =
                list.into_iter().map(|(field, value, problem)| crate::spec::FieldError { field, value, problem });
            ValidationErrors(list.collect())
        };
        if !problems.is_empty() {
            return Err(errors(problems).into());
        }
        if !in_use.is_empty() {
            return Err(VmError::VolumesInUse(errors(in_use)));
        }
        Ok(spec)
    }

    /// Refuses, before anything is created, a VM whose networks are missing or unreachable.
    async fn check_networks(&self, spec: &VmSpec) -> Result<(), VmError> {
        let Some(first) = network_nics(spec).next() else { return Ok(()) };
        match &self.inner.backends.network {
            Some(backend) => backend.check(spec).await.map_err(VmError::from),
            None => {
                let network = spec.nics[first].network.clone().unwrap_or_default();
                let field = format!("nics[{first}].network");
                Err(ValidationErrors::one(field, network, "cannot be attached: this node has no switch configured")
                    .into())
            }
        }
    }

    /// Plugs NIC `nic` into QEMU: the backend's tap fds over `getfd`, a tap netdev, then the device.
    async fn plug_network_nic(&self, qmp: &QmpClient, spec: &VmSpec, nic: &NetworkNic) -> Result<(), String> {
        let backend = self.inner.backends.network.as_ref().ok_or("no network backend")?;
        let fds = backend.attach(spec, &nic.slot).await?;
        let mut names = Vec::with_capacity(fds.len());
        for (queue, fd) in fds.iter().enumerate() {
            let name = format!("{}-q{queue}", nic.slot.netdev);
            qmp.getfd(&name, std::os::fd::AsFd::as_fd(fd)).await.map_err(|e| format!("getfd {name}: {e}"))?;
            names.push(name);
        }
        let netdev = qmp_ops::tap_netdev(&nic.slot.netdev, &names);
        qmp_ops::netdev_add(qmp, &netdev).await.map_err(|e| format!("netdev_add {}: {e}", nic.slot.netdev))?;
        qmp_ops::device_add(qmp, &nic.device).await.map_err(|e| format!("device_add {}: {e}", nic.device.id))?;
        Ok(())
    }

    /// Removes the host side of every network NIC of the VM; idempotent.
    async fn detach_networks(&self, entry: &Entry) {
        let Some(backend) = &self.inner.backends.network else { return };
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        for slot in &devices.nics {
            if spec.nic(&slot.id).is_some_and(|nic| nic.kind == crate::spec::NicKind::Network) {
                backend.detach(&spec, slot).await;
            }
        }
    }

    fn resolve_accel(&self, spec: &VmSpec) -> Result<Accel, VmError> {
        let probe = &self.inner.config.accel;
        let accel = self.accel_choice(spec)?;
        if spec.cpu.as_deref() == Some(HOST_CPU) && accel != Accel::Kvm {
            let problem =
                format!("needs KVM (the host CPU passed through), and this VM runs under {accel}: {}", probe.reason);
            return Err(ValidationErrors::one("cpu", HOST_CPU, problem).into());
        }
        Ok(accel)
    }

    fn accel_choice(&self, spec: &VmSpec) -> Result<Accel, VmError> {
        let probe = &self.inner.config.accel;
        match spec.accelerator {
            AccelChoice::Auto => Ok(probe.accel),
            AccelChoice::Tcg => Ok(Accel::Tcg),
            AccelChoice::Kvm if probe.accel == Accel::Kvm => Ok(Accel::Kvm),
            AccelChoice::Kvm => Err(ValidationErrors::one(
                "accelerator",
                "kvm",
                format!("is not usable on this node: {}", probe.reason),
            )
            .into()),
        }
    }

    /// Cold start: a new QEMU with the VM's disks and NICs on its command line.
    async fn launch(
        &self,
        entry: &Arc<Entry>,
        spec: &VmSpec,
        devices: &DeviceTree,
        accel: Accel,
    ) -> Result<Arc<Runtime>, VmError> {
        let dir = entry.dir.clone();
        let start_error = |stage: &'static str| {
            let name = entry.name.clone();
            move |source: BoxError| VmError::Start { name, stage, log: String::new(), source }
        };
        let seed = write_seed(&dir, spec).await.map_err(start_error("writing the cloud-init seed"))?;
        let qemu = self.spawn_qemu(&dir, spec, devices, accel, seed, false, false).await.map_err(|failure| {
            let (stage, log, source) = failure;
            VmError::Start { name: entry.name.clone(), stage, log, source }
        })?;
        let ready = std::future::ready(Ok(()));
        self.run_guest(entry, (spec, devices), qemu, &dir.serial_socket(), false, ready).await
    }

    /// Warm start: the VM takes a pre-launched QEMU. Its devices are plugged while `starting` is written (the
    /// disk write is off the critical path); only once that is on disk do the QEMU's sockets, pidfile and log move
    /// into the VM's directory, so a daemon that dies halfway either finds the QEMU there (and adopts it) or
    /// finds it still in the pool's directory (and stops it at start).
    async fn launch_warm(
        &self,
        entry: &Arc<Entry>,
        spec: &VmSpec,
        devices: &DeviceTree,
        warm: Warm,
        starting: impl std::future::Future<Output = ()>,
    ) -> Result<Arc<Runtime>, VmError> {
        let (from, to) = (warm.dir.clone(), entry.dir.clone());
        let rotated = {
            let to = to.clone();
            blocking(move || {
                to.remove_runtime_files();
                rotate_console_log(&to)
            })
            .await
        };
        if let Err(source) = rotated {
            crate::warm::discard(warm);
            let (name, stage, log) = (entry.name.clone(), "taking a warm QEMU", String::new());
            return Err(VmError::Start { name, stage, log, source: source.into() });
        }
        let moved = {
            let from = from.clone();
            async move {
                starting.await;
                blocking(move || -> std::io::Result<()> {
                    for (a, b) in [
                        (from.qmp_socket(), to.qmp_socket()),
                        (from.serial_socket(), to.serial_socket()),
                        (from.qga_socket(), to.qga_socket()),
                        (from.pidfile(), to.pidfile()),
                        (from.qemu_log(), to.qemu_log()),
                    ] {
                        fs::rename(a, b)?;
                    }
                    fs::remove_dir_all(from.path())
                })
                .await
                .map_err(BoxError::from)
            }
        };
        let serial = from.serial_socket();
        let started = self.run_guest(entry, (spec, devices), (warm.process, warm.qmp), &serial, true, moved).await;
        if started.is_err() {
            let _ = blocking(move || fs::remove_dir_all(from.path())).await;
        }
        started
    }

    /// Binds the sockets in `dir`, spawns QEMU and negotiates QMP. On failure QEMU is gone and the error carries
    /// the stage, the tail of QEMU's log and the cause. `incoming`: QEMU waits for a live migration's stream
    /// (`-incoming defer`, then `migrate-incoming`).
    #[allow(clippy::too_many_arguments)]
    async fn spawn_qemu(
        &self,
        dir: &VmDir,
        spec: &VmSpec,
        devices: &DeviceTree,
        accel: Accel,
        seed: Option<PathBuf>,
        hotplug: bool,
        incoming: bool,
    ) -> Result<(QemuProcess, QmpClient), (&'static str, String, BoxError)> {
        let uefi = {
            let (host, dir, spec) = (self.inner.config.host.clone(), dir.clone(), spec.clone());
            blocking(move || crate::firmware::uefi_args(&host, &dir, &spec)).await
        };
        let uefi = uefi.map_err(|e| ("preparing the UEFI firmware", String::new(), e.into()))?;
        let serial = spec.serial;
        let prepared = {
            let dir = dir.clone();
            blocking(move || prepare_sockets(&dir, serial)).await
        };
        let (fds, log) = prepared.map_err(|e| ("preparing sockets", String::new(), e.into()))?;
        let serial_fd = serial.then_some(SERIAL_FD);
        let pidfile = dir.pidfile();
        let layout = LaunchLayout { qmp_fd: QMP_FD, serial_fd, qga_fd: QGA_FD, pidfile, seed, hotplug, uefi };
        let mut args = qemu_args(spec, devices, accel, &layout);
        if incoming {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        debug!(vm = %spec.name, ?args, "spawning QEMU");
        let process = QemuProcess::spawn(&self.inner.config.qemu_binary, &args, fds, log)
            .map_err(|e: ProcessError| ("spawning QEMU", String::new(), e.into()))?;
        let qmp = tokio::select! {
            qmp = QmpClient::connect(dir.qmp_socket(), qmp_options()) => qmp.map_err(|e| ("QMP handshake", e.into())),
            how = process.exited() => {
                let how = how.unwrap_or_else(|| "exited".into());
                Err(("QEMU startup", format!("QEMU {how} before answering QMP").into()))
            }
        };
        match qmp {
            Ok(qmp) => Ok((process, qmp)),
            Err((stage, source)) => {
                let _ = process.kill();
                process.exited().await;
                let dir = dir.clone();
                let log = blocking(move || {
                    dir.remove_runtime_files();
                    String::from_utf8_lossy(&read_tail(&dir.qemu_log(), START_LOG_TAIL)).trim().to_owned()
                })
                .await;
                Err((stage, log, source))
            }
        }
    }

    /// Takes a QEMU that waits before its first instruction to a running guest: the console, the devices QEMU
    /// was not launched with (`hotplug`: disks and user NICs; always: network NICs), then `cont`. On failure QEMU
    /// is stopped and the VM's runtime files and taps are gone.
    ///
    /// `alongside` runs while the devices are plugged and must succeed before `cont`; `serial` is the serial
    /// socket to attach the console to (logged to the VM's `console.log`).
    async fn run_guest(
        &self,
        entry: &Arc<Entry>,
        (spec, devices): (&VmSpec, &DeviceTree),
        (process, qmp): (QemuProcess, QmpClient),
        serial: &Path,
        hotplug: bool,
        alongside: impl std::future::Future<Output = Result<(), BoxError>>,
    ) -> Result<Arc<Runtime>, VmError> {
        let dir = entry.dir.clone();
        let plugged = async {
            let console = if spec.serial {
                let console = SerialConsole::attach(serial, &dir.console_log()).await;
                Some(console.map_err(|e: ConsoleError| ("serial console", e.into()))?)
            } else {
                None
            };
            let hw = Hardware::from_spec(spec, devices, None);
            if hotplug {
                for plug in hw.disks.iter().chain(&hw.user_nics) {
                    plug_device(&qmp, plug).await.map_err(|e| ("plugging disks and NICs", e.into()))?;
                }
            }
            for nic in &hw.network_nics {
                self.plug_network_nic(&qmp, spec, nic).await.map_err(|e| ("plugging a network NIC", e.into()))?;
            }
            if hotplug && spec.kernel.is_none() {
                // The firmware reads the boot order from fw_cfg, which QEMU rebuilds from the plugged devices'
                // bootindex at reset; the guest has not run yet, so this reset is invisible to it.
                qmp_ops::simple(&qmp, Simple::SystemReset, None)
                    .await
                    .map_err(|e| ("updating the boot order", e.into()))?;
            }
            Ok::<_, (&'static str, BoxError)>(console)
        };
        let prepared = async {
            let (console, alongside) = tokio::join!(plugged, alongside);
            let console = console?;
            alongside.map_err(|e| ("taking a warm QEMU", e))?;
            qmp_ops::simple(&qmp, Simple::Cont, None).await.map_err(|e| ("resuming vCPUs", e.into()))?;
            Ok::<_, (&'static str, BoxError)>(console)
        };
        match prepared.await {
            Ok(console) => Ok(Arc::new(Runtime {
                process,
                qmp,
                console,
                agent: GuestAgent::new(entry.dir.qga_socket(), agent_options()),
                stop_requested: AtomicBool::new(false),
                guest_shutdown: AtomicBool::new(false),
            })),
            Err((stage, source)) => {
                let _ = process.kill();
                process.exited().await;
                self.detach_networks(entry).await;
                let log_path = dir.qemu_log();
                let log = blocking(move || {
                    dir.remove_runtime_files();
                    String::from_utf8_lossy(&read_tail(&log_path, START_LOG_TAIL)).trim().to_owned()
                })
                .await;
                Err(VmError::Start { name: entry.name.clone(), stage, log, source })
            }
        }
    }

    /// Keeps the warm pool at its configured size, one QEMU at a time, for the life of the manager.
    async fn refill_warm_pool(self) {
        let pool = &self.inner.warm;
        let (Some(accel), root) = (pool.accel, self.inner.config.data_dir.join("warm")) else { return };
        loop {
            while let Some(shape) = pool.wanting() {
                let uuid = Uuid::new_v4();
                let mut spec = pool.shapes[shape].spec(uuid);
                spec.pin_shape(&self.inner.caps);
                let devices = DeviceTree::new(&spec).expect("a warm shape has no devices to place");
                let dir = VmDir::new(&root, &uuid.to_string());
                if let Err(e) = blocking({
                    let path = dir.path().to_owned();
                    move || fs::create_dir_all(path)
                })
                .await
                {
                    warn!(error = %e, "cannot create a warm-pool directory; retrying later");
                    tokio::time::sleep(WARM_RETRY).await;
                    continue;
                }
                match self.spawn_qemu(&dir, &spec, &devices, accel, None, true, false).await {
                    Ok((process, qmp)) => {
                        debug!(shape, pid = process.pid(), "warm QEMU ready");
                        let key = launch_key(&spec, &devices, accel);
                        pool.add(Warm { shape, uuid, dir, process, qmp, key, reserved_for: None });
                    }
                    Err((stage, log, source)) => {
                        warn!(shape, stage, %log, error = %source, "cannot launch a warm QEMU; retrying later");
                        let _ = blocking(move || fs::remove_dir_all(dir.path())).await;
                        tokio::time::sleep(WARM_RETRY).await;
                    }
                }
            }
            // Woken when a QEMU is taken or reserved; the timeout notices QEMUs that died.
            let _ = tokio::time::timeout(WARM_RETRY, pool.wake.notified()).await;
        }
    }

    /// Stops the warm pool's idle QEMUs (VMs keep running); for a daemon that exits.
    pub async fn drain_warm_pool(&self) {
        self.inner.warm.drain().await;
    }

    /// Ready and reserved QEMUs in the warm pool.
    pub fn warm_pool_counts(&self) -> (usize, usize) {
        self.inner.warm.counts()
    }

    /// Watches one QEMU until it exits: follows pause/resume done behind our back and records how it ended.
    fn supervise(&self, entry: Arc<Entry>, runtime: Arc<Runtime>) {
        let manager = self.clone();
        // A root span: the supervisor outlives the request that started the VM.
        let span = tracing::info_span!(parent: None, "vm", vm = %entry.name);
        tokio::spawn(
            async move {
                let mut events = runtime.qmp.subscribe();
                let exited = runtime.process.exited();
                tokio::pin!(exited);
                let how = loop {
                    tokio::select! {
                        how = &mut exited => break how,
                        event = events.recv() => match event {
                            Ok(Event::Qemu(event)) => {
                                manager.on_device_event(&entry, &runtime, &event);
                                manager.on_qmp_event(&entry, &runtime, event.typed()).await
                            }
                            Ok(Event::Closed { .. }) | Err(broadcast::error::RecvError::Closed) => {
                                // QMP is gone; only the process exit is left to wait for.
                                break (&mut exited).await;
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => {}
                        },
                    }
                };
                manager.on_exit(&entry, &runtime, how).await;
            }
            .instrument(span),
        );
    }

    async fn on_qmp_event(&self, entry: &Arc<Entry>, runtime: &Arc<Runtime>, event: QemuEvent) {
        match event {
            QemuEvent::Shutdown { .. } => runtime.guest_shutdown.store(true, Ordering::SeqCst),
            QemuEvent::VserportChange { id, open } if id == AGENT_PORT_ID => {
                if open {
                    // qemu-ga opened its port; its version comes with the first answer. Not awaited here: the
                    // supervisor must not wait for a guest.
                    let runtime = Arc::clone(runtime);
                    tokio::spawn(async move { runtime.agent.probe().await }.instrument(tracing::Span::current()));
                } else {
                    runtime.agent.port_closed();
                }
            }
            // Pause and resume that qx-node did not ask for (monitor, I/O error, watchdog). Operations in progress
            // set the state themselves, and events may arrive after them, so ask QEMU for the truth.
            QemuEvent::Stop | QemuEvent::Resume => {
                let Ok(_idle) = entry.op.try_lock() else {
                    return;
                };
                if !matches!(entry.state(), VmState::Running | VmState::Paused) {
                    return;
                }
                let Ok(status) = runtime.qmp.query_status().await else {
                    return;
                };
                let state = if status.state.is_running() { VmState::Running } else { VmState::Paused };
                self.set_state(entry, state, &format!("QEMU reports {}", status.state)).await;
            }
            _ => {}
        }
    }

    async fn on_exit(&self, entry: &Arc<Entry>, runtime: &Arc<Runtime>, how: Option<String>) {
        let how = how.unwrap_or_else(|| "exited".to_owned());
        if entry.state() == VmState::Incoming {
            // The source still owns the VM: this node's copy goes with its QEMU.
            return self.incoming_ended(entry, &format!("the incoming QEMU {how}")).await;
        }
        let (state, reason) = if runtime.guest_shutdown.load(Ordering::SeqCst) {
            (VmState::Stopped, "the guest powered off".to_owned())
        } else if runtime.stop_requested.load(Ordering::SeqCst) {
            (VmState::Stopped, format!("stopped: QEMU {how}"))
        } else {
            error!(%how, "QEMU exited unexpectedly");
            (VmState::Crashed, format!("QEMU {how} unexpectedly"))
        };
        let dir = entry.dir.clone();
        blocking(move || dir.remove_runtime_files()).await;
        self.detach_networks(entry).await;
        {
            let mut status = entry.status();
            if status.runtime.as_ref().is_some_and(|r| Arc::ptr_eq(r, runtime)) {
                status.runtime = None;
            }
            status.record.pid = None;
            status.record.started_at_unix = None;
        }
        info!(%state, %how, "QEMU exited");
        self.set_state(entry, state, &reason).await;
    }

    /// Stops a VM. Valid when running or paused. Graceful: the ACPI power button (skipped when paused, since a
    /// paused guest cannot answer it), `timeout` for the guest to power off, then QMP `quit`, then SIGKILL.
    /// Force: SIGKILL at once; valid in any state with a QEMU, including during a graceful stop.
    pub async fn stop(&self, name: &str, force: bool, timeout: Option<Duration>) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        if force {
            let runtime = entry.runtime().ok_or_else(|| VmError::WrongState {
                name: name.to_owned(),
                state: entry.state(),
                operation: "force stop",
                needs: "running, paused or stopping",
            })?;
            runtime.stop_requested.store(true, Ordering::SeqCst);
            if matches!(entry.state(), VmState::Running | VmState::Paused) {
                self.set_state(&entry, VmState::Stopping, "force stop requested").await;
            }
            kill(&runtime);
            entry.wait_inactive(None).await;
            return Ok(entry.info());
        }

        let _op = entry.op.lock().await;
        let state = entry.require("stop", "running or paused", &[VmState::Running, VmState::Paused])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        runtime.stop_requested.store(true, Ordering::SeqCst);
        self.set_state(&entry, VmState::Stopping, "stop requested").await;
        let timeout = timeout.unwrap_or(self.inner.config.stop_timeout);
        let mut stopped = false;
        if state == VmState::Running {
            match qmp_ops::simple(&runtime.qmp, Simple::SystemPowerdown, None).await {
                Ok(_) => stopped = entry.wait_inactive(Some(timeout)).await,
                Err(e) => warn!(vm = %name, error = %e, "system_powerdown failed"),
            }
            if !stopped {
                info!(vm = %name, ?timeout, "guest did not power off; quitting QEMU");
            }
        }
        if !stopped {
            let _ = qmp_ops::simple(&runtime.qmp, Simple::Quit, Some(QUIT_GRACE)).await;
            stopped = entry.wait_inactive(Some(QUIT_GRACE)).await;
        }
        if !stopped {
            warn!(vm = %name, "QEMU ignored quit; killing it");
            kill(&runtime);
            entry.wait_inactive(None).await;
        }
        Ok(entry.info())
    }

    /// Reboots with the guest's cooperation: the power button with QEMU told to pause instead of exiting, then a
    /// reset and resume. A guest that ignores the button for the stop timeout is reset instead. Valid when running.
    pub async fn reboot(&self, name: &str) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        entry.require("reboot", "running", &[VmState::Running])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        let qmp = &runtime.qmp;
        let mut events = qmp.subscribe();
        qmp_ops::set_shutdown_action(qmp, ShutdownAction::pause).await.map_err(entry.qmp_error("set-action"))?;
        let powered_off = async {
            qmp_ops::simple(qmp, Simple::SystemPowerdown, None).await.ok()?;
            loop {
                match events.recv().await {
                    Ok(Event::Qemu(event)) if matches!(event.typed(), QemuEvent::Shutdown { .. }) => return Some(()),
                    Ok(Event::Closed { .. }) | Err(broadcast::error::RecvError::Closed) => return None,
                    _ => {}
                }
            }
        };
        let cooperative =
            matches!(tokio::time::timeout(self.inner.config.stop_timeout, powered_off).await, Ok(Some(())));
        let restore = qmp_ops::set_shutdown_action(qmp, ShutdownAction::poweroff).await;
        qmp_ops::simple(qmp, Simple::SystemReset, None).await.map_err(entry.qmp_error("system_reset"))?;
        if cooperative {
            qmp_ops::simple(qmp, Simple::Cont, None).await.map_err(entry.qmp_error("cont"))?;
        }
        // The SHUTDOWN of the reboot must not make a later crash look like a power-off.
        runtime.guest_shutdown.store(false, Ordering::SeqCst);
        restore.map_err(entry.qmp_error("set-action"))?;
        let reason = if cooperative { "rebooted" } else { "reset: the guest ignored the power button" };
        info!(vm = %name, reason, "reboot");
        self.emit(&entry, Some(VmState::Running), Some(VmState::Running), reason);
        Ok(entry.info())
    }

    /// Hard reset, like the reset button. Valid when running or paused; the state is kept.
    pub async fn reset(&self, name: &str) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let state = entry.require("reset", "running or paused", &[VmState::Running, VmState::Paused])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        qmp_ops::simple(&runtime.qmp, Simple::SystemReset, None).await.map_err(entry.qmp_error("system_reset"))?;
        self.emit(&entry, Some(state), Some(state), "reset");
        Ok(entry.info())
    }

    /// Stops the vCPUs. Valid when running.
    pub async fn pause(&self, name: &str) -> Result<VmInfo, VmError> {
        self.vcpus(name, "pause", VmState::Running, Simple::Stop, VmState::Paused).await
    }

    /// Restarts the vCPUs. Valid when paused.
    pub async fn resume(&self, name: &str) -> Result<VmInfo, VmError> {
        self.vcpus(name, "resume", VmState::Paused, Simple::Cont, VmState::Running).await
    }

    async fn vcpus(
        &self,
        name: &str,
        operation: &'static str,
        from: VmState,
        command: Simple,
        to: VmState,
    ) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        let needs = if from == VmState::Running { "running" } else { "paused" };
        entry.require(operation, needs, &[from])?;
        let Some(runtime) = entry.runtime() else {
            return Ok(entry.info());
        };
        qmp_ops::simple(&runtime.qmp, command, None).await.map_err(entry.qmp_error(command.name()))?;
        self.set_state(&entry, to, &format!("{operation}d")).await;
        Ok(entry.info())
    }

    /// The serial console of a VM whose QEMU runs.
    pub fn console(&self, name: &str) -> Result<SerialConsole, VmError> {
        let entry = self.entry(name)?;
        let runtime = entry.runtime().ok_or_else(|| VmError::WrongState {
            name: name.to_owned(),
            state: entry.state(),
            operation: "console",
            needs: "running or paused",
        })?;
        runtime.console.clone().ok_or_else(|| VmError::NoConsole { name: name.to_owned() })
    }

    /// Records a new state: memory first, then `state.json`, then an event, then the waiters.
    async fn set_state(&self, entry: &Arc<Entry>, state: VmState, reason: &str) {
        let previous = entry.record_state(state, reason);
        self.persist_state(entry).await;
        self.announce(entry, previous, state, reason);
    }

    /// Like `set_state`, with `state.json` written in the background. Only for `running` at the end of a start:
    /// `starting`, written before QEMU was spawned, already makes a restarted daemon look for the QEMU (through
    /// its pidfile), so the caller need not wait for the disk. Writes stay in order (`Entry::persist`).
    fn set_state_deferred(&self, entry: &Arc<Entry>, state: VmState, reason: &str) {
        let previous = entry.record_state(state, reason);
        let (manager, written) = (self.clone(), Arc::clone(entry));
        tokio::spawn(async move { manager.persist_state(&written).await });
        self.announce(entry, previous, state, reason);
    }

    fn announce(&self, entry: &Arc<Entry>, previous: VmState, state: VmState, reason: &str) {
        if previous != state {
            info!(vm = %entry.name, from = %previous, to = %state, reason, "state");
            self.emit(entry, Some(state), Some(previous), reason);
        }
        // Waiters (a stop waiting for the exit) go on only once the state is announced (and, but for
        // `set_state_deferred`, on disk).
        entry.state_tx.send_replace(state);
    }

    async fn persist_state(&self, entry: &Arc<Entry>) {
        let _serial = entry.persist.lock().await;
        let record = entry.status().record.clone();
        let path = entry.dir.state();
        let json = serde_json::to_vec_pretty(&record).expect("a StateRecord always serializes");
        if let Err(e) = blocking(move || write_atomic(&path, &json)).await {
            error!(vm = %entry.name, error = %e, "cannot write state.json; the state is kept in memory");
        }
    }

    fn emit(&self, entry: &Entry, state: Option<VmState>, previous: Option<VmState>, reason: &str) {
        let _ = self.inner.events.send(VmEvent {
            vm: entry.name.clone(),
            state,
            previous,
            reason: reason.to_owned(),
            at_unix_ms: now_unix_ms(),
        });
    }
}

fn kill(runtime: &Runtime) {
    if let Err(e) = runtime.process.kill() {
        error!(pid = runtime.process.pid(), error = %e, "cannot kill QEMU");
    }
}

/// Writes the cloud-init seed of `spec` into `dir` when it has one.
async fn write_seed(dir: &VmDir, spec: &VmSpec) -> Result<Option<PathBuf>, BoxError> {
    let Some(config) = spec.seed_config() else { return Ok(None) };
    let path = dir.seed_image();
    qx_storage::cloudinit::write_seed(&config, &path).await?;
    Ok(Some(path))
}

/// Validates off the runtime threads (image checks touch the filesystem).
async fn validated(spec: VmSpec) -> Result<VmSpec, VmError> {
    blocking(move || spec.validate(&RealFiles).map(|()| spec)).await.map_err(VmError::from)
}

/// A device the tree cannot place, as a field error on the device.
fn place_error(spec: &VmSpec, error: crate::device_tree::PlaceError) -> VmError {
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

fn create_vm_dir(dir: &VmDir, spec: &VmSpec, devices: &DeviceTree, record: &StateRecord) -> std::io::Result<()> {
    fs::create_dir(dir.path())?;
    let written = (|| {
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        write_atomic(&dir.state(), &serde_json::to_vec_pretty(record)?)?;
        write_atomic(&dir.devices(), &serde_json::to_vec_pretty(devices)?)?;
        write_atomic(&dir.spec(), &serde_json::to_vec_pretty(spec)?)
    })();
    if written.is_err() {
        let _ = fs::remove_dir_all(dir.path());
    }
    written
}

/// Binds the QMP and serial sockets QEMU will serve (so they exist before QEMU runs, and connecting needs no
/// polling), opens `qemu.log`, and rotates `console.log`.
/// Each run starts a fresh console log, so console history shows this boot; the last run's stays as `.1`.
fn rotate_console_log(dir: &VmDir) -> std::io::Result<()> {
    let console_log = dir.console_log();
    if console_log.exists() {
        fs::rename(&console_log, console_log.with_extension("log.1"))?;
    }
    Ok(())
}

fn prepare_sockets(dir: &VmDir, serial: bool) -> std::io::Result<(Vec<(OwnedFd, i32)>, fs::File)> {
    dir.remove_runtime_files();
    rotate_console_log(dir)?;
    let bind = |path: &Path| -> std::io::Result<OwnedFd> {
        let listener = UnixListener::bind(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
        Ok(listener.into())
    };
    let mut fds = vec![(bind(&dir.qmp_socket())?, QMP_FD)];
    if serial {
        fds.push((bind(&dir.serial_socket())?, SERIAL_FD));
    }
    fds.push((bind(&dir.qga_socket())?, QGA_FD));
    let log = OpenOptions::new().create(true).write(true).truncate(true).open(dir.qemu_log())?;
    Ok((fds, log))
}

/// Reads every VM directory; unreadable ones are logged and skipped, never touched.
fn load_dir(vms_dir: &Path, caps: &QemuCaps) -> std::io::Result<Vec<(String, VmSpec, DeviceTree, StateRecord)>> {
    let mut found = Vec::new();
    for dirent in fs::read_dir(vms_dir)? {
        let dirent = dirent?;
        let name = dirent.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            if name.starts_with(".deleted-") {
                let _ = fs::remove_dir_all(dirent.path());
            }
            continue;
        }
        let dir = VmDir::new(vms_dir, &name);
        let mut spec: VmSpec = match fs::read(dir.spec())
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
        {
            Ok(spec) => spec,
            Err(e) => {
                error!(path = %dir.spec().display(), error = %e, "cannot read VM spec; skipping this VM");
                continue;
            }
        };
        if spec.name != name {
            error!(path = %dir.spec().display(), spec_name = %spec.name, "spec name differs from its directory; skipping");
            continue;
        }
        let record = match fs::read(dir.state()) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(vm = %name, error = %e, "unreadable state.json; assuming it was running");
                StateRecord { state: VmState::Running, ..StateRecord::default() }
            }),
            Err(_) => StateRecord::default(),
        };
        // VMs created before machine types were pinned: `q35` meant what it means on this QEMU (its CPU model stays
        // unpinned, as it was).
        let machine = caps.pin_machine(&spec.machine);
        let devices = match crate::persist::load_devices(&dir, &mut spec, machine) {
            Ok(devices) => devices,
            Err(e) => {
                error!(vm = %name, error = %e, "cannot read or upgrade the VM's device tree; skipping this VM");
                continue;
            }
        };
        found.push((name, spec, devices, record));
    }
    Ok(found)
}

/// Runs futures concurrently and waits for all (reattaching VMs one by one would make restart time grow with
/// their number).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(futures: impl Iterator<Item = F>) {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for handle in handles {
        let _ = handle.await;
    }
}
