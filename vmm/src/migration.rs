//! Live migration of one QEMU to another over QMP: the source's driver (capabilities, parameters, `migrate`,
//! polling `query-migrate`, raising the downtime limit, the automatic postcopy switch, cancel) and the target's
//! (`-incoming defer`, then `migrate-incoming`, then waiting for the state to arrive).
//!
//! What it is not: it knows nothing of nodes, gRPC, device trees or which node owns a VM. The caller starts the
//! target QEMU with `-incoming defer` and the same device tree, hands both sides' QMP clients (or one side each, on
//! two nodes) to these functions, and decides what happens to either QEMU afterwards.
//!
//! The decisions (when to raise the downtime limit, when to switch to postcopy) are the pure [`Policy`], unit-tested
//! on its own; [`migrate_out`] applies them to what `query-migrate` reports.

use std::future::Future;
use std::time::{Duration, Instant};

use qx_common::{Problems, ValidationErrors};
use qx_qmp::qapi_qmp::{MigrateSetParameters, MigrationCapability, MigrationInfo, MigrationStatus};
use qx_qmp::{Event, QemuEvent, QmpClient, RunState};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::qmp_ops;

/// What "unlimited" bandwidth is sent as: QEMU 7.2 takes up to `SIZE_MAX` bytes/s and divides it into an `int64`
/// rate limit, so `i64::MAX` is the largest value that means "no limit" without overflow on the way.
pub const UNLIMITED_BANDWIDTH: u64 = i64::MAX as u64;

/// QEMU 7.2's largest downtime limit (`MAX_MIGRATE_DOWNTIME_SECONDS`, 2000 s), in milliseconds.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// How a migration runs. Defaults follow Proxmox's choices rather than QEMU's (128 MiB/s and 300 ms): unlimited
/// bandwidth, 100 ms downtime, doubled after 5 polls without progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// Precopy bandwidth limit in bytes per second; `None` (the default) is unlimited.
    pub max_bandwidth: Option<u64>,
    /// The downtime QEMU aims at when it decides to stop the source, in ms. Default 100.
    pub downtime_limit_ms: u64,
    /// The ceiling for doubling [`Self::downtime_limit_ms`], in ms. Default 2000.
    pub max_downtime_limit_ms: u64,
    /// Polls in a row whose remaining bytes did not shrink before the downtime limit doubles. Default 5; 0 never
    /// raises it.
    pub stalled_polls_before_raise: u32,
    /// `auto-converge`: QEMU throttles the vCPUs of a guest that dirties memory faster than it is sent. Default on.
    pub auto_converge: bool,
    /// `postcopy-ram` enabled on both sides up front and the automatic switch to postcopy. Default on.
    pub postcopy: bool,
    /// Dirty-sync iterations in a row that do not shrink the remaining bytes by a tenth before the switch to
    /// postcopy. Default 3.
    pub postcopy_after_iterations: u32,
    /// `multifd` with this many channels (both sides); `None` (the default) is off. Needs a `tcp:` or `unix:` URI.
    pub multifd_channels: Option<u8>,
    /// `xbzrle` delta compression of re-sent pages, with this cache size in bytes; `None` (the default) is off.
    pub xbzrle_cache_bytes: Option<u64>,
    /// How often `query-migrate` is polled, in ms (a `MIGRATION` event wakes the poll early). Default 100.
    pub poll_interval_ms: u64,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            max_bandwidth: None,
            downtime_limit_ms: 100,
            max_downtime_limit_ms: 2000,
            stalled_polls_before_raise: 5,
            auto_converge: true,
            postcopy: true,
            postcopy_after_iterations: 3,
            multifd_channels: None,
            xbzrle_cache_bytes: None,
            poll_interval_ms: 100,
        }
    }
}

impl MigrationConfig {
    /// Every problem with the config, each naming its field and value.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut p = Problems::default();
        if self.max_bandwidth == Some(0) {
            p.add("max_bandwidth", 0, "is 0 bytes/s; leave it unset for unlimited");
        }
        if let Some(bandwidth) = self.max_bandwidth.filter(|&b| b > UNLIMITED_BANDWIDTH) {
            p.add("max_bandwidth", bandwidth, format!("is above QEMU's maximum {UNLIMITED_BANDWIDTH}"));
        }
        if self.downtime_limit_ms == 0 || self.downtime_limit_ms > MAX_DOWNTIME_LIMIT_MS {
            p.add("downtime_limit_ms", self.downtime_limit_ms, format!("is outside 1..={MAX_DOWNTIME_LIMIT_MS}"));
        }
        if self.max_downtime_limit_ms < self.downtime_limit_ms || self.max_downtime_limit_ms > MAX_DOWNTIME_LIMIT_MS {
            p.add(
                "max_downtime_limit_ms",
                self.max_downtime_limit_ms,
                format!("is outside downtime_limit_ms ({})..={MAX_DOWNTIME_LIMIT_MS}", self.downtime_limit_ms),
            );
        }
        if self.postcopy && self.postcopy_after_iterations == 0 {
            p.add("postcopy_after_iterations", 0, "must be at least 1 when postcopy is on");
        }
        if self.multifd_channels == Some(0) {
            p.add("multifd_channels", 0, "must be at least 1; leave it unset for no multifd");
        }
        if self.postcopy && self.multifd_channels.is_some() {
            p.add(
                "multifd_channels",
                self.multifd_channels.unwrap_or_default(),
                "is not combined with postcopy here (QEMU 7.2's postcopy does not use multifd channels); turn \
                 postcopy off to use multifd",
            );
        }
        if self.xbzrle_cache_bytes == Some(0) {
            p.add("xbzrle_cache_bytes", 0, "must be above 0; leave it unset for no xbzrle");
        }
        if self.poll_interval_ms == 0 || self.poll_interval_ms > 10_000 {
            p.add("poll_interval_ms", self.poll_interval_ms, "is outside 1..=10000");
        }
        p.into_result()
    }

    /// The capabilities the source sets, every one named so a QEMU left with another setting is overridden.
    pub fn source_capabilities(&self) -> Vec<(MigrationCapability, bool)> {
        vec![
            (MigrationCapability::auto_converge, self.auto_converge),
            (MigrationCapability::postcopy_ram, self.postcopy),
            (MigrationCapability::multifd, self.multifd_channels.is_some()),
            (MigrationCapability::xbzrle, self.xbzrle_cache_bytes.is_some()),
            (MigrationCapability::events, true),
        ]
    }

    /// The capabilities the target sets: those both ends of the stream must agree on.
    pub fn target_capabilities(&self) -> Vec<(MigrationCapability, bool)> {
        vec![
            (MigrationCapability::postcopy_ram, self.postcopy),
            (MigrationCapability::multifd, self.multifd_channels.is_some()),
            (MigrationCapability::events, true),
        ]
    }

    /// The source's parameters.
    pub fn source_parameters(&self) -> MigrateSetParameters {
        MigrateSetParameters {
            max_bandwidth: Some(self.max_bandwidth.unwrap_or(UNLIMITED_BANDWIDTH)),
            downtime_limit: Some(self.downtime_limit_ms),
            multifd_channels: self.multifd_channels,
            xbzrle_cache_size: self.xbzrle_cache_bytes,
            ..Default::default()
        }
    }

    /// The target's parameters (only the multifd channel count must match).
    pub fn target_parameters(&self) -> Option<MigrateSetParameters> {
        self.multifd_channels
            .map(|channels| MigrateSetParameters { multifd_channels: Some(channels), ..Default::default() })
    }
}

/// Where a migration stands, as the operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Before the first page: the stream is being set up.
    Setup,
    /// Memory is copied while the guest runs on the source.
    Precopy,
    /// The guest runs on the target; the rest of its memory follows on demand.
    Postcopy,
    /// The source is stopped and its last pages and device state are on the way.
    Switchover,
    /// The guest runs (or is ready to run) on the target.
    Completed,
    /// The migration stopped; the guest stays on the source.
    Cancelled,
    /// The migration failed.
    Failed,
}

impl Phase {
    /// The phase of a `query-migrate` status.
    pub fn of(status: MigrationStatus) -> Self {
        match status {
            MigrationStatus::none | MigrationStatus::setup => Phase::Setup,
            MigrationStatus::active | MigrationStatus::wait_unplug | MigrationStatus::colo => Phase::Precopy,
            MigrationStatus::postcopy_active
            | MigrationStatus::postcopy_paused
            | MigrationStatus::postcopy_recover_setup
            | MigrationStatus::postcopy_recover => Phase::Postcopy,
            MigrationStatus::pre_switchover | MigrationStatus::device => Phase::Switchover,
            MigrationStatus::completed => Phase::Completed,
            MigrationStatus::cancelling | MigrationStatus::cancelled => Phase::Cancelled,
            MigrationStatus::failed => Phase::Failed,
        }
    }
}

/// One `query-migrate` poll, as progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The phase.
    pub phase: Phase,
    /// QEMU's own status, for the cases the phase folds together.
    pub status: MigrationStatus,
    /// RAM bytes sent so far.
    pub transferred_bytes: u64,
    /// RAM bytes still to send in this pass.
    pub remaining_bytes: u64,
    /// The guest's RAM size.
    pub total_bytes: u64,
    /// Bytes the guest dirties per second (QEMU's dirty page rate times the page size).
    pub dirty_rate_bytes: u64,
    /// Dirty-sync count: 1 during the first pass over memory, then one more per pass.
    pub iteration: u64,
    /// The downtime QEMU expects if it stopped the source now, in ms.
    pub expected_downtime_ms: Option<u64>,
    /// The downtime limit in force, in ms.
    pub downtime_limit_ms: u64,
    /// The throughput QEMU measures, in megabits per second.
    pub mbps: f64,
    /// `auto-converge`'s vCPU throttle, in percent.
    pub cpu_throttle_percent: Option<u64>,
    /// Time since `migrate` was sent.
    pub elapsed: Duration,
}

impl Progress {
    /// The progress a `query-migrate` answer shows, `elapsed` after the start with `downtime_limit_ms` in force.
    pub fn from_info(info: &MigrationInfo, downtime_limit_ms: u64, elapsed: Duration) -> Self {
        let status = info.status.unwrap_or(MigrationStatus::none);
        let ram = info.ram.as_ref();
        let unsigned = |v: i64| u64::try_from(v).unwrap_or(0);
        Progress {
            phase: Phase::of(status),
            status,
            transferred_bytes: ram.map_or(0, |r| unsigned(r.transferred)),
            remaining_bytes: ram.map_or(0, |r| unsigned(r.remaining)),
            total_bytes: ram.map_or(0, |r| unsigned(r.total)),
            dirty_rate_bytes: ram.map_or(0, |r| unsigned(r.dirty_pages_rate).saturating_mul(unsigned(r.page_size))),
            iteration: ram.map_or(0, |r| unsigned(r.dirty_sync_count)),
            expected_downtime_ms: info.expected_downtime.map(unsigned),
            downtime_limit_ms,
            mbps: ram.map_or(0.0, |r| r.mbps),
            cpu_throttle_percent: info.cpu_throttle_percentage.map(unsigned),
            elapsed,
        }
    }
}

/// What the [`Policy`] asks the driver to do after a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Set the downtime limit to this many ms.
    RaiseDowntime(u64),
    /// Send `migrate-start-postcopy`.
    StartPostcopy,
}

/// The driver's decisions, from successive polls. Pure, so the rules are tested without a QEMU.
///
/// - The downtime limit doubles (up to the configured ceiling) after `stalled_polls_before_raise` polls in a row
///   whose remaining bytes did not shrink (Proxmox's rule).
/// - Postcopy starts once `postcopy_after_iterations` dirty-sync iterations in a row end with no less than nine
///   tenths of the least remaining bytes any earlier iteration ended with: precopy is not converging.
#[derive(Debug, Clone)]
pub struct Policy {
    config: MigrationConfig,
    downtime_limit_ms: u64,
    last_remaining: Option<u64>,
    stalled_polls: u32,
    last_iteration: u64,
    best_iteration_remaining: Option<u64>,
    stalled_iterations: u32,
    postcopy_started: bool,
}

impl Policy {
    /// The policy at the start of a migration with `config`.
    pub fn new(config: &MigrationConfig) -> Self {
        Self {
            config: config.clone(),
            downtime_limit_ms: config.downtime_limit_ms,
            last_remaining: None,
            stalled_polls: 0,
            last_iteration: 0,
            best_iteration_remaining: None,
            stalled_iterations: 0,
            postcopy_started: false,
        }
    }

    /// The downtime limit in force.
    pub fn downtime_limit_ms(&self) -> u64 {
        self.downtime_limit_ms
    }

    /// Whether postcopy was asked for.
    pub fn postcopy_started(&self) -> bool {
        self.postcopy_started
    }

    /// What to do after a poll showing `progress`. Only precopy is steered.
    pub fn observe(&mut self, progress: &Progress) -> Vec<Action> {
        let mut actions = Vec::new();
        if progress.phase != Phase::Precopy || self.postcopy_started {
            return actions;
        }
        let remaining = progress.remaining_bytes;
        match self.last_remaining {
            Some(last) if remaining >= last => self.stalled_polls += 1,
            _ => self.stalled_polls = 0,
        }
        self.last_remaining = Some(remaining);
        let threshold = self.config.stalled_polls_before_raise;
        if threshold > 0 && self.stalled_polls >= threshold {
            self.stalled_polls = 0;
            let raised = self.downtime_limit_ms.saturating_mul(2).min(self.config.max_downtime_limit_ms);
            if raised > self.downtime_limit_ms {
                self.downtime_limit_ms = raised;
                actions.push(Action::RaiseDowntime(raised));
            }
        }
        // An iteration's remaining bytes are what the guest dirtied during the one before: the measure of
        // convergence. The first pass (iteration 1) sends all of memory and says nothing about it.
        if progress.iteration > self.last_iteration {
            self.last_iteration = progress.iteration;
            if progress.iteration >= 2 {
                match self.best_iteration_remaining {
                    Some(best) if remaining.saturating_mul(10) >= best.saturating_mul(9) => {
                        self.stalled_iterations += 1;
                    }
                    _ => {
                        self.best_iteration_remaining = Some(remaining);
                        self.stalled_iterations = 0;
                    }
                }
                if self.config.postcopy && self.stalled_iterations >= self.config.postcopy_after_iterations {
                    self.postcopy_started = true;
                    actions.push(Action::StartPostcopy);
                }
            }
        }
        actions
    }
}

/// How an outgoing migration ended well.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// QEMU's measured downtime, in ms.
    pub downtime_ms: u64,
    /// QEMU's total time, in ms.
    pub total_time_ms: u64,
    /// QEMU's setup time, in ms.
    pub setup_time_ms: u64,
    /// RAM bytes sent.
    pub transferred_bytes: u64,
    /// Whether it finished through postcopy.
    pub postcopy: bool,
    /// The downtime limit in force at the end, in ms.
    pub downtime_limit_ms: u64,
}

/// What went wrong in a migration, named by the step.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The config was refused before anything was sent.
    #[error("migration config")]
    Config(#[source] ValidationErrors),
    /// A QMP command failed.
    #[error("QMP `{command}` on the {side}")]
    Command {
        /// The command.
        command: &'static str,
        /// `source` or `target`.
        side: &'static str,
        /// QEMU's error or the channel's.
        #[source]
        source: qx_qmp::Error,
    },
    /// QEMU reported the migration failed. `source_runs` says whether the source guest still runs (a failure
    /// after the source stopped leaves it in `postmigrate`, which needs `cont`).
    #[error("migration failed: {reason}")]
    Failed {
        /// QEMU's `error-desc`, or the status when it gave none.
        reason: String,
        /// Whether the source's vCPUs run.
        source_runs: bool,
    },
    /// The migration was cancelled; the source guest keeps running.
    #[error("migration cancelled")]
    Cancelled,
    /// The target QEMU ended before the state arrived (it exits by itself when the source cancels or fails).
    #[error("the target QEMU exited before the migration completed")]
    TargetExited,
}

fn command(command: &'static str, side: &'static str) -> impl FnOnce(qx_qmp::Error) -> MigrationError {
    move |source| MigrationError::Command { command, side, source }
}

/// The source's QMP closed while the migration ran: its QEMU ended.
fn source_closed() -> MigrationError {
    command("query-migrate", "source")(qx_qmp::Error::Closed { command: "query-migrate".to_owned() })
}

/// Sets the source's capabilities and parameters. Valid while no migration runs on it.
pub async fn prepare_source(qmp: &QmpClient, config: &MigrationConfig) -> Result<(), MigrationError> {
    config.validate().map_err(MigrationError::Config)?;
    qmp_ops::set_migration_capabilities(qmp, &config.source_capabilities())
        .await
        .map_err(command("migrate-set-capabilities", "source"))?;
    qmp_ops::set_migration_parameters(qmp, config.source_parameters())
        .await
        .map_err(command("migrate-set-parameters", "source"))
}

/// Sets the target's capabilities and parameters and starts listening on `uri`. The target QEMU was started with
/// `-incoming defer` (and `-S`, so it waits for `cont` once the state is in).
pub async fn start_incoming(qmp: &QmpClient, config: &MigrationConfig, uri: &str) -> Result<(), MigrationError> {
    config.validate().map_err(MigrationError::Config)?;
    qmp_ops::set_migration_capabilities(qmp, &config.target_capabilities())
        .await
        .map_err(command("migrate-set-capabilities", "target"))?;
    if let Some(parameters) = config.target_parameters() {
        qmp_ops::set_migration_parameters(qmp, parameters)
            .await
            .map_err(command("migrate-set-parameters", "target"))?;
    }
    qmp_ops::migrate_incoming(qmp, uri).await.map_err(command("migrate-incoming", "target"))
}

/// Waits until the incoming state is in, polling `query-migrate` every `poll` (a `MIGRATION` event wakes it early).
/// Returns with the target ready for `cont` (or already running, in postcopy); [`MigrationError::TargetExited`] when
/// the QEMU ends first (what a cancel on the source looks like from here).
pub async fn wait_incoming(qmp: &QmpClient, poll: Duration) -> Result<(), MigrationError> {
    let mut events = qmp.subscribe();
    loop {
        let info = match qmp_ops::query_migrate(qmp).await {
            Ok(info) => info,
            Err(_) if qmp.is_closed() => return Err(MigrationError::TargetExited),
            Err(e) => return Err(command("query-migrate", "target")(e)),
        };
        match info.status {
            Some(MigrationStatus::completed) => return Ok(()),
            Some(MigrationStatus::failed) => {
                let reason = info.error_desc.unwrap_or_else(|| "incoming migration failed".to_owned());
                return Err(MigrationError::Failed { reason, source_runs: false });
            }
            _ => {}
        }
        if wait_poll(&mut events, poll).await {
            return Err(MigrationError::TargetExited);
        }
    }
}

/// Runs the outgoing migration to `uri` on a source set up by [`prepare_source`]: sends `migrate`, polls, applies
/// the [`Policy`], reports each poll to `on_progress`, and returns once QEMU says `completed` (the source is then in
/// `postmigrate`: the caller quits it once the target runs).
///
/// When `cancel` resolves during precopy, `migrate_cancel` is sent and the result is [`MigrationError::Cancelled`]
/// once QEMU confirms, with the source running. After the switch to postcopy the guest runs on the target and
/// neither side alone holds all of it, so a cancel is not sent: the migration goes on to the end.
pub async fn migrate_out<C, P>(
    qmp: &QmpClient,
    uri: &str,
    config: &MigrationConfig,
    cancel: C,
    mut on_progress: P,
) -> Result<Outcome, MigrationError>
where
    C: Future<Output = ()>,
    P: FnMut(&Progress),
{
    config.validate().map_err(MigrationError::Config)?;
    let poll = Duration::from_millis(config.poll_interval_ms);
    let mut events = qmp.subscribe();
    let started = Instant::now();
    let mut policy = Policy::new(config);
    qmp_ops::migrate(qmp, uri).await.map_err(command("migrate", "source"))?;
    info!(uri, "migration started");
    tokio::pin!(cancel);
    let mut cancelling = false;
    loop {
        let info = qmp_ops::query_migrate(qmp).await.map_err(command("query-migrate", "source"))?;
        let progress = Progress::from_info(&info, policy.downtime_limit_ms(), started.elapsed());
        debug!(?progress, "migration progress");
        on_progress(&progress);
        match info.status {
            Some(MigrationStatus::completed) => {
                let info = completed_times(qmp, info).await;
                let unsigned = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0);
                let outcome = Outcome {
                    downtime_ms: unsigned(info.downtime),
                    total_time_ms: unsigned(info.total_time),
                    setup_time_ms: unsigned(info.setup_time),
                    transferred_bytes: progress.transferred_bytes,
                    postcopy: policy.postcopy_started(),
                    downtime_limit_ms: policy.downtime_limit_ms(),
                };
                info!(?outcome, "migration completed");
                return Ok(outcome);
            }
            Some(MigrationStatus::cancelled) => return Err(MigrationError::Cancelled),
            Some(MigrationStatus::failed) => {
                let reason = info.error_desc.unwrap_or_else(|| "QEMU reports `failed` without a reason".to_owned());
                let source_runs = qmp.query_status().await.is_ok_and(|s| s.state == RunState::Running);
                warn!(%reason, source_runs, "migration failed");
                return Err(MigrationError::Failed { reason, source_runs });
            }
            _ => {}
        }
        for action in policy.observe(&progress) {
            match action {
                Action::RaiseDowntime(ms) => {
                    info!(downtime_limit_ms = ms, "migration is not progressing: downtime limit raised");
                    let parameters = MigrateSetParameters { downtime_limit: Some(ms), ..Default::default() };
                    qmp_ops::set_migration_parameters(qmp, parameters)
                        .await
                        .map_err(command("migrate-set-parameters", "source"))?;
                }
                Action::StartPostcopy => {
                    info!(iteration = progress.iteration, "precopy is not converging: switching to postcopy");
                    qmp_ops::migrate_start_postcopy(qmp).await.map_err(command("migrate-start-postcopy", "source"))?;
                }
            }
        }
        if cancelling || progress.phase == Phase::Postcopy || policy.postcopy_started() {
            if wait_poll(&mut events, poll).await {
                return Err(source_closed());
            }
            continue;
        }
        tokio::select! {
            () = &mut cancel => {
                info!("migration cancel requested");
                qmp_ops::migrate_cancel(qmp).await.map_err(command("migrate_cancel", "source"))?;
                cancelling = true;
            }
            closed = wait_poll(&mut events, poll) => if closed {
                return Err(source_closed());
            },
        }
    }
}

/// A `completed` answer with QEMU's times in it. QEMU 7.2 sets the state to `completed` a moment before it
/// computes the total time and downtime (`migration_iteration_finish`), and a poll in between reads zeros: ask
/// again, briefly, until they are there.
async fn completed_times(qmp: &QmpClient, mut info: MigrationInfo) -> MigrationInfo {
    for _ in 0..50 {
        if info.total_time.unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        match qmp_ops::query_migrate(qmp).await {
            Ok(again) if again.status == Some(MigrationStatus::completed) => info = again,
            _ => break,
        }
    }
    info
}

/// Sleeps `poll`, or less when a `MIGRATION` event arrives. True when QMP closed.
async fn wait_poll(events: &mut tokio::sync::broadcast::Receiver<Event>, poll: Duration) -> bool {
    let deadline = tokio::time::sleep(poll);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = &mut deadline => return false,
            event = events.recv() => match event {
                Ok(Event::Qemu(event)) => {
                    if matches!(event.typed(), QemuEvent::Migration { .. }) {
                        return false;
                    }
                }
                Ok(Event::Closed { .. }) | Err(tokio::sync::broadcast::error::RecvError::Closed) => return true,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    //! The policy on its own, and the driver against a fake QEMU that answers `query-migrate` from a script.

    use super::*;
    use qx_qmp::ConnectOptions;
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixStream;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// `query-migrate`'s answer with these RAM figures, as 7.2 sends it (with `skipped`, which 9.1 dropped).
    fn info(status: &str, transferred: i64, remaining: i64, iteration: i64) -> Value {
        json!({
            "status": status, "expected-downtime": 42, "total-time": 900, "setup-time": 3, "downtime": 17,
            "ram": {"transferred": transferred, "remaining": remaining, "total": 268_435_456, "duplicate": 0,
                    "skipped": 0, "normal": 0, "normal-bytes": 0, "dirty-pages-rate": 100, "mbps": 800.5,
                    "dirty-sync-count": iteration, "postcopy-requests": 0, "page-size": 4096,
                    "multifd-bytes": 0, "pages-per-second": 0, "precopy-bytes": 0, "downtime-bytes": 0,
                    "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0}
        })
    }

    /// A fake QEMU: `query-migrate` answers come from `script` in turn (the last repeats), and a command named in
    /// `switch` moves the script to the answers given for it. Every command but `qmp_capabilities`, `query-migrate`
    /// and `query-status` is recorded.
    struct Fake {
        sent: Arc<Mutex<Vec<Value>>>,
    }

    impl Fake {
        async fn start(script: Vec<Value>, switch: Vec<(&'static str, Vec<Value>)>) -> (QmpClient, Fake) {
            let (client, server) = UnixStream::pair().unwrap();
            let sent = Arc::new(Mutex::new(Vec::new()));
            let record = sent.clone();
            tokio::spawn(async move {
                let (read, mut write) = server.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(format!("{GREETING}\n").as_bytes()).await.unwrap();
                let mut script = std::collections::VecDeque::from(script);
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut message: Value = serde_json::from_str(&line).unwrap();
                    let id = message.as_object_mut().and_then(|m| m.remove("id")).unwrap_or_default();
                    let name = message["execute"].as_str().unwrap_or_default().to_owned();
                    let answer = match name.as_str() {
                        "query-migrate" => {
                            if script.len() > 1 {
                                script.pop_front().unwrap()
                            } else {
                                script.front().cloned().unwrap_or(json!({}))
                            }
                        }
                        "query-status" => json!({"status": "running", "running": true, "singlestep": false}),
                        _ => json!({}),
                    };
                    if let Some((_, next)) = switch.iter().find(|(command, _)| *command == name) {
                        script = next.clone().into();
                    }
                    if !matches!(name.as_str(), "qmp_capabilities" | "query-migrate" | "query-status") {
                        record.lock().unwrap().push(message);
                    }
                    let reply = json!({"return": answer, "id": id});
                    write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
                }
            });
            let opts =
                ConnectOptions { connect_timeout: Duration::from_secs(5), command_timeout: Duration::from_secs(5) };
            (QmpClient::from_stream(client, opts).await.unwrap(), Fake { sent })
        }

        fn sent(&self) -> Vec<Value> {
            self.sent.lock().unwrap().clone()
        }

        fn names(&self) -> Vec<String> {
            self.sent().iter().map(|m| m["execute"].as_str().unwrap().to_owned()).collect()
        }
    }

    fn fast() -> MigrationConfig {
        MigrationConfig { poll_interval_ms: 1, ..Default::default() }
    }

    fn progress(phase: Phase, remaining: u64, iteration: u64) -> Progress {
        Progress {
            phase,
            status: MigrationStatus::active,
            transferred_bytes: 0,
            remaining_bytes: remaining,
            total_bytes: 0,
            dirty_rate_bytes: 0,
            iteration,
            expected_downtime_ms: None,
            downtime_limit_ms: 0,
            mbps: 0.0,
            cpu_throttle_percent: None,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn defaults_are_valid_and_every_bad_field_is_named() {
        MigrationConfig::default().validate().unwrap();
        let bad = MigrationConfig {
            max_bandwidth: Some(0),
            downtime_limit_ms: 0,
            max_downtime_limit_ms: MAX_DOWNTIME_LIMIT_MS + 1,
            postcopy_after_iterations: 0,
            multifd_channels: Some(4),
            xbzrle_cache_bytes: Some(0),
            poll_interval_ms: 0,
            ..Default::default()
        };
        let errors = bad.validate().unwrap_err().to_string();
        for field in [
            "max_bandwidth: \"0\"",
            "downtime_limit_ms: \"0\"",
            "max_downtime_limit_ms: \"2000001\"",
            "postcopy_after_iterations: \"0\"",
            "multifd_channels: \"4\"",
            "xbzrle_cache_bytes: \"0\"",
            "poll_interval_ms: \"0\"",
        ] {
            assert!(errors.contains(field), "{field} missing from: {errors}");
        }
        let multifd = MigrationConfig { postcopy: false, multifd_channels: Some(4), ..Default::default() };
        multifd.validate().unwrap();
        let parsed: Result<MigrationConfig, _> = serde_json::from_value(json!({"bandwidth": 1}));
        assert!(parsed.unwrap_err().to_string().contains("bandwidth"), "unknown fields are refused");
    }

    #[test]
    fn progress_reads_query_migrate_of_qemu_7_2() {
        let info: MigrationInfo = serde_json::from_value(info("active", 1000, 2000, 3)).unwrap();
        let p = Progress::from_info(&info, 100, Duration::from_secs(1));
        assert_eq!(
            (p.phase, p.transferred_bytes, p.remaining_bytes, p.total_bytes, p.iteration),
            (Phase::Precopy, 1000, 2000, 268_435_456, 3)
        );
        assert_eq!((p.dirty_rate_bytes, p.expected_downtime_ms, p.downtime_limit_ms), (409_600, Some(42), 100));
        let empty = Progress::from_info(&MigrationInfo::default(), 100, Duration::ZERO);
        assert_eq!((empty.phase, empty.remaining_bytes), (Phase::Setup, 0));
    }

    #[test]
    fn downtime_doubles_after_five_polls_without_progress_up_to_the_ceiling() {
        let config = MigrationConfig { postcopy: false, max_downtime_limit_ms: 300, ..Default::default() };
        let mut policy = Policy::new(&config);
        let mut raised = Vec::new();
        for remaining in [100, 90, 90, 95, 90, 91, 92, 80, 80, 80, 80, 80, 80, 80, 80, 80, 80, 80, 80, 80, 80] {
            for action in policy.observe(&progress(Phase::Precopy, remaining, 1)) {
                raised.push(action);
            }
        }
        // 90→90,95(≥),90(<),91,92: no; 80 after 92 resets; then five stalled polls each raise.
        assert_eq!(raised, [Action::RaiseDowntime(200), Action::RaiseDowntime(300)]);
        assert_eq!(policy.downtime_limit_ms(), 300);
        assert!(Policy::new(&MigrationConfig { stalled_polls_before_raise: 0, ..config })
            .observe(&progress(Phase::Precopy, 1, 1))
            .is_empty());
    }

    #[test]
    fn postcopy_starts_when_iterations_stop_shrinking_the_remaining_bytes() {
        let mut policy = Policy::new(&MigrationConfig { stalled_polls_before_raise: 0, ..Default::default() });
        let mut actions = Vec::new();
        // Iteration 1 is the first pass; 2 sets the mark; 3 shrinks it by more than a tenth; 4, 5, 6 do not.
        for (remaining, iteration) in [(900, 1), (500, 1), (400, 2), (300, 3), (290, 3), (280, 4), (300, 5), (275, 6)] {
            actions.extend(policy.observe(&progress(Phase::Precopy, remaining, iteration)));
            if iteration < 6 {
                assert!(actions.is_empty(), "switched early at iteration {iteration}");
            }
        }
        assert_eq!(actions, [Action::StartPostcopy]);
        assert!(policy.postcopy_started());
        assert!(policy.observe(&progress(Phase::Precopy, 275, 7)).is_empty(), "asked once");
        let mut off = Policy::new(&MigrationConfig { postcopy: false, ..Default::default() });
        for iteration in 1..10 {
            assert!(!off.observe(&progress(Phase::Precopy, 300, iteration)).contains(&Action::StartPostcopy));
        }
    }

    #[tokio::test]
    async fn source_and_target_set_exactly_what_the_config_says() {
        let (qmp, fake) = Fake::start(vec![], vec![]).await;
        prepare_source(&qmp, &MigrationConfig { max_bandwidth: Some(8 << 20), ..Default::default() }).await.unwrap();
        start_incoming(&qmp, &MigrationConfig::default(), "unix:/run/in.sock").await.unwrap();
        let multifd = MigrationConfig {
            postcopy: false,
            multifd_channels: Some(4),
            xbzrle_cache_bytes: Some(64 << 20),
            ..Default::default()
        };
        prepare_source(&qmp, &multifd).await.unwrap();
        start_incoming(&qmp, &multifd, "tcp:0.0.0.0:4444").await.unwrap();
        let caps = |list: &[(&str, bool)]| {
            let caps: Vec<_> = list.iter().map(|(c, s)| json!({"capability": c, "state": s})).collect();
            json!({"execute": "migrate-set-capabilities", "arguments": {"capabilities": caps}})
        };
        assert_eq!(
            fake.sent(),
            [
                caps(&[
                    ("auto-converge", true),
                    ("postcopy-ram", true),
                    ("multifd", false),
                    ("xbzrle", false),
                    ("events", true)
                ]),
                json!({"execute": "migrate-set-parameters",
                       "arguments": {"max-bandwidth": 8 << 20, "downtime-limit": 100}}),
                caps(&[("postcopy-ram", true), ("multifd", false), ("events", true)]),
                json!({"execute": "migrate-incoming", "arguments": {"uri": "unix:/run/in.sock"}}),
                caps(&[
                    ("auto-converge", true),
                    ("postcopy-ram", false),
                    ("multifd", true),
                    ("xbzrle", true),
                    ("events", true)
                ]),
                json!({"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": UNLIMITED_BANDWIDTH,
                       "downtime-limit": 100, "multifd-channels": 4, "xbzrle-cache-size": 64 << 20}}),
                caps(&[("postcopy-ram", false), ("multifd", true), ("events", true)]),
                json!({"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 4}}),
                json!({"execute": "migrate-incoming", "arguments": {"uri": "tcp:0.0.0.0:4444"}}),
            ]
        );
        let bad = MigrationConfig { downtime_limit_ms: 0, ..Default::default() };
        assert!(matches!(prepare_source(&qmp, &bad).await, Err(MigrationError::Config(_))));
        assert_eq!(fake.sent().len(), 9, "a bad config sends nothing");
    }

    #[tokio::test]
    async fn a_converging_migration_reports_progress_and_the_outcome() {
        let script = vec![
            json!({"status": "setup"}),
            info("active", 100, 900, 1),
            info("active", 600, 400, 1),
            info("device", 990, 10, 2),
            info("completed", 1000, 0, 2),
        ];
        let (qmp, fake) = Fake::start(script, vec![]).await;
        let mut seen = Vec::new();
        let outcome = migrate_out(&qmp, "tcp:10.0.0.2:4444", &fast(), std::future::pending(), |p| seen.push(p.phase))
            .await
            .unwrap();
        assert_eq!(seen, [Phase::Setup, Phase::Precopy, Phase::Precopy, Phase::Switchover, Phase::Completed]);
        assert_eq!(
            outcome,
            Outcome {
                downtime_ms: 17,
                total_time_ms: 900,
                setup_time_ms: 3,
                transferred_bytes: 1000,
                postcopy: false,
                downtime_limit_ms: 100
            }
        );
        assert_eq!(fake.sent(), [json!({"execute": "migrate", "arguments": {"uri": "tcp:10.0.0.2:4444"}})]);
    }

    #[tokio::test]
    async fn a_completed_answer_without_qemus_times_is_asked_again() {
        let mut early = info("completed", 1000, 0, 2);
        early["total-time"] = json!(0);
        early["downtime"] = json!(0);
        let script = vec![info("active", 600, 400, 1), early, info("completed", 1000, 0, 2)];
        let (qmp, _fake) = Fake::start(script, vec![]).await;
        let outcome = migrate_out(&qmp, "unix:/m.sock", &fast(), std::future::pending(), |_| ()).await.unwrap();
        assert_eq!((outcome.total_time_ms, outcome.downtime_ms), (900, 17));
    }

    #[tokio::test]
    async fn a_stuck_precopy_raises_the_downtime_then_switches_to_postcopy() {
        let mut script = vec![info("active", 100, 900, 1)];
        for iteration in 2..=6 {
            for _ in 0..3 {
                script.push(info("active", 100, 500, iteration));
            }
        }
        let after = vec![info("postcopy-active", 2000, 100, 6), info("completed", 2100, 0, 6)];
        let (qmp, fake) = Fake::start(script, vec![("migrate-start-postcopy", after)]).await;
        let config = MigrationConfig { stalled_polls_before_raise: 5, ..fast() };
        let outcome = migrate_out(&qmp, "unix:/m.sock", &config, std::future::pending(), |_| ()).await.unwrap();
        assert!(outcome.postcopy);
        // Five stalled polls raise the limit once; three stalled iterations then switch before a second raise.
        assert_eq!(fake.names(), ["migrate", "migrate-set-parameters", "migrate-start-postcopy"]);
        assert_eq!(fake.sent()[1]["arguments"], json!({"downtime-limit": 200}));
        assert_eq!(outcome.downtime_limit_ms, 200);
    }

    #[tokio::test]
    async fn cancel_sends_migrate_cancel_and_waits_for_qemu_to_confirm() {
        let script = vec![info("active", 100, 900, 1)];
        let after = vec![json!({"status": "cancelling"}), json!({"status": "cancelled"})];
        let (qmp, fake) = Fake::start(script, vec![("migrate_cancel", after)]).await;
        let cancel = tokio::time::sleep(Duration::from_millis(20));
        let config = MigrationConfig { stalled_polls_before_raise: 0, ..fast() };
        let result = migrate_out(&qmp, "unix:/m.sock", &config, cancel, |_| ()).await;
        assert!(matches!(result, Err(MigrationError::Cancelled)), "{result:?}");
        assert_eq!(fake.names(), ["migrate", "migrate_cancel"]);
    }

    #[tokio::test]
    async fn a_cancel_during_postcopy_is_not_sent() {
        let script = vec![info("postcopy-active", 100, 900, 3), info("postcopy-active", 500, 500, 3)];
        let mut script: Vec<Value> = script.into_iter().cycle().take(30).collect();
        script.push(info("completed", 1000, 0, 3));
        let (qmp, fake) = Fake::start(script, vec![]).await;
        let outcome = migrate_out(&qmp, "unix:/m.sock", &fast(), std::future::ready(()), |_| ()).await.unwrap();
        assert_eq!(outcome.transferred_bytes, 1000);
        assert_eq!(fake.names(), ["migrate"]);
    }

    #[tokio::test]
    async fn a_failure_names_qemus_reason_and_whether_the_source_runs() {
        let failed = json!({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"});
        let (qmp, _fake) = Fake::start(vec![info("active", 1, 2, 1), failed], vec![]).await;
        match migrate_out(&qmp, "unix:/m.sock", &fast(), std::future::pending(), |_| ()).await {
            Err(MigrationError::Failed { reason, source_runs }) => {
                assert_eq!(reason, "Unable to write to socket: Broken pipe");
                assert!(source_runs);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn the_target_waits_for_completion_and_notices_its_qemu_ending() {
        let (qmp, _fake) = Fake::start(vec![json!({"status": "active"}), json!({"status": "completed"})], vec![]).await;
        wait_incoming(&qmp, Duration::from_millis(1)).await.unwrap();
        let (client, server) = UnixStream::pair().unwrap();
        let gone = tokio::spawn(async move {
            let (read, mut write) = server.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(format!("{GREETING}\n").as_bytes()).await.unwrap();
            let line = lines.next_line().await.unwrap().unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
            write.write_all(format!("{}\n", json!({"return": {}, "id": id})).as_bytes()).await.unwrap();
            // The next command (query-migrate) is never answered: QEMU exits.
        });
        let opts = ConnectOptions { connect_timeout: Duration::from_secs(5), command_timeout: Duration::from_secs(5) };
        let qmp = QmpClient::from_stream(client, opts).await.unwrap();
        let result = wait_incoming(&qmp, Duration::from_millis(1)).await;
        assert!(matches!(result, Err(MigrationError::TargetExited)), "{result:?}");
        gone.await.unwrap();
    }
}
