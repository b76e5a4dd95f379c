//! Live migration of a VM between nodes, as VM operations: the source side ([`VmManager::migrate_to`]) and the
//! target side ([`VmManager::prepare_incoming`], [`VmManager::finish_incoming`], [`VmManager::abort_incoming`]).
//! The QMP driver is [`crate::migration`]; how the source reaches the target (gRPC between daemons) is the
//! caller's, behind [`IncomingPeer`].
//!
//! The protocol, and who owns the VM at each step:
//! 1. Source: `running → migrating` (persisted), under the VM's operation lock for the whole migration.
//! 2. Target (`prepare`): checks it can host the VM, creates it as `incoming` (persisted) with the source's spec
//!    and device tree, starts QEMU with `-incoming defer -S`, plugs the network NICs (their switch ports exist on
//!    the target before the switch-over), `migrate-incoming tcp:HOST:0`, and answers the port.
//! 3. Source: `migrate` to it, progress and the policy of [`crate::migration::migrate_out`]; a cancel (the
//!    caller's `cancel` turning true) during precopy sends `migrate_cancel`.
//! 4. Source, once QEMU says `completed` (the source is in `postmigrate`): `finish` on the target, which waits
//!    for its QEMU to confirm, sends `cont` and answers once the guest runs there (QEMU announces the NICs' MACs
//!    itself after an incoming migration). Only then does the source quit its QEMU, remove its switch ports and
//!    its copy of the VM.
//!
//! The source owns the VM until `finish` answered. So: a cancel or failure before it aborts the target (its VM
//! and files go) and resumes the source (`cont` when it had reached `postmigrate`); an incoming QEMU that ends
//! while `incoming` takes its VM with it; a target daemon restarted while a VM is `incoming` removes it (and its
//! QEMU). When `finish` goes unanswered the source asks the target to abort, for up to 30 s: dropped (or never
//! there) resumes the source, refused (the VM is no longer incoming there: it runs) removes the source's copy, and
//! no answer leaves the source paused in `postmigrate`, saying so: a guest must never run on two nodes.

use std::fs;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use qx_common::{blocking, BoxFuture};
use qx_qmp::RunState;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::launch::write_seed;
use super::operations::{kill, QUIT_GRACE};
use super::{create_vm_dir, now_unix_ms, validated, BoxError, Entry, Runtime, VmError, VmInfo, VmManager};
use crate::device_tree::DeviceTree;
use crate::guest_agent::{agent_options, GuestAgent};
use crate::migration::{self, MigrationConfig, MigrationError, Outcome, Progress};
use crate::persist::{StateRecord, VmDir};
use crate::process::QemuProcess;
use crate::qmp_ops::{self, Simple};
use crate::spec::{ValidationErrors, VmSpec};
use crate::state::VmState;
use crate::SerialConsole;

/// How long the target waits for its QEMU to confirm the state arrived once the source says it sent it all.
const FINISH_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the target polls `query-migrate` while finishing.
const FINISH_POLL: Duration = Duration::from_millis(20);

/// How long an incoming VM waits for the source's stream to begin, and, once all of the state is in, for the
/// source to finish: a source that stopped driving the migration (its daemon or host died) leaves no QEMU behind
/// on the target. The source owns the VM until `finish` answered, so dropping it here is always safe.
const INCOMING_DEADLINE: Duration = Duration::from_secs(60);
/// How often the target looks at an incoming migration for [`INCOMING_DEADLINE`].
const INCOMING_CHECK: Duration = Duration::from_secs(1);

/// `migration.json` in the source VM's directory while it is `migrating`: where it goes and how far it got, for a
/// daemon restarted mid-way.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Journal {
    target: String,
    phase: JournalPhase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum JournalPhase {
    /// The target is being prepared or the memory sent: the target cannot run the guest yet.
    Sending,
    /// `finish` was sent: the target may run the guest.
    Finishing,
}

/// How long a source whose `finish` went unanswered keeps asking the target what became of the VM.
const ABORT_RETRY: Duration = Duration::from_secs(30);

/// What a target holds after a `finish` whose answer was lost.
enum TargetHas {
    /// No copy of the VM (never resumed there): the source resumes it.
    Nothing,
    /// The VM, resumed: the source removes its copy.
    TheVm,
}

/// A target node, as the source's VM operation sees it.
/// What a target needs besides the spec and the device tree: facts of the VM as it runs on the source. (A UEFI
/// VM's NVRAM needs nothing here: the flash contents travel in QEMU's migration stream, and the target's QEMU writes
/// them to its own copy when the guest resumes.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceFacts {
    /// The accelerator the source's QEMU runs under: a target under another one cannot load the vCPU state (a KVM
    /// guest's CPU state does not restore under TCG, nor the other way), so it refuses.
    pub accel: Option<crate::Accel>,
}

pub trait IncomingPeer: Send + Sync {
    /// Names the target in messages (its URL).
    fn describe(&self) -> String;
    /// Creates the incoming VM on the target and returns the URI the source's QEMU sends to.
    fn prepare<'a>(
        &'a self,
        spec: &'a VmSpec,
        devices: &'a DeviceTree,
        config: &'a MigrationConfig,
        facts: &'a SourceFacts,
    ) -> BoxFuture<'a, Result<String, PeerError>>;
    /// The state is sent: the target resumes the guest and answers once it runs there.
    fn finish<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), PeerError>>;
    /// The target stops its incoming QEMU and removes the VM. [`PeerError::NotFound`] when it has none,
    /// [`PeerError::Refused`] when its VM is no longer incoming (it runs there).
    fn abort<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), PeerError>>;
}

/// What a target answered, as far as the source must tell the cases apart.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The target cannot host the VM; nothing was created there.
    #[error("{0}")]
    Refused(String),
    /// The target has no incoming VM by that name.
    #[error("{0}")]
    NotFound(String),
    /// The call failed (unreachable target, an error on its side).
    #[error("{0}")]
    Failed(String),
}

/// Where the VM stands after a failed migration, for the error message.
const RUNS_HERE: &str = "it keeps running here";
const PAUSED_HERE: &str =
    "it is paused here in postmigrate because the target could not confirm it dropped its copy; check the \
     target before resuming it";
const QEMU_GONE: &str = "its QEMU here ended";

impl VmManager {
    /// Live-migrates VM `name` to `peer`. Valid when running; the VM is `migrating` meanwhile and every other
    /// operation on it waits. Each poll goes to `on_progress`. Turning `cancel` true during precopy (or before)
    /// cancels; after the postcopy switch the migration goes on to the end. On success the VM is gone from this
    /// node and runs on the target; on any failure it runs here as before (see the module docs for the one
    /// exception, reported in the error).
    pub async fn migrate_to(
        &self,
        name: &str,
        peer: &dyn IncomingPeer,
        config: &MigrationConfig,
        cancel: watch::Receiver<bool>,
        on_progress: impl FnMut(&Progress) + Send,
    ) -> Result<Outcome, VmError> {
        config.validate()?;
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        entry.require("migrate", "running", &[VmState::Running])?;
        let Some(runtime) = entry.runtime() else {
            return Err(VmError::WrongState {
                name: name.to_owned(),
                state: entry.state(),
                operation: "migrate",
                needs: "running",
            });
        };
        let target = peer.describe();
        self.write_journal(&entry, &target, JournalPhase::Sending).await?;
        self.set_state(&entry, VmState::Migrating, &format!("migrating to {target}")).await;
        let result = self.migrate_running(&entry, &runtime, peer, config, cancel, on_progress).await;
        self.remove_journal(&entry).await;
        result
    }

    async fn migrate_running(
        &self,
        entry: &Arc<Entry>,
        runtime: &Arc<Runtime>,
        peer: &dyn IncomingPeer,
        config: &MigrationConfig,
        cancel: watch::Receiver<bool>,
        on_progress: impl FnMut(&Progress) + Send,
    ) -> Result<Outcome, VmError> {
        let (name, target) = (entry.name.as_str(), peer.describe());
        let (spec, devices) = {
            let status = entry.status();
            (status.spec.clone(), status.devices.clone())
        };
        let failed = |stage: &'static str, outcome: &'static str, source: BoxError| VmError::Migration {
            name: name.to_owned(),
            target: target.clone(),
            stage,
            outcome,
            source,
        };

        let facts = SourceFacts { accel: entry.status().record.accel };
        let uri = tokio::select! {
            prepared = peer.prepare(&spec, &devices, config, &facts) => match prepared {
                Ok(uri) => uri,
                Err(e) => {
                    self.set_state(entry, VmState::Running, "migration refused by the target").await;
                    return Err(match e {
                        PeerError::Refused(reason) => {
                            VmError::MigrationRefused { name: name.to_owned(), target: target.clone(), reason }
                        }
                        other => failed("preparing the target", RUNS_HERE, other.into()),
                    });
                }
            },
            () = cancelled(cancel.clone()) => {
                // The target may have created the VM just as the request was dropped.
                let _ = peer.abort(name).await;
                self.set_state(entry, VmState::Running, "migration cancelled").await;
                return Err(VmError::MigrationCancelled { name: name.to_owned() });
            }
        };
        info!(vm = %name, %target, %uri, "target prepared; sending the VM");

        let sent = async {
            migration::prepare_source(&runtime.qmp, config).await?;
            migration::migrate_out(&runtime.qmp, &uri, config, cancelled(cancel), on_progress).await
        };
        let outcome = match sent.await {
            Ok(outcome) => outcome,
            Err(e) => {
                let aborted = peer.abort(name).await;
                if let Err(abort) = &aborted {
                    if !matches!(abort, PeerError::NotFound(_)) {
                        warn!(vm = %name, error = %abort, "the target did not confirm it removed the incoming VM");
                    }
                }
                return Err(match e {
                    MigrationError::Cancelled => {
                        self.resume_here(entry, runtime, "migration cancelled").await;
                        VmError::MigrationCancelled { name: name.to_owned() }
                    }
                    other => {
                        let outcome = self.resume_here(entry, runtime, "migration failed").await;
                        failed("sending the memory", outcome, other.into())
                    }
                });
            }
        };

        // From here the target may run the guest: a restarted daemon must not resume it here.
        if let Err(e) = self.write_journal(entry, &target, JournalPhase::Finishing).await {
            let outcome = match peer.abort(name).await {
                Ok(()) | Err(PeerError::NotFound(_)) => self.resume_here(entry, runtime, "migration failed").await,
                Err(_) => PAUSED_HERE,
            };
            return Err(failed("recording the migration's progress", outcome, e.into()));
        }
        if let Err(e) = peer.finish(name).await {
            // The target may or may not run the guest: ask it until it says (a restarting target daemon drops
            // its incoming VMs, so it soon does).
            match self.target_outcome(peer, name).await {
                Ok(TargetHas::Nothing) => {
                    let outcome = self.resume_here(entry, runtime, "the target could not resume the VM").await;
                    return Err(failed("resuming the VM on the target", outcome, e.into()));
                }
                Ok(TargetHas::TheVm) => {
                    warn!(vm = %name, error = %e, "finish failed on the way back, but the VM runs on the target");
                }
                Err(abort) => {
                    error!(vm = %name, error = %abort, "the target neither resumed nor dropped the VM; pausing here");
                    self.set_state(entry, VmState::Paused, &format!("migration to {target} left unresolved: {e}"))
                        .await;
                    return Err(failed("resuming the VM on the target", PAUSED_HERE, e.into()));
                }
            }
        }
        info!(vm = %name, %target, ?outcome, "the VM runs on the target; removing it here");
        self.migrated_away(entry, runtime, &target).await;
        Ok(outcome)
    }

    /// After a `finish` whose answer did not come: whether the target dropped its copy (it had not run it) or
    /// runs the VM (it refuses the abort: the VM is no longer incoming there). Asks for [`ABORT_RETRY`].
    async fn target_outcome(&self, peer: &dyn IncomingPeer, name: &str) -> Result<TargetHas, PeerError> {
        let deadline = tokio::time::Instant::now() + ABORT_RETRY;
        loop {
            match peer.abort(name).await {
                Ok(()) | Err(PeerError::NotFound(_)) => return Ok(TargetHas::Nothing),
                Err(PeerError::Refused(_)) => return Ok(TargetHas::TheVm),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    warn!(vm = %name, error = %e, "the target does not answer; asking again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn write_journal(&self, entry: &Entry, target: &str, phase: JournalPhase) -> Result<(), VmError> {
        let journal = Journal { target: target.to_owned(), phase };
        let json = serde_json::to_vec_pretty(&journal).expect("a journal always serializes");
        let path = journal_path(&entry.dir);
        blocking(move || crate::persist::write_atomic(&path, &json))
            .await
            .map_err(|source| VmError::Persist { name: entry.name.clone(), source })
    }

    async fn remove_journal(&self, entry: &Entry) {
        let path = journal_path(&entry.dir);
        let _ = blocking(move || fs::remove_file(path)).await;
    }

    /// At daemon start, before reattaching to a VM left `migrating`: a migration still running in QEMU is
    /// cancelled (its target's QEMU then ends and takes the incoming VM with it), and a QEMU that had sent all
    /// of the state before `finish` was sent is resumed, since the target cannot have run the guest. After
    /// `finish` was sent the target may run it: that QEMU is left for the reattach, which ends it
    /// (`postmigrate`).
    pub(super) async fn migration_cut_short(&self, entry: &Arc<Entry>) {
        let path = journal_path(&entry.dir);
        let journal: Option<Journal> =
            blocking(move || fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok())).await;
        let qmp = match qx_qmp::QmpClient::connect(entry.dir.qmp_socket(), super::qmp_options()).await {
            Ok(qmp) => qmp,
            Err(e) => {
                warn!(vm = %entry.name, error = %e, "cannot look at a migration cut short by the restart");
                return;
            }
        };
        let phase = journal.as_ref().map_or(JournalPhase::Sending, |j| j.phase);
        let target = journal.map(|j| j.target).unwrap_or_default();
        match qmp.query_status().await.map(|s| s.state) {
            Ok(RunState::Running) => {
                if let Ok(info) = qmp_ops::query_migrate(&qmp).await {
                    let done = matches!(
                        info.status,
                        None | Some(
                            qx_qmp::qapi_qmp::MigrationStatus::none
                                | qx_qmp::qapi_qmp::MigrationStatus::completed
                                | qx_qmp::qapi_qmp::MigrationStatus::cancelled
                                | qx_qmp::qapi_qmp::MigrationStatus::failed
                        )
                    );
                    if !done {
                        info!(vm = %entry.name, %target, "cancelling a migration cut short by the restart");
                        let _ = qmp_ops::migrate_cancel(&qmp).await;
                    }
                }
            }
            Ok(RunState::Postmigrate) if phase == JournalPhase::Sending => {
                info!(vm = %entry.name, %target, "the target never ran the VM: resuming it here");
                if let Err(e) = qmp_ops::simple(&qmp, Simple::Cont, None).await {
                    error!(vm = %entry.name, error = %e, "cannot resume the VM after a migration cut short");
                }
            }
            Ok(state) => info!(vm = %entry.name, %target, %state, ?phase, "a migration was cut short by the restart"),
            Err(e) => warn!(vm = %entry.name, error = %e, "query-status failed"),
        }
        drop(qmp);
        let path = journal_path(&entry.dir);
        let _ = blocking(move || fs::remove_file(path)).await;
    }

    /// After a failed or cancelled migration: the guest runs here again (`cont` from `postmigrate`), or its QEMU
    /// is gone. Returns which, for the error.
    async fn resume_here(&self, entry: &Arc<Entry>, runtime: &Runtime, reason: &str) -> &'static str {
        match runtime.qmp.query_status().await {
            Ok(status) if status.state == RunState::Running => {}
            Ok(_) => {
                if let Err(e) = qmp_ops::simple(&runtime.qmp, Simple::Cont, None).await {
                    error!(vm = %entry.name, error = %e, "cannot resume the VM after the migration ended");
                    self.set_state(entry, VmState::Paused, &format!("{reason}; resuming failed: {e}")).await;
                    return "it is paused here: resuming it failed";
                }
            }
            Err(_) => return QEMU_GONE,
        }
        self.set_state(entry, VmState::Running, reason).await;
        RUNS_HERE
    }

    /// The guest runs on the target: quit this QEMU, remove the switch ports and the VM's files here.
    async fn migrated_away(&self, entry: &Arc<Entry>, runtime: &Runtime, target: &str) {
        runtime.stop_requested.store(true, Ordering::SeqCst);
        let _ = qmp_ops::simple(&runtime.qmp, Simple::Quit, Some(QUIT_GRACE)).await;
        if !entry.wait_inactive(Some(QUIT_GRACE)).await {
            kill(runtime);
            entry.wait_inactive(None).await;
        }
        self.remove_entry(entry, &format!("migrated to {target}")).await;
    }

    /// Removes the VM's directory (renamed away first, so a crash never leaves half of it) and its entry.
    async fn remove_entry(&self, entry: &Arc<Entry>, reason: &str) {
        let dir = entry.dir.path().to_owned();
        let graveyard = self.inner.vms_dir.join(format!(".deleted-{}-{}", entry.name, entry.status().spec.uuid()));
        let removed = blocking(move || {
            fs::rename(&dir, &graveyard)?;
            fs::remove_dir_all(&graveyard)
        })
        .await;
        if let Err(e) = removed {
            error!(vm = %entry.name, error = %e, "cannot remove the VM's directory");
        }
        let previous = entry.state();
        {
            let mut vms = self.vms_write();
            if vms.get(&entry.name).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                vms.remove(&entry.name);
            }
        }
        info!(vm = %entry.name, reason, "removed from this node");
        self.emit(entry, None, Some(previous), reason);
        entry.state_tx.send_replace(VmState::Stopped);
    }

    /// Creates VM `spec` (with the source's device tree `devices`) as `incoming`, its QEMU waiting for the
    /// migration stream on `tcp:<listen_host>:<port>`; returns the VM and the port. Valid when no VM has the name
    /// or uuid. Refusals (validation, shape, networks, volumes) come before anything is created; a failure later
    /// removes what was created.
    pub async fn prepare_incoming(
        &self,
        spec: VmSpec,
        devices: DeviceTree,
        config: &MigrationConfig,
        listen_host: &str,
        source: &str,
        facts: SourceFacts,
    ) -> Result<(VmInfo, u16), VmError> {
        config.validate()?;
        let spec = validated(spec).await?;
        if spec.uuid.is_none() {
            return Err(ValidationErrors::one("uuid", "", "is required for an incoming VM").into());
        }
        spec.validate_shape(&self.inner.caps)?;
        let accel = self.resolve_accel(&spec)?;
        if let Some(theirs) = facts.accel.filter(|theirs| *theirs != accel) {
            let problem = format!(
                "is what the VM runs under on {source}; this node would run it under {accel}, which cannot load its \
                 vCPU state"
            );
            return Err(ValidationErrors::one("accelerator", theirs, problem).into());
        }
        self.check_networks(&spec).await?;
        let resolved = self.resolve_volumes(&spec.name, spec.clone()).await?;
        let entry = {
            let _membership = self.inner.membership.lock().await;
            if self.vms_read().contains_key(&spec.name) {
                return Err(VmError::AlreadyExists(spec.name));
            }
            if let Some(other) = self.vms_read().values().find(|e| e.status().spec.uuid == spec.uuid) {
                let problem = format!("is already used by VM {:?} on this node", other.name);
                return Err(ValidationErrors::one("uuid", spec.uuid(), problem).into());
            }
            let dir = VmDir::new(&self.inner.vms_dir, &spec.name);
            let record = StateRecord {
                state: VmState::Incoming,
                reason: format!("incoming from {source}"),
                ..Default::default()
            };
            let written = {
                let (dir, spec, devices, record) = (dir.clone(), spec.clone(), devices.clone(), record.clone());
                blocking(move || create_vm_dir(&dir, &spec, &devices, &record)).await
            };
            written.map_err(|source| VmError::Persist { name: spec.name.clone(), source })?;
            let entry = Entry::new(spec.name.clone(), dir, spec.clone(), devices.clone(), record);
            self.vms_write().insert(spec.name.clone(), Arc::clone(&entry));
            entry
        };
        self.emit(&entry, Some(VmState::Incoming), None, &format!("incoming from {source}"));
        let _op = entry.op.lock().await;
        match self.launch_incoming(&entry, &resolved, &devices, accel, config, listen_host).await {
            Ok((runtime, port)) => {
                {
                    let mut status = entry.status();
                    status.record.pid = Some(runtime.process.pid());
                    status.record.accel = Some(accel);
                    status.runtime = Some(Arc::clone(&runtime));
                }
                self.persist_state(&entry).await;
                self.supervise(Arc::clone(&entry), Arc::clone(&runtime));
                self.watch_incoming(Arc::clone(&entry), runtime);
                info!(vm = %entry.name, %source, port, "waiting for the incoming migration");
                Ok((entry.info(), port))
            }
            Err(e) => {
                warn!(vm = %entry.name, error = %e, "cannot prepare the incoming VM");
                self.remove_entry(&entry, "incoming migration could not be prepared").await;
                Err(e)
            }
        }
    }

    async fn launch_incoming(
        &self,
        entry: &Arc<Entry>,
        spec: &VmSpec,
        devices: &DeviceTree,
        accel: crate::Accel,
        config: &MigrationConfig,
        listen_host: &str,
    ) -> Result<(Arc<Runtime>, u16), VmError> {
        let dir = entry.dir.clone();
        let start_error = |stage: &'static str| {
            let name = entry.name.clone();
            move |source: BoxError| VmError::Start { name, stage, log: String::new(), source }
        };
        let seed = write_seed(&dir, spec).await.map_err(start_error("writing the cloud-init seed"))?;
        let (process, qmp) = self
            .spawn_qemu(&dir, spec, devices, accel, seed, false, true)
            .await
            .map_err(|(stage, log, source)| VmError::Start { name: entry.name.clone(), stage, log, source })?;
        let listening = async {
            let console = if spec.serial {
                Some(SerialConsole::attach(&dir.serial_socket(), &dir.console_log()).await?)
            } else {
                None
            };
            let hw = crate::cmdline::Hardware::from_spec(spec, devices, None);
            for nic in &hw.network_nics {
                self.plug_network_nic(&qmp, spec, nic).await?;
            }
            migration::start_incoming(&qmp, config, &format!("tcp:{listen_host}:0")).await?;
            let port = listening_port(&qmp).await?;
            Ok::<_, BoxError>((console, port))
        };
        match listening.await {
            Ok((console, port)) => Ok((
                Arc::new(Runtime {
                    process,
                    qmp,
                    console,
                    agent: GuestAgent::new(entry.dir.qga_socket(), agent_options()),
                    stop_requested: Default::default(),
                    guest_shutdown: Default::default(),
                }),
                port,
            )),
            Err(source) => {
                let _ = process.kill();
                process.exited().await;
                self.detach_networks(entry).await;
                blocking(move || dir.remove_runtime_files()).await;
                Err(start_error("listening for the migration")(source))
            }
        }
    }

    /// Drops an incoming VM whose source stopped driving it ([`INCOMING_DEADLINE`]).
    fn watch_incoming(&self, entry: Arc<Entry>, runtime: Arc<Runtime>) {
        let manager = self.clone();
        let span = tracing::info_span!(parent: None, "vm", vm = %entry.name);
        let watch = async move {
            use qx_qmp::qapi_qmp::MigrationStatus;
            let mut waiting = std::time::Instant::now();
            let mut last = None;
            while entry.state() == VmState::Incoming && !runtime.qmp.is_closed() {
                tokio::time::sleep(INCOMING_CHECK).await;
                let Ok(info) = qmp_ops::query_migrate(&runtime.qmp).await else { continue };
                // The clock runs while nothing comes (no stream yet) and once everything came (no finish yet).
                let idle = matches!(info.status, None | Some(MigrationStatus::none | MigrationStatus::setup))
                    || info.status == Some(MigrationStatus::completed);
                if !idle || info.status != last {
                    waiting = std::time::Instant::now();
                    last = info.status;
                    continue;
                }
                if waiting.elapsed() >= INCOMING_DEADLINE && entry.state() == VmState::Incoming {
                    warn!(status = ?info.status, "the source stopped driving the incoming migration; dropping it");
                    let _ = manager.abort_incoming(&entry.name).await;
                    return;
                }
            }
        };
        tokio::spawn(tracing::Instrument::instrument(watch, span));
    }

    /// Resumes an incoming VM once its state arrived: waits for QEMU to confirm, `cont`, `running`. Valid when
    /// `incoming`; from here this node owns the VM.
    pub async fn finish_incoming(&self, name: &str) -> Result<VmInfo, VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        entry.require("finish an incoming migration", "incoming", &[VmState::Incoming])?;
        let runtime = entry.runtime().ok_or_else(|| VmError::NotFound(name.to_owned()))?;
        let arrived = tokio::time::timeout(FINISH_TIMEOUT, migration::wait_incoming(&runtime.qmp, FINISH_POLL)).await;
        let stage_error = |stage: &'static str, source: BoxError| VmError::Start {
            name: name.to_owned(),
            stage,
            log: String::new(),
            source,
        };
        match arrived {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(stage_error("waiting for the migrated state", e.into())),
            Err(_) => {
                return Err(stage_error(
                    "waiting for the migrated state",
                    format!("not in after {FINISH_TIMEOUT:?}").into(),
                ))
            }
        }
        qmp_ops::simple(&runtime.qmp, Simple::Cont, None).await.map_err(entry.qmp_error("cont"))?;
        entry.status().record.started_at_unix = Some(now_unix_ms() / 1000);
        self.set_state(&entry, VmState::Running, "migrated in").await;
        info!(vm = %name, "incoming migration finished; the VM runs here");
        Ok(entry.info())
    }

    /// Stops an incoming VM's QEMU and removes the VM and its files. Valid when `incoming`.
    pub async fn abort_incoming(&self, name: &str) -> Result<(), VmError> {
        let entry = self.entry(name)?;
        let _op = entry.op.lock().await;
        entry.require("abort an incoming migration", "incoming", &[VmState::Incoming])?;
        match entry.runtime() {
            Some(runtime) => {
                runtime.stop_requested.store(true, Ordering::SeqCst);
                kill(&runtime);
                // The supervisor removes the VM when the QEMU is gone (`incoming_ended`).
                entry.wait_inactive(None).await;
            }
            None => self.incoming_ended(&entry, "incoming migration aborted").await,
        }
        Ok(())
    }

    /// An incoming VM's QEMU ended (a cancel on the source, a failed stream, an abort): the VM goes with it.
    pub(super) async fn incoming_ended(&self, entry: &Arc<Entry>, reason: &str) {
        info!(vm = %entry.name, reason, "incoming migration ended");
        self.detach_networks(entry).await;
        {
            let mut status = entry.status();
            status.runtime = None;
            status.record.pid = None;
        }
        self.remove_entry(entry, reason).await;
    }

    /// At daemon start, a VM left `incoming`: the source still owns it (it never heard `finish` answered), so
    /// its QEMU is stopped and the VM removed here.
    pub(super) async fn stale_incoming(&self, entry: &Arc<Entry>, pid: Option<i32>) {
        let pid = crate::process::read_pidfile(&entry.dir.pidfile()).or(pid);
        if let Some(Ok(Some(process))) =
            pid.map(|pid| QemuProcess::adopt(pid, entry.status().spec.uuid(), &self.inner.config.host))
        {
            let _ = process.kill();
            process.exited().await;
        }
        let dir = entry.dir.clone();
        blocking(move || dir.remove_runtime_files()).await;
        self.incoming_ended(entry, "an incoming migration was cut short by a qx-node restart").await;
    }
}

fn journal_path(dir: &VmDir) -> std::path::PathBuf {
    dir.path().join("migration.json")
}

/// Resolves once `cancel` turns true; never when its sender goes without.
async fn cancelled(mut cancel: watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The TCP port an incoming QEMU listens on after `migrate-incoming tcp:HOST:0` (`query-migrate`'s
/// `socket-address`).
async fn listening_port(qmp: &qx_qmp::QmpClient) -> Result<u16, BoxError> {
    let info = qmp_ops::query_migrate(qmp).await?;
    info.socket_address
        .unwrap_or_default()
        .iter()
        .find_map(|address| match address {
            qx_qmp::qapi_qmp::SocketAddress::inet(inet) => inet.base.port.parse().ok(),
            _ => None,
        })
        .ok_or_else(|| "query-migrate names no TCP port for the incoming migration".into())
}
