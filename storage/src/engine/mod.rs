//! The image engine: sparse-aware copy, import with verification, SHA-256, zeroing, creating and resizing raw
//! images, on threads of its own so tokio's runtime threads never block on disk I/O.
//!
//! A copy walks the source's data extents (SEEK_DATA/SEEK_HOLE; holes stay holes) and moves them by the fastest
//! mechanism that applies: reflink, `copy_file_range` or the io_uring pipeline, as a [`CopyPlan`] says; a pool
//! chooses its plan by a short measurement ([`Engine::calibrate`], see `plan.rs`). Each engine thread owns one ring
//! and runs one operation at a time; operations queue for a free thread. The async methods hand an operation to a thread and await
//! its result. Dropping the returned future cancels the operation; either way (cancelled, failed) the operation
//! removes what it wrote: it writes to a temporary name in the destination directory and renames on success only.

mod control;
mod ops;
mod plan;
mod ring;
mod syscalls;

use std::fmt;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use control::{Cancel, OpControl, Progress};
use control::{CancelOnDrop, JobCtl};
use ops::Worker;
pub use plan::{Calibration, CalibrationKey, CopyPlan, DataMethod, Mechanism, Sample, UringTuning};

use crate::atomic::AtomicError;
use crate::validate::{Invalid, Problems};

/// How copies move data, in [`EngineConfig::copy_method`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// Measured per pool on first use ([`Engine::calibrate`]) and cached with the pool. Default.
    #[default]
    Auto,
    /// `copy_file_range`, always (io_uring where it does not apply, and for copies that hash).
    CopyFileRange,
    /// The io_uring pipeline with this config's `direct`, `block_size` and `queue_depth`, always.
    Uring,
}

/// Engine settings. With `copy_method: auto` (the default) a pool measures which mechanism copies fastest on its
/// filesystem and the io_uring settings below serve only operations outside pools and copies before the first
/// measurement; set `copy_method` to fix the choice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Engine threads, each with its own ring, each running one operation at a time. Default 2: a long copy does
    /// not hold up a short operation queued behind it.
    pub threads: usize,
    /// `auto` (default), `copy_file_range` or `uring`.
    pub copy_method: CopyMethod,
    /// Share blocks (reflink) where source and target are on a filesystem that can (XFS, btrfs); copies within a
    /// pool then take milliseconds whatever their size. Default true.
    pub reflink: bool,
    /// io_uring: blocks in flight per operation. Default 4.
    pub queue_depth: usize,
    /// io_uring: bytes per read or write; a multiple of 4096. Default 1 MiB.
    pub block_size: usize,
    /// io_uring: bypass the page cache (O_DIRECT) where the filesystem allows it (else buffered I/O is used).
    /// Default true: a copy of a large image neither evicts the host's cache nor costs a memory copy per byte.
    pub direct: bool,
    /// io_uring: leave blocks that read as all zeros unwritten, so they stay holes in the copy. Default true.
    pub detect_zeros: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            threads: 2,
            copy_method: CopyMethod::Auto,
            reflink: true,
            queue_depth: 4,
            block_size: 1 << 20,
            direct: true,
            detect_zeros: true,
        }
    }
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut p = Problems::default();
        if !(1..=64).contains(&self.threads) {
            p.add("threads", self.threads, "is outside 1..=64");
        }
        if !(1..=256).contains(&self.queue_depth) {
            p.add("queue_depth", self.queue_depth, "is outside 1..=256");
        }
        if self.block_size == 0 || self.block_size % 4096 != 0 || self.block_size > 64 << 20 {
            p.add("block_size", self.block_size, "is not a multiple of 4096 between 4 KiB and 64 MiB");
        }
        p.into_result()
    }

    /// The io_uring settings of this config.
    pub fn uring(&self) -> UringTuning {
        UringTuning { direct: self.direct, block_size: self.block_size, queue_depth: self.queue_depth }
    }

    /// The plan this config gives without a measurement: what `copy_method` names (`auto`: io_uring with this
    /// config's settings, until a pool has measured).
    pub fn configured_plan(&self) -> CopyPlan {
        let (data, reason) = match self.copy_method {
            CopyMethod::Auto => (DataMethod::Uring, "engine defaults (not measured)"),
            CopyMethod::CopyFileRange => (DataMethod::CopyFileRange, "configured: copy_method copy_file_range"),
            CopyMethod::Uring => (DataMethod::Uring, "configured: copy_method uring"),
        };
        CopyPlan { reflink: self.reflink, data, uring: self.uring(), reason: reason.to_owned() }
    }
}

/// A SHA-256 digest; displays and parses as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl std::str::FromStr for Digest {
    type Err = Invalid;

    fn from_str(s: &str) -> Result<Self, Invalid> {
        let bad = || {
            let mut p = Problems::default();
            p.add("sha256", s, "is not 64 hexadecimal digits");
            p.into_result().unwrap_err()
        };
        if s.len() != 64 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Digest(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How the blocks of a new or grown raw image are allocated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preallocation {
    /// Sparse: blocks are allocated when first written. Default.
    #[default]
    Off,
    /// fallocate: every block reserved up front, so the guest can never hit ENOSPC on this image.
    Full,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Make the copy at least this long (the extra is a hole), as when a volume is created larger than its image.
    pub grow_to: Option<u64>,
    /// Compute the SHA-256 of the content while copying.
    pub sha256: bool,
    /// Fsync the copy and its directory before returning. Default true; only benchmarks turn it off.
    pub sync: bool,
    /// How to move the data; None: the engine config's [`EngineConfig::configured_plan`]. Pools pass theirs.
    pub plan: Option<CopyPlan>,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self { grow_to: None, sha256: false, sync: true, plan: None }
    }
}

/// What an import checks before the imported file takes its name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// The exact size the source must have.
    pub size: Option<u64>,
    /// The SHA-256 the content must have (checked while copying, which then goes through io_uring).
    pub sha256: Option<Digest>,
    /// As [`CopyOptions::plan`].
    pub plan: Option<CopyPlan>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResizeOptions {
    /// Allow the new size to be smaller than the current one (data past it is lost).
    pub allow_shrink: bool,
    /// How to allocate the grown part.
    pub preallocation: Preallocation,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyReport {
    /// Size of the copy.
    pub size: u64,
    /// Bytes in the source's data extents (what was read).
    pub data_bytes: u64,
    /// Bytes written: data minus all-zero blocks.
    pub written_bytes: u64,
    /// The content's SHA-256, when asked for (import with a checksum, or [`CopyOptions::sha256`]).
    pub sha256: Option<Digest>,
    /// What moved the data.
    pub mechanism: Mechanism,
    pub elapsed: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroReport {
    pub size: u64,
    /// Whether the blocks were freed (hole punched) rather than overwritten with zeros.
    pub punched: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid engine config: {0}")]
    Config(Invalid),
    #[error("start engine thread {index}")]
    ThreadStart {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("set up io_uring with {entries} entries")]
    RingSetup {
        entries: usize,
        #[source]
        source: io::Error,
    },
    #[error("io_uring submit or wait")]
    Ring {
        #[source]
        source: io::Error,
    },
    #[error("the engine has shut down")]
    Stopped,
    #[error("open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} already exists")]
    Exists { path: PathBuf },
    #[error("stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("find data extents of {path} from offset {offset}")]
    Seek {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("read {path} at offset {offset}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path} ended at offset {offset}, before its size: it shrank during the operation")]
    ShortRead { path: PathBuf, offset: u64 },
    #[error("write {path} at offset {offset}")]
    Write {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("set the size of {path} to {size} bytes")]
    Truncate {
        path: PathBuf,
        size: u64,
        #[source]
        source: io::Error,
    },
    #[error("allocate {len} bytes at offset {offset} of {path}")]
    Allocate {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("clone (reflink) {src} into {dst} at offset {offset}")]
    Clone {
        src: PathBuf,
        dst: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("copy {src} to {dst} at offset {offset}")]
    CopyRange {
        src: PathBuf,
        dst: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("fsync {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fsync the directory of {path}")]
    SyncDir {
        path: PathBuf,
        #[source]
        source: AtomicError,
    },
    #[error("rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("name a temporary file for {path}")]
    Temp {
        path: PathBuf,
        #[source]
        source: AtomicError,
    },
    #[error("{path} is {actual} bytes, expected {expected}")]
    SizeMismatch { path: PathBuf, expected: u64, actual: u64 },
    #[error("{path} has sha256 {actual}, expected {expected}")]
    ChecksumMismatch { path: PathBuf, expected: Digest, actual: Digest },
    #[error("shrinking {path} from {current} to {requested} bytes needs allow_shrink")]
    ShrinkRefused { path: PathBuf, current: u64, requested: u64 },
    #[error("{operation} of {path} was cancelled")]
    Cancelled { operation: &'static str, path: PathBuf },
}

impl EngineError {
    pub fn is_cancelled(&self) -> bool {
        matches!(self, EngineError::Cancelled { .. })
    }

    /// The operating system's error behind this one, if any: lets callers tell "no space" (`StorageFull`),
    /// "not found" and "permission denied" apart without matching every variant.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        use EngineError::*;
        match self {
            ThreadStart { source, .. }
            | RingSetup { source, .. }
            | Ring { source }
            | Open { source, .. }
            | Create { source, .. }
            | Stat { source, .. }
            | Seek { source, .. }
            | Read { source, .. }
            | Write { source, .. }
            | Truncate { source, .. }
            | Allocate { source, .. }
            | Clone { source, .. }
            | CopyRange { source, .. }
            | Sync { source, .. }
            | Rename { source, .. } => Some(source.kind()),
            Exists { .. } => Some(io::ErrorKind::AlreadyExists),
            _ => None,
        }
    }
}

type Work = Box<dyn FnOnce(&mut Worker) + Send>;

/// A handle on the engine's threads; clones share them. The threads finish the operations already queued and exit
/// once the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::Sender<Work>,
    config: EngineConfig,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("config", &self.inner.config).finish()
    }
}

impl Engine {
    /// Starts the engine threads and sets up their rings. Fails when io_uring is not available (an old kernel,
    /// `kernel.io_uring_disabled`, a seccomp filter), so the daemon learns at start-up, not at the first copy. Waits
    /// (milliseconds) for the threads to report: call it at start-up, or from `spawn_blocking`.
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        config.validate().map_err(EngineError::Config)?;
        let (queue, rx) = mpsc::channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        let (ready_tx, ready_rx) = mpsc::channel();
        for index in 0..config.threads {
            let rx = Arc::clone(&rx);
            let ready = ready_tx.clone();
            let cfg = config.clone();
            std::thread::Builder::new()
                .name(format!("qx-uring-{index}"))
                .spawn(move || {
                    let mut worker = match Worker::new(cfg) {
                        Ok(w) => {
                            let _ = ready.send(Ok(()));
                            w
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    drop(ready);
                    worker_loop(&rx, &mut worker);
                })
                .map_err(|source| EngineError::ThreadStart { index, source })?;
        }
        drop(ready_tx);
        for _ in 0..config.threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => {
                    return Err(EngineError::RingSetup { entries: config.queue_depth * 2, source });
                }
                Err(_) => return Err(EngineError::Stopped),
            }
        }
        tracing::debug!(?config, "image engine started");
        Ok(Self { inner: Arc::new(Inner { queue, config }) })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Hands `job` to an engine thread and waits for its result without blocking the runtime.
    async fn run<T: Send + 'static>(
        &self,
        ctl: &OpControl,
        job: impl FnOnce(&mut Worker, &JobCtl) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (tx, rx) = oneshot::channel();
        let dropped = Cancel::new();
        let jctl = JobCtl::new(ctl.clone(), dropped.clone());
        let work: Work = Box::new(move |worker| {
            let _ = tx.send(job(worker, &jctl));
        });
        self.inner.queue.send(work).map_err(|_| EngineError::Stopped)?;
        let mut guard = CancelOnDrop(Some(dropped));
        let result = rx.await;
        guard.0 = None;
        result.map_err(|_| EngineError::Stopped)?
    }

    /// Copies `src` to the new file `dst`: only the source's data extents are copied, holes stay holes (and so do
    /// all-zero blocks, on the io_uring path). `dst` must not exist; it appears only once complete (and fsynced,
    /// file and directory, unless `opts.sync` is off). `opts.plan` says by which mechanism; the report says which
    /// one ran.
    pub async fn copy(
        &self,
        src: impl AsRef<Path>,
        dst: impl AsRef<Path>,
        opts: CopyOptions,
        ctl: &OpControl,
    ) -> Result<CopyReport, EngineError> {
        let (src, dst) = (src.as_ref().to_owned(), dst.as_ref().to_owned());
        self.run(ctl, move |w, job| ops::copy(w, job, &src, &dst, &opts, None)).await
    }

    /// Copies `src` into the library as `dst`, like [`Engine::copy`], after checking its size and, while copying,
    /// its SHA-256 (a mismatch leaves nothing behind). The report carries the checksum when one was checked.
    pub async fn import(
        &self,
        src: impl AsRef<Path>,
        dst: impl AsRef<Path>,
        expect: ImportOptions,
        ctl: &OpControl,
    ) -> Result<CopyReport, EngineError> {
        let (src, dst) = (src.as_ref().to_owned(), dst.as_ref().to_owned());
        self.run(ctl, move |w, job| ops::copy(w, job, &src, &dst, &CopyOptions::default(), Some(&expect))).await
    }

    /// Measures which copy mechanism is fastest in `dir` (a pool's directory, on the filesystem its copies write to):
    /// about a second, 64 MiB written and copied a few times, all removed afterwards. Progress counts the runs.
    pub async fn calibrate(&self, dir: impl AsRef<Path>, ctl: &OpControl) -> Result<Calibration, EngineError> {
        let dir = dir.as_ref().to_owned();
        self.run(ctl, move |w, job| plan::calibrate(w, job, &dir)).await
    }

    /// The SHA-256 of a file's content, reading only its data extents (holes hash as zeros).
    pub async fn sha256(&self, path: impl AsRef<Path>, ctl: &OpControl) -> Result<Digest, EngineError> {
        let path = path.as_ref().to_owned();
        self.run(ctl, move |w, job| ops::sha256(w, job, &path)).await
    }

    /// Creates the raw image `path` of `size` bytes, sparse or preallocated. `path` must not exist.
    pub async fn create_raw(
        &self,
        path: impl AsRef<Path>,
        size: u64,
        preallocation: Preallocation,
        ctl: &OpControl,
    ) -> Result<(), EngineError> {
        let path = path.as_ref().to_owned();
        self.run(ctl, move |w, job| ops::create_raw(w, job, &path, size, preallocation)).await
    }

    /// Sets the size of the raw image `path`; returns the size it had. Shrinking needs `opts.allow_shrink`.
    pub async fn resize(&self, path: impl AsRef<Path>, size: u64, opts: ResizeOptions) -> Result<u64, EngineError> {
        let path = path.as_ref().to_owned();
        self.run(&OpControl::new(), move |w, _| ops::resize(w, &path, size, &opts)).await
    }

    /// Makes the whole of `path` read as zeros, punching holes where the filesystem can.
    pub async fn zero(&self, path: impl AsRef<Path>, ctl: &OpControl) -> Result<ZeroReport, EngineError> {
        let path = path.as_ref().to_owned();
        self.run(ctl, move |w, job| ops::zero(w, job, &path)).await
    }
}

fn worker_loop(rx: &Mutex<mpsc::Receiver<Work>>, worker: &mut Worker) {
    loop {
        let work = {
            let guard = match rx.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            guard.recv()
        };
        let Ok(work) = work else { return };
        if std::panic::catch_unwind(AssertUnwindSafe(|| work(worker))).is_err() {
            tracing::error!(thread = ?std::thread::current().name(), "image engine operation panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation_names_every_field() {
        EngineConfig::default().validate().unwrap();
        let bad = EngineConfig { threads: 0, queue_depth: 1000, block_size: 1000, ..EngineConfig::default() };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("threads: \"0\" is outside"), "{err}");
        assert!(err.contains("queue_depth: \"1000\""), "{err}");
        assert!(err.contains("block_size: \"1000\""), "{err}");
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let err = serde_json::from_str::<EngineConfig>(r#"{"queue_depth": 4, "bogus": 1}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let cfg: EngineConfig = serde_json::from_str(r#"{"queue_depth": 4}"#).unwrap();
        assert_eq!(cfg.queue_depth, 4);
        assert_eq!(cfg.block_size, EngineConfig::default().block_size);
    }

    #[test]
    fn digest_round_trips_as_hex() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = hex.parse().unwrap();
        assert_eq!(d.to_string(), hex);
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{hex}\""));
        let err = "xyz".parse::<Digest>().unwrap_err();
        assert_eq!(err.to_string(), r#"sha256: "xyz" is not 64 hexadecimal digits"#);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn sha256_of_sparse_file_matches_plain_hash() {
        use sha2::Digest as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut content = vec![0u8; 3 << 20];
        content[1 << 20..(1 << 20) + 5].copy_from_slice(b"hello");
        content[(3 << 20) - 1] = 7;
        std::fs::write(&path, &content).unwrap();
        let want: [u8; 32] = sha2::Sha256::digest(&content).into();
        for direct in [false, true] {
            let cfg = EngineConfig { threads: 1, queue_depth: 3, block_size: 64 << 10, direct, ..Default::default() };
            let engine = Engine::new(cfg).unwrap();
            let got = rt().block_on(engine.sha256(&path, &OpControl::new())).unwrap();
            assert_eq!(got.0, want, "direct={direct}");
        }
    }

    #[test]
    fn copy_of_unaligned_file_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let content: Vec<u8> = (0..100_003u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &content).unwrap();
        for (i, direct) in [false, true].into_iter().enumerate() {
            let cfg = EngineConfig { threads: 1, queue_depth: 2, block_size: 8192, direct, ..Default::default() };
            let engine = Engine::new(cfg).unwrap();
            let dst = dir.path().join(format!("dst{i}"));
            let report = rt()
                .block_on(engine.copy(
                    &src,
                    &dst,
                    CopyOptions { sha256: true, ..Default::default() },
                    &OpControl::new(),
                ))
                .unwrap();
            assert_eq!(std::fs::read(&dst).unwrap(), content, "direct={direct}");
            assert_eq!(report.size, content.len() as u64);
            assert!(report.sha256.is_some());
        }
    }
}
