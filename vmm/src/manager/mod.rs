//! `VmManager`: every VM on the node, their lifecycle operations, and the supervisor task of each running QEMU.
//!
//! Each VM has an operation lock, so its operations run one at a time, and a status behind a short-lived mutex that
//! is never held across an await; different VMs never wait on each other. Force stop alone skips the operation lock,
//! so that it can cut short a graceful stop that hangs.
//!
//! This file holds the registry: the VM entries, their persisted files, and how a state change is recorded and
//! announced. The rest is split by concern, each an `impl VmManager` block working on the same entries:
//! - `launch.rs`: start (cold and warm, running or paused), the QEMU spawn, the warm pool's refill;
//! - `supervise.rs`: reattach after a restart, the per-QEMU watch task, exits;
//! - `operations.rs`: create, update, delete, stop, reboot, reset, pause, resume, console;
//! - `resize.rs`: a running VM's disk grown online (`block_resize`);
//! - `hotplug.rs`, `snapshot_ops.rs`, `guest_ops.rs`, `live_migration.rs`, `stats.rs`: the live operations;
//! - `error.rs`: [`VmError`].

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qx_common::blocking;
use qx_qmp::{ConnectOptions, QmpClient};
use tokio::sync::{broadcast, watch};
use tracing::{error, info, warn, Instrument};

use crate::accel::{Accel, AccelProbe};
use crate::console::SerialConsole;
use crate::device_tree::DeviceTree;
use crate::guest_agent::GuestAgent;
use crate::host::HostRoot;
use crate::machine::QemuCaps;
use crate::network::NetworkBackend;
use crate::persist::{write_atomic, StateRecord, VmDir};
use crate::process::QemuProcess;
use crate::spec::{RealFiles, VmSpec};
use crate::state::{VmEvent, VmState};
use crate::volumes::VolumeBackend;
use crate::warm::{WarmPool, WarmShape};

mod error;
mod launch;
mod operations;
mod resize;
mod supervise;

pub(crate) mod guest_ops;
pub(crate) mod hotplug;
pub(crate) mod live_migration;
pub(crate) mod snapshot_ops;
pub(crate) mod stats;

pub use error::VmError;
pub use launch::StartOptions;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// Validates off the runtime threads (image checks touch the filesystem).
async fn validated(spec: VmSpec) -> Result<VmSpec, VmError> {
    blocking(move || spec.validate(&RealFiles).map(|()| spec)).await.map_err(VmError::from)
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
