//! How a copy moves data, and the short calibration that chooses it on the machine that runs it.
//!
//! Three mechanisms, tried in this order for each copy:
//! 1. reflink (`FICLONERANGE`, per data extent) where source and target share a filesystem that can share blocks
//!    (XFS, btrfs): nothing is read or written, a copy of any size takes milliseconds;
//! 2. the plan's data method: `copy_file_range` (the kernel moves the pages, as `cp` does) or the io_uring pipeline
//!    (O_DIRECT or buffered, with a block size and queue depth);
//! 3. the io_uring pipeline whenever the others do not apply (across filesystems, or a filesystem without
//!    `copy_file_range`) and whenever the copy must see the bytes (an import that checks a SHA-256).
//!
//! Which data method wins depends on the disk, the filesystem and the kernel: on one virtio disk O_DIRECT was 1.3x
//! faster than `cp`, on another 1.4x slower. So a pool measures once ([`calibrate`]): a 64 MiB file with four data
//! extents, copied cold (its pages dropped with `posix_fadvise`, no privilege needed) and durably by every candidate,
//! twice, in rotating order. `copy_file_range` wins unless io_uring is clearly faster (`URING_MARGIN`); a file of
//! many small extents goes through io_uring under either plan (`ops::fragmented`). The pool caches the result
//! beside its metadata and reports it.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::control::JobCtl;
use super::ops::{self, Worker};
use super::syscalls;
use super::{CopyOptions, EngineError};
use crate::atomic::{temp_path_for, TempFile};

/// Settings of the io_uring pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UringTuning {
    /// Bypass the page cache (O_DIRECT) where the filesystem allows it; buffered otherwise.
    pub direct: bool,
    /// Bytes per read or write; a multiple of 4096.
    pub block_size: usize,
    /// Blocks in flight.
    pub queue_depth: usize,
}

impl fmt::Display for UringTuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.direct { "O_DIRECT" } else { "buffered" };
        write!(f, "io_uring {mode} {}x{}", self.queue_depth, size_label(self.block_size as u64))
    }
}

fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

/// How data extents are moved when they cannot be shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataMethod {
    /// `copy_file_range(2)`, in chunks (for progress and cancel). Copies allocated zeros as they are.
    CopyFileRange,
    /// The io_uring pipeline with the plan's [`UringTuning`]. Leaves all-zero blocks unwritten.
    Uring,
}

/// The mechanism one copy actually used, in its [`super::CopyReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Reflink,
    CopyFileRange,
    Uring(UringTuning),
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mechanism::Reflink => f.write_str("reflink"),
            Mechanism::CopyFileRange => f.write_str("copy_file_range"),
            Mechanism::Uring(t) => t.fmt(f),
        }
    }
}

/// What copies into a pool use: chosen by [`calibrate`] or fixed in [`super::EngineConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyPlan {
    /// Try reflink first (it falls back by itself where it does not apply).
    pub reflink: bool,
    pub data: DataMethod,
    /// The io_uring settings: for [`DataMethod::Uring`], and for copies that hash what they copy.
    pub uring: UringTuning,
    /// Why this plan, in a sentence for operators (`qxctl pool show`).
    pub reason: String,
}

impl CopyPlan {
    /// The mechanism for data, in words: "reflink, else io_uring O_DIRECT 4x1 MiB".
    pub fn summary(&self) -> String {
        let data = match self.data {
            DataMethod::CopyFileRange => Mechanism::CopyFileRange,
            DataMethod::Uring => Mechanism::Uring(self.uring),
        };
        if self.reflink {
            format!("reflink, else {data}")
        } else {
            data.to_string()
        }
    }
}

/// A candidate of the calibration and its best time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub mechanism: String,
    pub seconds: f64,
}

/// The outcome of [`calibrate`], as a pool caches it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    pub plan: CopyPlan,
    /// The filesystem measured ("ext4").
    pub filesystem: String,
    /// Whether blocks could be shared (reflink) in the measured directory.
    pub reflink_supported: bool,
    pub samples: Vec<Sample>,
    /// Identifies the measured setup; a pool measures again when it changes.
    pub key: CalibrationKey,
    pub measured_unix: u64,
}

/// What a cached calibration is valid for: the filesystem (device number), the kernel and this measurement's
/// version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationKey {
    pub device: u64,
    pub kernel: String,
    pub version: u32,
}

/// Bumped when the candidates or the measurement change, so cached results are measured again.
const CALIBRATION_VERSION: u32 = 2;
/// io_uring must beat `copy_file_range` by this factor on the calibration file to be chosen. `copy_file_range` is
/// the kernel path `cp` takes, so it ties `cp` on any shape by construction; the 64 MiB sample misjudges io_uring
/// with O_DIRECT on a disk with a write cache: in two bench runs on the dev VM it led `copy_file_range` by 10% and
/// 21% on the sample and then lost to `cp` by 9-11% on a 2 GiB fully allocated image (a swing of 1.24-1.33x). The
/// margin is wider than that swing.
const URING_MARGIN: f64 = 1.5;
/// The calibration file: four 16 MiB data extents with 16 MiB holes between them.
const EXTENT: u64 = 16 << 20;
const EXTENTS: u64 = 4;
const ROUNDS: usize = 2;

impl CalibrationKey {
    /// The key for a pool directory as it is now.
    pub fn of(dir: &Path) -> std::io::Result<Self> {
        Ok(Self {
            device: std::fs::metadata(dir)?.dev(),
            kernel: rustix::system::uname().release().to_string_lossy().into_owned(),
            version: CALIBRATION_VERSION,
        })
    }
}

/// The candidates measured: copy_file_range, and io_uring over O_DIRECT and buffered settings around the sweet spots
/// seen so far (2-16 MiB in flight).
fn candidates() -> Vec<(DataMethod, UringTuning)> {
    let u = |direct, block_kib: usize, queue_depth| UringTuning { direct, block_size: block_kib << 10, queue_depth };
    let mut v = vec![(DataMethod::CopyFileRange, u(true, 1024, 4))];
    for t in [u(true, 1024, 4), u(true, 1024, 8), u(true, 4096, 4), u(false, 1024, 8)] {
        v.push((DataMethod::Uring, t));
    }
    v
}

/// Measures the candidates in `dir` (on the filesystem the copies will write to) and returns the fastest as a plan.
/// Everything it writes has temporary names (swept at pool open if the daemon dies meanwhile) and is removed.
pub(crate) fn calibrate(worker: &mut Worker, job: &JobCtl, dir: &Path) -> Result<Calibration, EngineError> {
    let key = CalibrationKey::of(dir).map_err(|source| EngineError::Stat { path: dir.to_owned(), source })?;
    let src_tmp = TempFile::new(
        temp_path_for(&dir.join("copy-calibration"))
            .map_err(|source| EngineError::Temp { path: dir.to_owned(), source })?,
    );
    let src = write_calibration_source(src_tmp.path())?;
    let filesystem = syscalls::filesystem_name(&src);
    let reflink_supported = reflink_works(&src, src_tmp.path(), dir)?;
    let dst = dir.join("copy-calibration.out");
    let dst = temp_path_for(&dst).map_err(|source| EngineError::Temp { path: dst.clone(), source })?;

    let cands = candidates();
    let mut best = vec![Duration::MAX; cands.len()];
    let total = (ROUNDS * cands.len()) as u64;
    for round in 0..ROUNDS {
        for k in 0..cands.len() {
            // Rotate the order each round, so that no candidate always runs first (or after the same one).
            let i = (k + round) % cands.len();
            if job.cancelled() {
                return Err(EngineError::Cancelled { operation: "calibration", path: dir.to_owned() });
            }
            let (data, uring) = cands[i];
            let plan = CopyPlan { reflink: false, data, uring, reason: String::new() };
            syscalls::drop_cached(&src)
                .map_err(|source| EngineError::Sync { path: src_tmp.path().to_owned(), source })?;
            let opts = CopyOptions { plan: Some(plan), ..CopyOptions::default() };
            let inner = JobCtl::new(crate::OpControl::new(), job.dropped.clone());
            let t = Instant::now();
            ops::copy(worker, &inner, src_tmp.path(), &dst, &opts, None)?;
            best[i] = best[i].min(t.elapsed());
            let _ = std::fs::remove_file(&dst);
            job.report((round * cands.len() + k + 1) as u64, total);
        }
    }
    drop(src);
    drop(src_tmp);

    let name = |(data, uring): (DataMethod, UringTuning)| match data {
        DataMethod::CopyFileRange => Mechanism::CopyFileRange.to_string(),
        DataMethod::Uring => Mechanism::Uring(uring).to_string(),
    };
    let samples: Vec<Sample> =
        cands.iter().zip(&best).map(|(c, d)| Sample { mechanism: name(*c), seconds: d.as_secs_f64() }).collect();
    let best_uring = (0..cands.len()).filter(|&i| cands[i].0 == DataMethod::Uring).min_by_key(|&i| best[i]).unwrap();
    let cfr = (0..cands.len()).find(|&i| cands[i].0 == DataMethod::CopyFileRange).expect("copy_file_range candidate");
    let uring_wins = best[best_uring].as_secs_f64() * URING_MARGIN < best[cfr].as_secs_f64();
    let winner = if uring_wins { best_uring } else { cfr };
    let mib = (EXTENT * EXTENTS) >> 20;
    let timings: Vec<String> = samples.iter().map(|s| format!("{} {:.0} ms", s.mechanism, s.seconds * 1e3)).collect();
    let reflink_note = if !reflink_supported {
        format!("; reflink: not supported by {filesystem}")
    } else if worker.config.reflink {
        format!("; reflink: {filesystem} shares blocks, copies within the pool are clones")
    } else {
        format!("; reflink: supported by {filesystem} but off in the config")
    };
    let margin = format!("io_uring chosen only when {URING_MARGIN}x faster than copy_file_range");
    let reason = format!(
        "measured on {filesystem}: {} chosen for {mib} MiB copied cold and durably ({}; {margin}; files of many \
         small extents always go through io_uring){reflink_note}",
        name(cands[winner]),
        timings.join(", "),
    );
    let plan = CopyPlan {
        reflink: worker.config.reflink && reflink_supported,
        data: cands[winner].0,
        uring: cands[best_uring].1,
        reason,
    };
    tracing::info!(dir = %dir.display(), plan = %plan.summary(), reason = %plan.reason, "copy calibration done");
    Ok(Calibration {
        plan,
        filesystem,
        reflink_supported,
        samples,
        key,
        measured_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    })
}

/// Writes the calibration source (pseudo-random data, so nothing compresses or deduplicates), fsynced so that its
/// pages are clean and can be dropped before each run.
fn write_calibration_source(path: &Path) -> Result<File, EngineError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| EngineError::Create { path: path.to_owned(), source })?;
    let size = EXTENT * EXTENTS * 2;
    file.set_len(size).map_err(|source| EngineError::Truncate { path: path.to_owned(), size, source })?;
    let mut buf = vec![0u8; 1 << 20];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for e in 0..EXTENTS {
        for off in (0..EXTENT).step_by(buf.len()) {
            for w in buf.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                w.copy_from_slice(&state.to_le_bytes());
            }
            let at = e * 2 * EXTENT + off;
            file.write_all_at(&buf, at).map_err(|source| EngineError::Write {
                path: path.to_owned(),
                offset: at,
                source,
            })?;
        }
    }
    file.sync_all().map_err(|source| EngineError::Sync { path: path.to_owned(), source })?;
    Ok(file)
}

/// Whether `dir`'s filesystem shares blocks: clones the first 64 KiB of `src` into a scratch file.
fn reflink_works(src: &File, src_path: &Path, dir: &Path) -> Result<bool, EngineError> {
    let probe = dir.join("reflink-probe");
    let probe = TempFile::new(temp_path_for(&probe).map_err(|source| EngineError::Temp { path: probe, source })?);
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(probe.path())
        .map_err(|source| EngineError::Create { path: probe.path().to_owned(), source })?;
    Ok(match syscalls::clone_range(src, &dst, 0, 64 << 10) {
        Ok(()) => true,
        Err(e) if syscalls::unsupported(&e) => false,
        Err(source) => {
            return Err(EngineError::Clone {
                src: src_path.to_owned(),
                dst: probe.path().to_owned(),
                offset: 0,
                source,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_summary_names_the_mechanisms() {
        let uring = UringTuning { direct: true, block_size: 1 << 20, queue_depth: 4 };
        let plan = CopyPlan { reflink: true, data: DataMethod::Uring, uring, reason: String::new() };
        assert_eq!(plan.summary(), "reflink, else io_uring O_DIRECT 4x1 MiB");
        let plan = CopyPlan { reflink: false, data: DataMethod::CopyFileRange, ..plan };
        assert_eq!(plan.summary(), "copy_file_range");
        let t = UringTuning { direct: false, block_size: 256 << 10, queue_depth: 8 };
        assert_eq!(Mechanism::Uring(t).to_string(), "io_uring buffered 8x256 KiB");
    }
}
