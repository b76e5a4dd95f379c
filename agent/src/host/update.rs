//! A/B system updates of a host booted from the Quantix image (`image/`): install a system image on the inactive
//! system partition, point the next boot at it once, and, on that boot, make it the default once qx-node serves.
//!
//! The boot state is GRUB's environment block ([`GrubEnv`], `update.grubenv`), which `image/grub/grub.cfg` reads:
//! - `qx_default`: the system booted when nothing is pending (`a` or `b`);
//! - `qx_pending`: a system to try on the next boot, once; GRUB moves it to `qx_trying` before booting it;
//! - `qx_trying`: the system on trial. Its qx-node, serving and with its VMs reattached, makes it the default and
//!   clears this ([`Updates::report_healthy`]). If it never does, the update watchdog reboots, GRUB starts
//!   `qx_default` again, and that system's qx-node finds `qx_trying` still set: it records the failed attempt;
//! - `qx_a_version`, `qx_b_version`: what each partition holds, empty for none (or a half-written one);
//! - `qx_health_timeout`: the trial's seconds, passed to the watchdog on the kernel command line.
//!
//! The booted system comes from the kernel command line (`quantix.slot=a|b`), the partitions from their GPT names
//! (`QUANTIX-A`, `QUANTIX-B`) in sysfs, both under the node's host root. Nothing about the target partition
//! changes until the image is fully received and checked; from then on its version stays empty until it is
//! written and read back. `update.json` in the data directory records the last update, so a qx-node stopped at any
//! step finds out on start what happened and says so.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use qx_storage::Cancel;
use qx_vmm::ValidationErrors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::grubenv::{GrubEnv, GrubEnvError};
use super::sysimage::{self, Header, NotAnImage, HEADER_SIZE};
use super::{blocking, now_unix};
use crate::config::UpdateConfig;

const CHUNK: usize = 1 << 20;
/// How long [`report_health_when_serving`] tries its own socket before giving up (and letting the watchdog act).
const SELF_CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// One of the two system partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "a" => Some(Self::A),
            "b" => Some(Self::B),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    /// Its GPT partition name.
    fn partition(self) -> &'static str {
        match self {
            Self::A => "QUANTIX-A",
            Self::B => "QUANTIX-B",
        }
    }

    fn version_var(self) -> &'static str {
        match self {
            Self::A => "qx_a_version",
            Self::B => "qx_b_version",
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::A => "A",
            Self::B => "B",
        })
    }
}

/// How the last update ended, or where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Being written to the inactive partition.
    Installing,
    /// Installed; the next boot tries it once.
    Pending,
    /// Booted and reported healthy: it is the default now.
    Succeeded,
    /// Booted but never reported healthy: the watchdog went back to the previous system.
    RolledBack,
    /// Refused or failed while installing; the boot pointer did not change.
    Failed,
    Cancelled,
}

/// The last update, as `update.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRecord {
    pub version: String,
    pub slot: Slot,
    pub outcome: Outcome,
    /// What happened, for a person.
    pub message: String,
    pub at_unix: i64,
}

/// A system partition and the version it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotVersion {
    pub slot: Slot,
    pub version: String,
}

/// The host's systems for GetNodeInfo, qx-console and UpdateHost's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SystemStatus {
    /// Why this host takes no A/B updates (not booted from the Quantix image); `None` on an image host.
    pub unavailable: Option<String>,
    pub active: Option<SlotVersion>,
    /// The other partition, when it holds a complete system.
    pub fallback: Option<SlotVersion>,
    /// The system the next boot tries once.
    pub pending: Option<Slot>,
    /// This boot is an update's trial and has not reported healthy yet.
    pub trial: bool,
    pub last_update: Option<UpdateRecord>,
}

/// Where UpdateHost's image comes from.
#[derive(Debug)]
pub enum UpdateSource {
    /// A file on this host.
    Path(PathBuf),
    /// The image's bytes in order; the channel closing ends the image.
    Stream(mpsc::Receiver<Vec<u8>>),
}

/// An UpdateHost request; see `UpdateHostStart` in host.proto.
#[derive(Debug)]
pub struct UpdateRequest {
    pub source: UpdateSource,
    pub size: u64,
    pub sha256: String,
    /// Hex ed25519 signature of the 32-byte SHA-256 digest; required when `update.public_key` is set.
    pub signature: String,
    pub reboot: bool,
    pub confirm_running_vms: bool,
    /// 0: `update.health_timeout_seconds`.
    pub health_timeout_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Receiving,
    Verifying,
    Writing,
    Checking,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpdateProgress {
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
}

/// The caller's handle on one UpdateHost: progress to watch, a flag to cancel it.
#[derive(Debug, Clone, Default)]
pub struct UpdateControl {
    progress: std::sync::Arc<watch::Sender<UpdateProgress>>,
    cancel: Cancel,
}

impl UpdateControl {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn subscribe(&self) -> watch::Receiver<UpdateProgress> {
        self.progress.subscribe()
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    fn report(&self, phase: Phase, done: u64, total: u64) {
        self.progress.send_replace(UpdateProgress { phase, done, total });
    }

    fn check(&self) -> Result<(), UpdateError> {
        if self.cancel.is_cancelled() {
            Err(UpdateError::Cancelled)
        } else {
            Ok(())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("this host takes no A/B updates: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Invalid(ValidationErrors),
    #[error("another update is being installed")]
    Busy,
    #[error("this system is on trial after an update and has not reported healthy yet; update it once it has")]
    OnTrial,
    #[error("{} running; stop or migrate them first, or confirm with confirm_running_vms", super::vms_text(*running))]
    VmsRunning { running: usize },
    #[error("{field}: {problem}")]
    Refused { field: &'static str, problem: String },
    #[error("cancelled")]
    Cancelled,
    #[error("the update key {path} cannot be used: {problem}")]
    Key { path: PathBuf, problem: String },
    #[error("system {slot} (partition {partition}) was not found in {dir}")]
    NoPartition { slot: Slot, partition: &'static str, dir: PathBuf },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("system {slot} reads back differently from what was written (SHA-256 {actual}); it is left empty")]
    WriteMismatch { slot: Slot, actual: String },
    #[error("the image changed while it was written (its payload's SHA-256 is {actual}); system {slot} is left empty")]
    SourceChanged { slot: Slot, actual: String },
    #[error(transparent)]
    GrubEnv(#[from] GrubEnvError),
}

impl UpdateError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    fn refused(field: &'static str, problem: impl Into<String>) -> Self {
        Self::Refused { field, problem: problem.into() }
    }
}

/// What booted, from the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Boot {
    slot: Slot,
    trial: bool,
}

/// The update backend. One per node; see the module docs.
#[derive(Debug)]
pub struct Updates {
    paths: Paths,
    /// One install at a time.
    installing: tokio::sync::Mutex<()>,
}

/// Where the update backend reads and writes; cheap to clone into blocking tasks.
#[derive(Debug, Clone)]
struct Paths {
    config: UpdateConfig,
    host_root: PathBuf,
    record_file: PathBuf,
    staging_dir: PathBuf,
}

impl Updates {
    /// Finishes or explains an update a stopped qx-node left behind (see `reconcile`).
    pub async fn open(config: UpdateConfig, host_root: PathBuf, data_dir: &Path) -> Self {
        let paths = Paths {
            config,
            host_root,
            record_file: data_dir.join("update.json"),
            staging_dir: data_dir.join("update"),
        };
        let p = paths.clone();
        blocking(move || reconcile(&p.record_file, &p.staging_dir, &p.config.grubenv)).await;
        Self { paths, installing: tokio::sync::Mutex::new(()) }
    }

    /// The systems, the pending one and the last update; `unavailable` says why when this is no image host.
    pub async fn status(&self) -> SystemStatus {
        let paths = self.paths.clone();
        blocking(move || paths.status()).await
    }
}

impl Paths {
    fn boot(&self) -> Result<Boot, UpdateError> {
        let path = self.host_root.join("proc/cmdline");
        let cmdline = std::fs::read_to_string(&path)
            .map_err(|e| UpdateError::Unavailable(format!("cannot read {}: {e}", path.display())))?;
        let mut slot = None;
        let mut trial = false;
        for arg in cmdline.split_whitespace() {
            if let Some(s) = arg.strip_prefix("quantix.slot=") {
                slot = Slot::parse(s);
            } else if arg == "quantix.pending=1" {
                trial = true;
            }
        }
        let slot = slot.ok_or_else(|| {
            UpdateError::Unavailable(
                "the kernel command line has no quantix.slot=a|b (not booted by the Quantix image's GRUB)".into(),
            )
        })?;
        Ok(Boot { slot, trial })
    }

    fn env(&self) -> Result<GrubEnv, UpdateError> {
        GrubEnv::read(&self.config.grubenv).map_err(|e| UpdateError::Unavailable(crate::grpc::error_chain(&e)))
    }

    fn status(&self) -> SystemStatus {
        let last_update = read_record(&self.record_file);
        let (boot, env) = match self.boot().and_then(|boot| Ok((boot, self.env()?))) {
            Ok(found) => found,
            Err(e) => return SystemStatus { unavailable: Some(e.to_string()), last_update, ..SystemStatus::default() },
        };
        let version = |slot: Slot| env.get(slot.version_var()).to_owned();
        let other = boot.slot.other();
        SystemStatus {
            unavailable: None,
            active: Some(SlotVersion { slot: boot.slot, version: version(boot.slot) }),
            fallback: Some(SlotVersion { slot: other, version: version(other) }).filter(|s| !s.version.is_empty()),
            pending: Slot::parse(env.get("qx_pending")),
            trial: boot.trial && env.get("qx_trying") == boot.slot.name(),
            last_update,
        }
    }

    /// The device of `slot`'s partition, found by GPT name in sysfs under the host root.
    fn partition(&self, slot: Slot) -> Result<PathBuf, UpdateError> {
        let dir = self.host_root.join("sys/class/block");
        let entries = std::fs::read_dir(&dir).map_err(UpdateError::io(format!("cannot read {}", dir.display())))?;
        for entry in entries.flatten() {
            let Ok(uevent) = std::fs::read_to_string(entry.path().join("uevent")) else { continue };
            if uevent.lines().any(|line| line == format!("PARTNAME={}", slot.partition())) {
                if let Some(name) = uevent.lines().find_map(|line| line.strip_prefix("DEVNAME=")) {
                    return Ok(self.host_root.join("dev").join(name));
                }
            }
        }
        Err(UpdateError::NoPartition { slot, partition: slot.partition(), dir })
    }
}

impl Updates {
    /// Called once qx-node serves its API with its VMs reattached. On an update's trial boot this makes the
    /// booted system the default; on the system booted after a trial that never got here, it records the failed
    /// attempt and leaves the failed system out of GRUB's choices.
    pub async fn report_healthy(&self) -> Result<(), UpdateError> {
        let Ok(boot) = self.paths.boot() else { return Ok(()) };
        let (grubenv, record_file) = (self.paths.config.grubenv.clone(), self.paths.record_file.clone());
        blocking(move || {
            let mut env = GrubEnv::read(&grubenv)?;
            let Some(trying) = Slot::parse(env.get("qx_trying")) else { return Ok(()) };
            let record = read_record(&record_file);
            let version = env.get(trying.version_var()).to_owned();
            let (outcome, message) = if trying == boot.slot {
                env.set("qx_default", boot.slot.name());
                env.set("qx_trying", "");
                env.write(&grubenv)?;
                info!(system = %boot.slot, %version, "update: this system reported healthy and is the default now");
                (Outcome::Succeeded, format!("system {} booted, reported healthy and is the default", boot.slot))
            } else {
                let timeout = env.get("qx_health_timeout").to_owned();
                env.set("qx_trying", "");
                env.set(trying.version_var(), "");
                env.write(&grubenv)?;
                error!(failed = %trying, %version, running = %boot.slot, "update: the new system never reported healthy; back on the previous one");
                (
                    Outcome::RolledBack,
                    format!(
                        "system {trying} did not report healthy within {timeout} s; the watchdog rebooted into system {}",
                        boot.slot
                    ),
                )
            };
            let version = record.filter(|r| r.slot == trying).map_or(version, |r| r.version);
            write_record(&record_file, &UpdateRecord { version, slot: trying, outcome, message, at_unix: now_unix() })
        })
        .await
    }

    /// Installs an image on the inactive system and points the next boot at it once; see UpdateHost in
    /// host.proto. `running_vms` is how many VMs run now (a reboot is refused while any do, unless confirmed).
    /// Returns the status after the install; the caller reboots when asked to.
    pub async fn install(
        &self,
        request: UpdateRequest,
        running_vms: usize,
        ctl: &UpdateControl,
    ) -> Result<SystemStatus, UpdateError> {
        let _one = self.installing.try_lock().map_err(|_| UpdateError::Busy)?;
        let boot = self.paths.boot()?;
        let env = self.paths.env()?;
        validate(&request, self.paths.config.public_key.is_some())?;
        if boot.trial && env.get("qx_trying") == boot.slot.name() {
            return Err(UpdateError::OnTrial);
        }
        if request.reboot && running_vms > 0 && !request.confirm_running_vms {
            return Err(UpdateError::VmsRunning { running: running_vms });
        }
        let key = match &self.paths.config.public_key {
            Some(path) => Some(read_key(path)?),
            None => None,
        };
        let target = boot.slot.other();
        let device = self.paths.partition(target)?;
        let timeout = match request.health_timeout_seconds {
            0 => self.paths.config.health_timeout_seconds,
            t => t,
        };

        let (mut file, staged) = match request.source {
            UpdateSource::Path(path) => {
                let file = File::open(&path)
                    .map_err(|e| UpdateError::refused("path", format!("{} cannot be opened: {e}", path.display())))?;
                (file, None)
            }
            UpdateSource::Stream(chunks) => {
                let staged = self.paths.staging_dir.join("incoming.qxi");
                (receive(chunks, &staged, request.size, ctl).await?, Some(staged))
            }
        };
        let result = {
            let (ctl, sha256, signature, size) = (ctl.clone(), request.sha256, request.signature, request.size);
            let (grubenv, record_file) = (self.paths.config.grubenv.clone(), self.paths.record_file.clone());
            blocking(move || {
                let header = verify(&mut file, size, &sha256, &signature, key.as_ref(), &device, &ctl)?;
                install_verified(&mut file, &header, target, &device, &grubenv, &record_file, timeout, &ctl)
            })
            .await
        };
        if let Some(staged) = staged {
            let _ = tokio::fs::remove_file(staged).await;
        }
        result?;
        ctl.report(Phase::Done, request.size, request.size);
        Ok(self.status().await)
    }
}

fn validate(request: &UpdateRequest, key_configured: bool) -> Result<(), UpdateError> {
    let mut problems = Vec::new();
    let mut add = |field: &str, value: &dyn std::fmt::Display, problem: &str| {
        problems.push(qx_vmm::spec::FieldError {
            field: field.into(),
            value: value.to_string(),
            problem: problem.into(),
        })
    };
    if request.size <= HEADER_SIZE {
        add("size", &request.size, "is too small for a system image (a 4096-byte header and a payload)");
    }
    if !sysimage::is_sha256(&request.sha256) {
        add("sha256", &request.sha256, "is not 64 hex digits");
    }
    if key_configured && !(request.signature.len() == 128 && request.signature.bytes().all(|b| b.is_ascii_hexdigit())) {
        add("signature", &request.signature, "must be 128 hex digits (ed25519) since update.public_key is set");
    }
    if request.health_timeout_seconds != 0 && !(10..=86_400).contains(&request.health_timeout_seconds) {
        add("health_timeout_seconds", &request.health_timeout_seconds, "is outside 10..=86400 (0: the configured one)");
    }
    if let UpdateSource::Path(path) = &request.source {
        if !path.is_absolute() {
            add("path", &path.display(), "is not an absolute path");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(UpdateError::Invalid(ValidationErrors(problems)))
    }
}

/// Receives the stream into `staged`, refusing one that is longer or shorter than `size`.
async fn receive(
    mut chunks: mpsc::Receiver<Vec<u8>>,
    staged: &Path,
    size: u64,
    ctl: &UpdateControl,
) -> Result<File, UpdateError> {
    use tokio::io::AsyncWriteExt;
    let dir = staged.parent().unwrap_or(Path::new("."));
    tokio::fs::create_dir_all(dir).await.map_err(UpdateError::io(format!("cannot create {}", dir.display())))?;
    let write_error = UpdateError::io(format!("cannot write {}", staged.display()));
    // Read back for verification, so readable too.
    let mut out = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(staged)
        .await
        .map_err(write_error)?;
    let mut received = 0u64;
    let result = async {
        ctl.report(Phase::Receiving, 0, size);
        while let Some(chunk) = chunks.recv().await {
            ctl.check()?;
            received += chunk.len() as u64;
            if received > size {
                return Err(UpdateError::refused("size", format!("is {size}, but the stream carried more")));
            }
            out.write_all(&chunk).await.map_err(UpdateError::io(format!("cannot write {}", staged.display())))?;
            ctl.report(Phase::Receiving, received, size);
        }
        ctl.check()?;
        if received < size {
            return Err(UpdateError::refused(
                "size",
                format!("is {size}, but the stream ended after {received} bytes"),
            ));
        }
        out.flush().await.map_err(UpdateError::io(format!("cannot write {}", staged.display())))?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        drop(out);
        let _ = tokio::fs::remove_file(staged).await;
        return Err(e);
    }
    let file = out.into_std().await;
    Ok(file)
}

/// Everything about the image before anything is written: its size, its header and payload, its SHA-256, its
/// signature, and that it fits the target partition.
fn verify(
    file: &mut File,
    size: u64,
    sha256: &str,
    signature: &str,
    key: Option<&Vec<u8>>,
    device: &Path,
    ctl: &UpdateControl,
) -> Result<Header, UpdateError> {
    let read_error = || UpdateError::io("cannot read the image");
    let actual_size = file.metadata().map_err(read_error())?.len();
    if actual_size != size {
        return Err(UpdateError::refused("size", format!("is {size}, but the image has {actual_size} bytes")));
    }
    let mut start = vec![0u8; HEADER_SIZE as usize + 2048];
    file.seek(SeekFrom::Start(0)).map_err(read_error())?;
    let n = read_full(file, &mut start).map_err(read_error())?;
    let not_an_image = |e: NotAnImage| UpdateError::refused("image", e.to_string());
    let header = Header::parse(&start[..n]).map_err(not_an_image)?;
    if header.payload_size + HEADER_SIZE != size {
        return Err(not_an_image(NotAnImage(format!(
            "its header says {} payload bytes, the file has {}",
            header.payload_size,
            size.saturating_sub(HEADER_SIZE)
        ))));
    }
    sysimage::check_payload(&start[HEADER_SIZE as usize..n], header.payload_size).map_err(not_an_image)?;
    let capacity = device_size(device)?;
    if header.payload_size > capacity {
        return Err(UpdateError::refused(
            "image",
            format!(
                "its system needs {} bytes, the partition {} has {capacity}",
                header.payload_size,
                device.display()
            ),
        ));
    }

    file.seek(SeekFrom::Start(0)).map_err(read_error())?;
    let digest = hash_with_progress(file, size, Phase::Verifying, ctl, |_| Ok(()))?;
    let actual = hex(&digest);
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(UpdateError::refused("sha256", format!("is {sha256}, but the image's is {actual}")));
    }
    if let Some(key) = key {
        let signature = unhex(signature).unwrap_or_default();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
            .verify(&digest, &signature)
            .map_err(|_| UpdateError::refused("signature", "does not verify with update.public_key"))?;
    }
    Ok(header)
}

/// Writes the verified payload to `target`, reads it back, and points the next boot at it.
#[allow(clippy::too_many_arguments)]
fn install_verified(
    file: &mut File,
    header: &Header,
    target: Slot,
    device: &Path,
    grubenv: &Path,
    record_file: &Path,
    timeout: u32,
    ctl: &UpdateControl,
) -> Result<(), UpdateError> {
    ctl.check()?;
    let record = |outcome, message: String| UpdateRecord {
        version: header.version.clone(),
        slot: target,
        outcome,
        message,
        at_unix: now_unix(),
    };
    // From here on the target holds no complete system until it is read back: GRUB must not offer it.
    let mut env = GrubEnv::read(grubenv)?;
    env.set(target.version_var(), "");
    if env.get("qx_pending") == target.name() {
        env.set("qx_pending", "");
    }
    env.write(grubenv)?;
    write_record(record_file, &record(Outcome::Installing, format!("writing system {target}")))?;
    info!(system = %target, version = %header.version, device = %device.display(), "update: writing");

    let written = write_payload(file, header, target, device, ctl);
    if let Err(e) = written {
        let (outcome, what) = match e {
            UpdateError::Cancelled => (Outcome::Cancelled, "cancelled"),
            _ => (Outcome::Failed, "failed"),
        };
        let message =
            format!("{what} while writing system {target}, which is left empty: {}", crate::grpc::error_chain(&e));
        warn!(system = %target, "update: {message}");
        if let Err(record_error) = write_record(record_file, &record(outcome, message)) {
            warn!(error = %crate::grpc::error_chain(&record_error), "cannot record the update's outcome");
        }
        return Err(e);
    }

    let mut env = GrubEnv::read(grubenv)?;
    env.set(target.version_var(), header.version.as_str());
    env.set("qx_pending", target.name());
    env.set("qx_health_timeout", timeout.to_string());
    env.write(grubenv)?;
    info!(system = %target, version = %header.version, "update: installed; the next boot tries it once");
    write_record(
        record_file,
        &record(
            Outcome::Pending,
            format!("installed on system {target}; the next boot tries it (health timeout {timeout} s)"),
        ),
    )
}

fn write_payload(
    file: &mut File,
    header: &Header,
    target: Slot,
    device: &Path,
    ctl: &UpdateControl,
) -> Result<(), UpdateError> {
    let device_error = || UpdateError::io(format!("cannot write {}", device.display()));
    let mut out = std::fs::OpenOptions::new().write(true).open(device).map_err(device_error())?;
    file.seek(SeekFrom::Start(HEADER_SIZE)).map_err(UpdateError::io("cannot read the image"))?;
    let digest =
        hash_with_progress(&mut file.take(header.payload_size), header.payload_size, Phase::Writing, ctl, |chunk| {
            out.write_all(chunk).map_err(device_error())
        })?;
    if hex(&digest) != header.payload_sha256 {
        return Err(UpdateError::SourceChanged { slot: target, actual: hex(&digest) });
    }
    out.sync_all().map_err(device_error())?;
    drop(out);

    // Read back what the partition holds, not what the page cache remembers.
    let mut back = File::open(device).map_err(UpdateError::io(format!("cannot read {}", device.display())))?;
    let _ = rustix::fs::fadvise(&back, 0, None, rustix::fs::Advice::DontNeed);
    let digest = hash_with_progress(
        &mut (&mut back).take(header.payload_size),
        header.payload_size,
        Phase::Checking,
        ctl,
        |_| Ok(()),
    )?;
    if hex(&digest) != header.payload_sha256 {
        return Err(UpdateError::WriteMismatch { slot: target, actual: hex(&digest) });
    }
    Ok(())
}

/// Reads `total` bytes from `input`, hashing them and handing each chunk to `sink`, reporting progress.
fn hash_with_progress(
    input: &mut impl Read,
    total: u64,
    phase: Phase,
    ctl: &UpdateControl,
    mut sink: impl FnMut(&[u8]) -> Result<(), UpdateError>,
) -> Result<[u8; 32], UpdateError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    ctl.report(phase, 0, total);
    while done < total {
        ctl.check()?;
        let n = input.read(&mut buf).map_err(UpdateError::io("cannot read the image"))?;
        if n == 0 {
            return Err(UpdateError::Io {
                what: format!("the image ended after {done} of {total} bytes"),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        hasher.update(&buf[..n]);
        sink(&buf[..n])?;
        done += n as u64;
        ctl.report(phase, done, total);
    }
    Ok(hasher.finalize().into())
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            m => n += m,
        }
    }
    Ok(n)
}

/// A block device's or file's size in bytes.
fn device_size(device: &Path) -> Result<u64, UpdateError> {
    let mut f = File::open(device).map_err(UpdateError::io(format!("cannot open {}", device.display())))?;
    f.seek(SeekFrom::End(0)).map_err(UpdateError::io(format!("cannot size {}", device.display())))
}

fn read_key(path: &Path) -> Result<Vec<u8>, UpdateError> {
    let key_error = |problem: String| UpdateError::Key { path: path.to_owned(), problem };
    let text = std::fs::read_to_string(path).map_err(|e| key_error(e.to_string()))?;
    unhex(text.trim())
        .filter(|key| key.len() == 32)
        .ok_or_else(|| key_error("it must hold an ed25519 public key as 64 hex digits".into()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

fn read_record(path: &Path) -> Option<UpdateRecord> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes)
        .map_err(|e| warn!(path = %path.display(), error = %e, "ignoring an unreadable update record"))
        .ok()
}

fn write_record(path: &Path, record: &UpdateRecord) -> Result<(), UpdateError> {
    let mut bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
    bytes.push(b'\n');
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(UpdateError::io(format!("cannot create {}", dir.display())))?;
    }
    qx_vmm::persist::write_atomic(path, &bytes).map_err(UpdateError::io(format!("cannot write {}", path.display())))
}

/// At start: an install a stopped qx-node left behind either finished (the boot pointer names it: recorded as
/// pending) or did not (its partition's version is still empty: recorded as failed). Staged images are removed.
fn reconcile(record_file: &Path, staging_dir: &Path, grubenv: &Path) {
    let _ = std::fs::remove_dir_all(staging_dir);
    let Some(mut record) = read_record(record_file) else { return };
    if record.outcome != Outcome::Installing {
        return;
    }
    let finished = GrubEnv::read(grubenv)
        .map(|env| env.get("qx_pending") == record.slot.name() && env.get(record.slot.version_var()) == record.version)
        .unwrap_or(false);
    (record.outcome, record.message) = if finished {
        (Outcome::Pending, format!("installed on system {}; the next boot tries it", record.slot))
    } else {
        (
            Outcome::Failed,
            format!(
                "qx-node stopped while writing system {}, which is left empty; install the update again",
                record.slot
            ),
        )
    };
    record.at_unix = now_unix();
    info!(system = %record.slot, outcome = ?record.outcome, "update: found an install an earlier qx-node left");
    if let Err(e) = write_record(record_file, &record) {
        warn!(error = %crate::grpc::error_chain(&e), "cannot record the update's outcome");
    }
}

/// Waits until qx-node answers gRPC health checks on its own socket, then reports the system healthy: a trial boot
/// becomes the default only when the API really serves. Spawned by qx-node's main once the node is open (its VMs
/// are reattached by then).
pub async fn report_health_when_serving(updates: &Updates, socket: PathBuf) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let deadline = tokio::time::Instant::now() + SELF_CHECK_TIMEOUT;
    loop {
        let serving = async {
            let mut client = HealthClient::new(crate::client::channel(socket.clone()).await.ok()?);
            let reply = client.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?;
            Some(reply.into_inner().status == ServingStatus::Serving as i32)
        };
        if serving.await == Some(true) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            error!("qx-node does not answer on its own socket; not reporting this system healthy");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Err(e) = updates.report_healthy().await {
        error!(error = %crate::grpc::error_chain(&e), "cannot report this system healthy");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::sysimage::tests::ext4_start;
    use crate::host::sysimage::PAYLOAD_LABEL;

    const PAYLOAD: u64 = 1 << 20;

    /// A host root booted from `booted` (with `quantix.pending=1` when `trial`), partitions A and B as 4 MiB files,
    /// and a GRUB environment with A holding version 1.
    struct Fixture {
        dir: tempfile::TempDir,
        updates: Updates,
    }

    impl Fixture {
        async fn new(cmdline: &str, public_key: Option<PathBuf>) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            std::fs::create_dir_all(root.join("proc")).unwrap();
            std::fs::write(root.join("proc/cmdline"), format!("{cmdline} quiet\n")).unwrap();
            for (dev, part) in [("vda2", "QUANTIX-A"), ("vda3", "QUANTIX-B")] {
                let sys = root.join("sys/class/block").join(dev);
                std::fs::create_dir_all(&sys).unwrap();
                std::fs::write(
                    sys.join("uevent"),
                    format!("MAJOR=254\nDEVNAME={dev}\nDEVTYPE=partition\nPARTNAME={part}\n"),
                )
                .unwrap();
                std::fs::create_dir_all(root.join("dev")).unwrap();
                let f = File::create(root.join("dev").join(dev)).unwrap();
                f.set_len(4 * PAYLOAD).unwrap();
            }
            let grubenv = dir.path().join("grubenv");
            let mut env = GrubEnv::default();
            for (k, v) in [
                ("qx_default", "a"),
                ("qx_pending", ""),
                ("qx_trying", ""),
                ("qx_a_version", "1"),
                ("qx_b_version", ""),
            ] {
                env.set(k, v);
            }
            env.write(&grubenv).unwrap();
            let config = UpdateConfig { grubenv, health_timeout_seconds: 300, public_key };
            let updates = Updates::open(config, root, &dir.path().join("data")).await;
            Self { dir, updates }
        }

        fn env(&self) -> GrubEnv {
            GrubEnv::read(&self.dir.path().join("grubenv")).unwrap()
        }

        fn partition_b(&self) -> Vec<u8> {
            std::fs::read(self.dir.path().join("root/dev/vda3")).unwrap()
        }

        fn write_image(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    /// A system image of `version` with a 1 MiB payload.
    fn image(version: &str) -> Vec<u8> {
        let mut payload = ext4_start(PAYLOAD, PAYLOAD_LABEL);
        payload.resize(PAYLOAD as usize, 0x5a);
        let header =
            Header { version: version.into(), payload_size: PAYLOAD, payload_sha256: hex(&Sha256::digest(&payload)) };
        let mut bytes = header.render();
        bytes.extend_from_slice(&payload);
        bytes
    }

    fn request(source: UpdateSource, bytes: &[u8]) -> UpdateRequest {
        UpdateRequest {
            source,
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
            signature: String::new(),
            reboot: false,
            confirm_running_vms: false,
            health_timeout_seconds: 0,
        }
    }

    fn stream_of(bytes: &[u8]) -> UpdateSource {
        let (tx, rx) = mpsc::channel(64);
        for chunk in bytes.chunks(300_000) {
            tx.try_send(chunk.to_vec()).unwrap();
        }
        UpdateSource::Stream(rx)
    }

    #[tokio::test]
    async fn installs_on_the_inactive_system_and_points_the_next_boot_there_once() {
        let f = Fixture::new("quantix.slot=a", None).await;
        let bytes = image("2.0");
        let ctl = UpdateControl::new();
        let status = f.updates.install(request(stream_of(&bytes), &bytes), 0, &ctl).await.unwrap();
        assert_eq!(&f.partition_b()[..PAYLOAD as usize], &bytes[HEADER_SIZE as usize..]);
        let env = f.env();
        assert_eq!((env.get("qx_pending"), env.get("qx_b_version"), env.get("qx_default")), ("b", "2.0", "a"));
        assert_eq!(env.get("qx_health_timeout"), "300");
        assert_eq!(status.active, Some(SlotVersion { slot: Slot::A, version: "1".into() }));
        assert_eq!(status.fallback, Some(SlotVersion { slot: Slot::B, version: "2.0".into() }));
        assert_eq!(status.pending, Some(Slot::B));
        let last = status.last_update.unwrap();
        assert_eq!((last.outcome, last.version.as_str(), last.slot), (Outcome::Pending, "2.0", Slot::B));
        assert_eq!(ctl.subscribe().borrow().phase, Phase::Done);
        assert!(!f.dir.path().join("data/update/incoming.qxi").exists(), "the staged image is removed");
    }

    #[tokio::test]
    async fn bad_images_are_refused_before_anything_changes() {
        let f = Fixture::new("quantix.slot=a", None).await;
        let before = (f.env(), f.partition_b());
        let good = image("2.0");
        let path = f.write_image("good.qxi", &good);
        let refused = |r: Result<SystemStatus, UpdateError>| match r {
            Err(UpdateError::Refused { field, problem }) => format!("{field}: {problem}"),
            other => panic!("expected a refusal, got {other:?}"),
        };
        let ctl = UpdateControl::new();

        let mut wrong_sha = request(UpdateSource::Path(path.clone()), &good);
        wrong_sha.sha256 = "0".repeat(64);
        assert!(refused(f.updates.install(wrong_sha, 0, &ctl).await).starts_with("sha256: is 0000"));

        let mut wrong_size = request(UpdateSource::Path(path.clone()), &good);
        wrong_size.size += 1;
        assert!(refused(f.updates.install(wrong_size, 0, &ctl).await).contains("but the image has"));

        let truncated = request(stream_of(&good[..good.len() - 10]), &good);
        assert!(refused(f.updates.install(truncated, 0, &ctl).await).contains("the stream ended after"));

        let mut longer = good.clone();
        longer.push(0);
        let long = UpdateRequest { source: stream_of(&longer), ..request(UpdateSource::Path(path.clone()), &good) };
        assert!(refused(f.updates.install(long, 0, &ctl).await).contains("carried more"));

        let not_an_image = vec![7u8; 2 * PAYLOAD as usize];
        let other = f.write_image("other.bin", &not_an_image);
        let message = refused(f.updates.install(request(UpdateSource::Path(other), &not_an_image), 0, &ctl).await);
        assert!(message.starts_with("image: not a Quantix system image"), "{message}");

        let mut bad_payload = good.clone();
        bad_payload[HEADER_SIZE as usize + 1024 + 0x78] = b'X'; // the filesystem label
        let bad = f.write_image("bad.qxi", &bad_payload);
        let message = refused(f.updates.install(request(UpdateSource::Path(bad), &bad_payload), 0, &ctl).await);
        assert!(message.contains("labelled \"Xuantix-system\""), "{message}");

        let invalid =
            UpdateRequest { sha256: "xyz".into(), health_timeout_seconds: 5, ..request(stream_of(&good), &good) };
        match f.updates.install(invalid, 0, &ctl).await {
            Err(UpdateError::Invalid(e)) => assert_eq!(
                e.to_string(),
                "sha256: \"xyz\" is not 64 hex digits; health_timeout_seconds: \"5\" is outside 10..=86400 (0: the configured one)"
            ),
            other => panic!("{other:?}"),
        }
        let reboot = UpdateRequest { reboot: true, ..request(UpdateSource::Path(path), &good) };
        assert!(matches!(f.updates.install(reboot, 2, &ctl).await, Err(UpdateError::VmsRunning { running: 2 })));

        assert_eq!((f.env(), f.partition_b()), before, "neither the boot pointer nor a system changed");
        assert_eq!(f.updates.status().await.last_update, None);
    }

    #[tokio::test]
    async fn a_configured_key_requires_a_good_signature() {
        use ring::signature::KeyPair;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("update.pub");
        std::fs::write(&key_file, format!("{}\n", hex(key.public_key().as_ref()))).unwrap();
        let f = Fixture::new("quantix.slot=b", Some(key_file)).await;
        let bytes = image("3");
        let path = f.write_image("signed.qxi", &bytes);
        let ctl = UpdateControl::new();

        let unsigned = request(UpdateSource::Path(path.clone()), &bytes);
        assert!(matches!(f.updates.install(unsigned, 0, &ctl).await, Err(UpdateError::Invalid(_))));
        let other = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let other = ring::signature::Ed25519KeyPair::from_pkcs8(other.as_ref()).unwrap();
        let digest = Sha256::digest(&bytes);
        let forged = UpdateRequest {
            signature: hex(other.sign(&digest).as_ref()),
            ..request(UpdateSource::Path(path.clone()), &bytes)
        };
        match f.updates.install(forged, 0, &ctl).await {
            Err(UpdateError::Refused { field: "signature", .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(f.env().get("qx_pending"), "");
        let signed =
            UpdateRequest { signature: hex(key.sign(&digest).as_ref()), ..request(UpdateSource::Path(path), &bytes) };
        f.updates.install(signed, 0, &ctl).await.unwrap();
        assert_eq!((f.env().get("qx_pending"), f.env().get("qx_a_version")), ("a", "3"));
    }

    #[tokio::test]
    async fn cancelling_leaves_the_target_empty_and_says_so() {
        let f = Fixture::new("quantix.slot=a", None).await;
        let bytes = image("2.0");
        let ctl = UpdateControl::new();
        ctl.cancel();
        let result = f.updates.install(request(stream_of(&bytes), &bytes), 0, &ctl).await;
        assert!(matches!(result, Err(UpdateError::Cancelled)), "{result:?}");
        assert_eq!(f.env().get("qx_pending"), "");
    }

    #[tokio::test]
    async fn a_healthy_trial_becomes_the_default() {
        let f = Fixture::new("quantix.slot=b quantix.pending=1", None).await;
        let mut env = f.env();
        env.set("qx_trying", "b");
        env.set("qx_b_version", "2.0");
        env.write(&f.dir.path().join("grubenv")).unwrap();
        let status = f.updates.status().await;
        assert!(status.trial);
        f.updates.report_healthy().await.unwrap();
        let env = f.env();
        assert_eq!((env.get("qx_default"), env.get("qx_trying")), ("b", ""));
        let status = f.updates.status().await;
        assert!(!status.trial);
        assert_eq!(status.fallback, Some(SlotVersion { slot: Slot::A, version: "1".into() }));
        let last = status.last_update.unwrap();
        assert_eq!((last.outcome, last.slot, last.version.as_str()), (Outcome::Succeeded, Slot::B, "2.0"));
    }

    #[tokio::test]
    async fn the_previous_system_records_a_trial_that_never_reported() {
        let f = Fixture::new("quantix.slot=a", None).await;
        let mut env = f.env();
        env.set("qx_trying", "b");
        env.set("qx_b_version", "2.0-broken");
        env.set("qx_health_timeout", "30");
        env.write(&f.dir.path().join("grubenv")).unwrap();
        f.updates.report_healthy().await.unwrap();
        let env = f.env();
        assert_eq!((env.get("qx_default"), env.get("qx_trying"), env.get("qx_b_version")), ("a", "", ""));
        let status = f.updates.status().await;
        assert_eq!(status.fallback, None, "the failed system is not offered as a fallback");
        let last = status.last_update.unwrap();
        assert_eq!((last.outcome, last.slot, last.version.as_str()), (Outcome::RolledBack, Slot::B, "2.0-broken"));
        assert!(last.message.contains("did not report healthy within 30 s"), "{}", last.message);
    }

    #[tokio::test]
    async fn an_install_cut_short_by_a_stopped_daemon_is_explained_at_start() {
        let f = Fixture::new("quantix.slot=a", None).await;
        let record_file = f.dir.path().join("data/update.json");
        let installing = UpdateRecord {
            version: "2.0".into(),
            slot: Slot::B,
            outcome: Outcome::Installing,
            message: String::new(),
            at_unix: 1,
        };
        write_record(&record_file, &installing).unwrap();
        let config = f.updates.paths.config.clone();
        let reopened = Updates::open(config.clone(), f.dir.path().join("root"), &f.dir.path().join("data")).await;
        let last = reopened.status().await.last_update.unwrap();
        assert_eq!(last.outcome, Outcome::Failed);
        assert!(last.message.contains("qx-node stopped while writing system B"), "{}", last.message);

        // Stopped after the boot pointer was written: the install is finished.
        write_record(&record_file, &installing).unwrap();
        let mut env = f.env();
        env.set("qx_pending", "b");
        env.set("qx_b_version", "2.0");
        env.write(&config.grubenv).unwrap();
        let reopened = Updates::open(config, f.dir.path().join("root"), &f.dir.path().join("data")).await;
        assert_eq!(reopened.status().await.last_update.unwrap().outcome, Outcome::Pending);
    }

    #[tokio::test]
    async fn off_the_image_updates_are_unavailable() {
        let f = Fixture::new("root=/dev/sda1", None).await;
        let status = f.updates.status().await;
        assert!(status.unavailable.unwrap().contains("no quantix.slot"));
        let bytes = image("2");
        let result = f.updates.install(request(stream_of(&bytes), &bytes), 0, &UpdateControl::new()).await;
        assert!(matches!(result, Err(UpdateError::Unavailable(_))), "{result:?}");
    }
}
