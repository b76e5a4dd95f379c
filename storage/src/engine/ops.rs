//! The operations, as they run on an engine thread: plain blocking code around one io_uring that keeps
//! `queue_depth` blocks in flight, and the reflink and `copy_file_range` paths of a copy (see `plan.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use io_uring::{opcode, types};
use rustix::fs::{FallocateFlags, SeekFrom};
use sha2::{Digest as _, Sha256};

use super::control::JobCtl;
use super::plan::{DataMethod, Mechanism, UringTuning};
use super::ring::{is_zero, AlignedBuf, Completion, Ring, DIRECT_ALIGN};
use super::syscalls;
use super::{
    CopyOptions, CopyReport, Digest, EngineConfig, EngineError, ImportOptions, Preallocation, ResizeOptions, ZeroReport,
};
use crate::atomic::{rename_noreplace, sync_parent, temp_path_for, TempFile};

/// Progress is published at most once per this many bytes, so that a fast copy does not spend its time waking
/// watchers.
const REPORT_STEP: u64 = 16 << 20;

/// Bytes per `copy_file_range` call (fewer under a speed limit, `JobCtl::chunk`): small enough that progress and
/// cancel stay responsive (a cold 128 MiB is 0.1-0.2 s here), large enough to keep the disk's queue full. With
/// 16 MiB calls the engine copied a 2 GiB fully allocated image in 2.69 s median against `cp`'s 2.24 s (which makes
/// one call for the whole file); with 128 MiB in 2.28 s against 2.78 s (BENCHMARKS.md).
const COPY_RANGE_CHUNK: u64 = 128 << 20;

/// Bytes per `FICLONERANGE` call: sharing costs per extent, not per byte, so this only bounds the time to notice a
/// cancel.
const CLONE_CHUNK: u64 = 1 << 30;

/// An engine thread's state: its ring and the buffers its operations reuse.
pub(crate) struct Worker {
    pub ring: Ring,
    pub config: EngineConfig,
    bufs: Vec<AlignedBuf>,
}

impl Worker {
    pub fn new(config: EngineConfig) -> io::Result<Self> {
        // Room for the deepest queue a calibrated plan picks (entries cost a few bytes each); a deeper configured
        // queue still works, the ring is then submitted when full.
        let ring = Ring::new((config.queue_depth.max(16) * 2) as u32)?;
        Ok(Self { ring, config, bufs: Vec::new() })
    }

    /// The operation's buffers, allocated on first use and kept for the next operation with the same tuning.
    fn take_bufs(&mut self, tuning: &UringTuning) -> Vec<AlignedBuf> {
        let fits = self.bufs.len() == tuning.queue_depth
            && self.bufs.first().is_some_and(|b| b.as_slice().len() == tuning.block_size);
        if !fits {
            self.bufs = (0..tuning.queue_depth).map(|_| AlignedBuf::new(tuning.block_size)).collect();
        }
        std::mem::take(&mut self.bufs)
    }
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(DIRECT_ALIGN as u64) * DIRECT_ALIGN as u64
}

fn align_down(v: u64) -> u64 {
    v / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64
}

/// Switches an open file to O_DIRECT where the filesystem allows it (some refuse with EINVAL) and says whether it did.
fn set_direct(file: &File, path: &Path) -> Result<bool, EngineError> {
    use rustix::fs::OFlags;
    let flags =
        rustix::fs::fcntl_getfl(file).map_err(|e| EngineError::Open { path: path.to_owned(), source: e.into() })?;
    match rustix::fs::fcntl_setfl(file, flags | OFlags::DIRECT) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::INVAL) => {
            tracing::debug!(path = %path.display(), "O_DIRECT refused, using buffered I/O");
            Ok(false)
        }
        Err(e) => Err(EngineError::Open { path: path.to_owned(), source: e.into() }),
    }
}

/// Opens a regular file for reading and returns it with its size.
fn open_source(path: &Path) -> Result<(File, u64), EngineError> {
    let file = OpenOptions::new()
        .read(true)
        .open(path)
        .map_err(|source| EngineError::Open { path: path.to_owned(), source })?;
    let meta = file.metadata().map_err(|source| EngineError::Stat { path: path.to_owned(), source })?;
    if !meta.file_type().is_file() {
        let kind = if meta.is_dir() {
            "directory"
        } else if meta.file_type().is_block_device() {
            "block device"
        } else {
            "special file"
        };
        return Err(EngineError::NotRegular { path: path.to_owned(), kind });
    }
    Ok((file, meta.len()))
}

fn refuse_existing(path: &Path) -> Result<(), EngineError> {
    if path.symlink_metadata().is_ok() {
        return Err(EngineError::Exists { path: path.to_owned() });
    }
    Ok(())
}

/// A new temporary file beside `target` (removed again unless the operation succeeds).
fn create_temp(target: &Path) -> Result<(TempFile, File), EngineError> {
    let tmp = temp_path_for(target).map_err(|source| EngineError::Temp { path: target.to_owned(), source })?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| EngineError::Create { path: tmp.clone(), source })?;
    Ok((TempFile::new(tmp), file))
}

/// Fsyncs the temporary file, renames it to `target` (refusing to replace anything) and fsyncs the directory.
fn commit(ring: &mut Ring, mut tmp: TempFile, file: File, target: &Path, sync: bool) -> Result<(), EngineError> {
    if sync {
        ring.fsync(file.as_raw_fd()).map_err(|source| EngineError::Sync { path: tmp.path().to_owned(), source })?;
    }
    drop(file);
    rename_noreplace(tmp.path(), target).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            EngineError::Exists { path: target.to_owned() }
        } else {
            EngineError::Rename { from: tmp.path().to_owned(), to: target.to_owned(), source }
        }
    })?;
    tmp.disarm();
    if sync {
        sync_parent(target).map_err(|source| EngineError::SyncDir { path: target.to_owned(), source })?;
    }
    Ok(())
}

fn set_len(file: &File, path: &Path, size: u64) -> Result<(), EngineError> {
    file.set_len(size).map_err(|source| EngineError::Truncate { path: path.to_owned(), size, source })
}

/// The first data extent `[start, end)` of `file` at or after `from` (SEEK_DATA/SEEK_HOLE), clipped to `size`; None
/// past the last. A filesystem without an extent map answers with the rest of the file as one extent.
fn next_extent(file: &File, path: &Path, size: u64, from: u64) -> Result<Option<(u64, u64)>, EngineError> {
    use rustix::io::Errno;
    if from >= size {
        return Ok(None);
    }
    let seek_err = |offset, source: Errno| EngineError::Seek { path: path.to_owned(), offset, source: source.into() };
    let start = match rustix::fs::seek(file.as_fd(), SeekFrom::Data(from)) {
        Ok(s) => s,
        Err(Errno::NXIO) => return Ok(None),
        Err(Errno::INVAL | Errno::OPNOTSUPP) => from,
        Err(e) => return Err(seek_err(from, e)),
    };
    if start >= size {
        return Ok(None);
    }
    let end = match rustix::fs::seek(file.as_fd(), SeekFrom::Hole(start)) {
        Ok(e) => e.min(size),
        Err(Errno::NXIO | Errno::INVAL | Errno::OPNOTSUPP) => size,
        Err(e) => return Err(seek_err(start, e)),
    };
    Ok(Some((start, end)))
}

/// Walks the data extents of a file and cuts them into blocks (aligned for O_DIRECT when `direct`).
struct Chunks<'a> {
    file: &'a File,
    path: &'a Path,
    size: u64,
    block: u64,
    direct: bool,
    pos: u64,
    extent_end: u64,
    /// Bytes inside data extents, for the report.
    data_bytes: u64,
}

impl<'a> Chunks<'a> {
    fn new(file: &'a File, path: &'a Path, size: u64, block: usize, direct: bool) -> Self {
        Self { file, path, size, block: block as u64, direct, pos: 0, extent_end: 0, data_bytes: 0 }
    }

    /// Where the next block starts (or the size once every block was handed out).
    fn position(&self) -> u64 {
        self.pos.min(self.size)
    }

    fn next(&mut self) -> Result<Option<(u64, u64)>, EngineError> {
        // Loops only when an aligned extent lies wholly inside blocks already handed out (filesystems with blocks
        // smaller than the O_DIRECT alignment); SEEK_DATA from `pos` then moves past it.
        while self.pos >= self.extent_end {
            let Some((start, end)) = next_extent(self.file, self.path, self.size, self.pos)? else {
                self.pos = self.size;
                return Ok(None);
            };
            let (start, end) = if self.direct { (align_down(start), align_up(end)) } else { (start, end) };
            self.pos = start.max(self.pos);
            self.extent_end = end.max(self.pos);
            self.data_bytes += end.min(self.size).saturating_sub(self.pos);
        }
        let len = self.block.min(self.extent_end - self.pos);
        let off = self.pos;
        self.pos += len;
        Ok(Some((off, len)))
    }
}

#[derive(Default)]
struct Slot {
    busy: bool,
    seq: u64,
    offset: u64,
    /// Bytes of the file in this block (the block may be longer at the end of an O_DIRECT file).
    want: u64,
    /// Bytes requested per read (`want` rounded up to the O_DIRECT alignment when direct).
    req: u64,
    got: u64,
    read_done: bool,
    writing: bool,
    put: u64,
    write_done: bool,
    hashed: bool,
}

const OP_READ: u64 = 0;
const OP_WRITE: u64 = 1;

fn user_data(op: u64, slot: usize) -> u64 {
    (op << 32) | slot as u64
}

pub(crate) struct TransferOut {
    pub data_bytes: u64,
    pub written_bytes: u64,
    pub sha256: Option<[u8; 32]>,
    /// Whether the destination was written with O_DIRECT (whole blocks, possibly past an unaligned end).
    pub dst_direct: bool,
}

/// Where a transfer writes: the file, its path for errors, and whether it was opened O_DIRECT.
pub(crate) struct Sink<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub direct: bool,
}

/// The copy pipeline: reads the data extents of `src` block by block, `queue_depth` blocks in flight, writes each
/// block that is not all zeros to the same offset of `dst`, and feeds the whole content (holes as zeros) to
/// SHA-256 in order when `hash` is set. `dst` must already be `size` bytes long (holes everywhere).
struct Transfer<'r> {
    ring: &'r mut Ring,
    src_fd: RawFd,
    slots: Vec<Slot>,
    bufs: Vec<AlignedBuf>,
}

impl Drop for Transfer<'_> {
    fn drop(&mut self) {
        // The kernel may still be writing into our buffers: wait for it before they are freed.
        self.ring.drain();
    }
}

/// Runs the io_uring pipeline from `src` (to `dst`, if any) with `tuning`, switching both files to O_DIRECT first
/// when the tuning asks for it and their filesystems allow it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transfer(
    worker: &mut Worker,
    job: &JobCtl,
    operation: &'static str,
    src: (&File, &Path),
    size: u64,
    dst: Option<(&File, &Path)>,
    hash: bool,
    tuning: &UringTuning,
) -> Result<TransferOut, EngineError> {
    let detect_zeros = worker.config.detect_zeros;
    let (src_file, src_path) = src;
    let src_direct = tuning.direct && set_direct(src_file, src_path)?;
    let sink = match dst {
        Some((file, path)) => Some(Sink { file, path, direct: tuning.direct && set_direct(file, path)? }),
        None => None,
    };
    let dst_direct = sink.as_ref().is_some_and(|d| d.direct);
    let bufs = worker.take_bufs(tuning);
    let mut t = Transfer {
        ring: &mut worker.ring,
        src_fd: src_file.as_raw_fd(),
        slots: (0..bufs.len()).map(|_| Slot::default()).collect(),
        bufs,
    };
    let result = t.run(
        job,
        operation,
        src_file,
        src_path,
        src_direct || dst_direct,
        size,
        sink.as_ref(),
        hash,
        detect_zeros,
        tuning.block_size,
    );
    t.ring.drain();
    worker.bufs = std::mem::take(&mut t.bufs);
    drop(t);
    result.map(|mut out| {
        out.dst_direct = dst_direct;
        out
    })
}

impl Transfer<'_> {
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        job: &JobCtl,
        operation: &'static str,
        src: &File,
        src_path: &Path,
        aligned: bool,
        size: u64,
        dst: Option<&Sink<'_>>,
        hash: bool,
        detect_zeros: bool,
        block: usize,
    ) -> Result<TransferOut, EngineError> {
        let started = Instant::now();
        let mut chunks = Chunks::new(src, src_path, size, block, aligned);
        let mut hasher = hash.then(Sha256::new);
        let mut hashed_upto = 0u64;
        let mut next_hash_seq = 0u64;
        let mut next_seq = 0u64;
        let mut written = 0u64;
        let mut requested = 0u64;
        let mut reported = 0u64;
        let mut exhausted = false;
        let mut completions = Vec::with_capacity(self.slots.len() * 2);
        job.report(0, size);

        loop {
            job.throttle(requested);
            if job.cancelled() {
                return Err(EngineError::Cancelled { operation, path: src_path.to_owned() });
            }
            // Keep every free buffer busy reading the next block.
            while !exhausted {
                let Some(i) = self.slots.iter().position(|s| !s.busy) else { break };
                let Some((offset, len)) = chunks.next()? else {
                    exhausted = true;
                    break;
                };
                let want = len.min(size - offset);
                let req = if aligned { align_up(want) } else { want };
                self.slots[i] = Slot {
                    busy: true,
                    seq: next_seq,
                    offset,
                    want,
                    req,
                    write_done: dst.is_none(),
                    hashed: hasher.is_none(),
                    ..Slot::default()
                };
                next_seq += 1;
                requested += want;
                self.submit_read(i)?;
            }

            // Hash completed blocks in file order, holes before them as zeros.
            if let Some(h) = hasher.as_mut() {
                while let Some(i) = self.slots.iter().position(|s| s.busy && s.seq == next_hash_seq && s.read_done) {
                    let s = &self.slots[i];
                    hash_zeros(h, s.offset - hashed_upto);
                    h.update(&self.bufs[i].as_slice()[..s.want as usize]);
                    hashed_upto = s.offset + s.want;
                    next_hash_seq += 1;
                    self.slots[i].hashed = true;
                    self.release_if_done(i);
                }
            }

            let low_water =
                self.slots.iter().filter(|s| s.busy).map(|s| s.offset).min().unwrap_or_else(|| chunks.position());
            if low_water >= reported + REPORT_STEP {
                job.report(low_water, size);
                reported = low_water;
            }

            if self.ring.in_flight() == 0 {
                if exhausted && self.slots.iter().all(|s| !s.busy) {
                    break;
                }
                // Nothing to wait for: the hashing above freed buffers that the top of the loop refills.
                continue;
            }
            completions.clear();
            self.ring.wait(&mut completions).map_err(|source| EngineError::Ring { source })?;
            for c in completions.iter().copied() {
                self.complete(c, src_path, dst, detect_zeros, &mut written)?;
            }
        }

        let sha256 = hasher.map(|mut h| {
            hash_zeros(&mut h, size - hashed_upto);
            h.finalize().into()
        });
        job.report(size, size);
        tracing::debug!(
            operation,
            path = %src_path.display(),
            size,
            data = chunks.data_bytes,
            written,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "transfer done"
        );
        Ok(TransferOut { data_bytes: chunks.data_bytes, written_bytes: written, sha256, dst_direct: false })
    }

    /// Reads the rest of block `i` (all of it the first time; the remainder after a short read).
    fn submit_read(&mut self, i: usize) -> Result<(), EngineError> {
        let s = &self.slots[i];
        let buf = self.bufs[i].as_mut_ptr();
        // SAFETY: got < req <= buffer length, so the range written by the kernel lies inside buffer i.
        let ptr = unsafe { buf.add(s.got as usize) };
        let entry = opcode::Read::new(types::Fd(self.src_fd), ptr, (s.req - s.got) as u32)
            .offset(s.offset + s.got)
            .build()
            .user_data(user_data(OP_READ, i));
        // SAFETY: buffer i belongs to slot i, which stays busy (nobody else touches the buffer) until this read's
        // completion is reaped; Transfer's Drop drains the ring before the buffers can be freed.
        unsafe { self.ring.push(&entry) }.map_err(|source| EngineError::Ring { source })
    }

    fn submit_write(&mut self, dst: &Sink<'_>, i: usize) -> Result<(), EngineError> {
        let s = &self.slots[i];
        let len = if dst.direct { align_up(s.want) } else { s.want };
        // SAFETY: put < len <= buffer length (want <= block size, and the buffer is a whole number of
        // DIRECT_ALIGN blocks), so the pointer stays inside buffer i.
        let ptr = unsafe { self.bufs[i].as_ptr().add(s.put as usize) };
        let entry = opcode::Write::new(types::Fd(dst.file.as_raw_fd()), ptr, (len - s.put) as u32)
            .offset(s.offset + s.put)
            .build()
            .user_data(user_data(OP_WRITE, i));
        self.slots[i].writing = true;
        // SAFETY: as for reads: the slot stays busy and its buffer unmodified until the write's completion is
        // reaped, and Drop drains the ring first.
        unsafe { self.ring.push(&entry) }.map_err(|source| EngineError::Ring { source })
    }

    fn release_if_done(&mut self, i: usize) {
        let s = &self.slots[i];
        if s.read_done && s.write_done && !s.writing && s.hashed {
            self.slots[i].busy = false;
        }
    }

    fn complete(
        &mut self,
        c: Completion,
        src_path: &Path,
        dst: Option<&Sink<'_>>,
        detect_zeros: bool,
        written: &mut u64,
    ) -> Result<(), EngineError> {
        let i = (c.user_data & 0xffff_ffff) as usize;
        match c.user_data >> 32 {
            OP_READ => {
                let s = &self.slots[i];
                let n = c.bytes().map_err(|source| EngineError::Read {
                    path: src_path.to_owned(),
                    offset: s.offset + s.got,
                    source,
                })? as u64;
                if n == 0 {
                    return Err(EngineError::ShortRead { path: src_path.to_owned(), offset: s.offset + s.got });
                }
                self.slots[i].got += n;
                let s = &self.slots[i];
                if s.got < s.want {
                    return self.submit_read(i);
                }
                let want = s.want as usize;
                self.slots[i].read_done = true;
                if let Some(dst) = dst {
                    let zero = detect_zeros && is_zero(&self.bufs[i].as_slice()[..want]);
                    if zero {
                        self.slots[i].write_done = true;
                    } else {
                        self.submit_write(dst, i)?;
                    }
                }
                self.release_if_done(i);
            }
            _ => {
                let dst = dst.expect("write completion without a destination");
                let s = &self.slots[i];
                let n = c.bytes().map_err(|source| EngineError::Write {
                    path: dst.path.to_owned(),
                    offset: s.offset + s.put,
                    source,
                })? as u64;
                if n == 0 {
                    return Err(EngineError::Write {
                        path: dst.path.to_owned(),
                        offset: s.offset + s.put,
                        source: io::Error::from(io::ErrorKind::WriteZero),
                    });
                }
                let len = if dst.direct { align_up(s.want) } else { s.want };
                self.slots[i].put += n;
                self.slots[i].writing = false;
                if self.slots[i].put < len {
                    return self.submit_write(dst, i);
                }
                *written += self.slots[i].want;
                self.slots[i].write_done = true;
                self.release_if_done(i);
            }
        }
        Ok(())
    }
}

fn hash_zeros(h: &mut Sha256, mut n: u64) {
    static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        h.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Copies `src` to a new file `dst` (see [`super::Engine::copy`]); also the body of import, which adds the size and
/// checksum checks. Tries the plan's mechanisms in order (see `plan.rs`): reflink, the data method, io_uring.
pub(crate) fn copy(
    worker: &mut Worker,
    job: &JobCtl,
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    expect: Option<&ImportOptions>,
) -> Result<CopyReport, EngineError> {
    let operation = if expect.is_some() { "import" } else { "copy" };
    let started = Instant::now();
    let plan = match expect.and_then(|e| e.plan.as_ref()).or(opts.plan.as_ref()) {
        Some(plan) => plan.clone(),
        None => worker.config.configured_plan(),
    };
    let (src_file, size) = open_source(src)?;
    if let Some(expected) = expect.and_then(|e| e.size) {
        if expected != size {
            return Err(EngineError::SizeMismatch { path: src.to_owned(), expected, actual: size });
        }
    }
    refuse_existing(dst)?;
    let (tmp, file) = create_temp(dst)?;
    let tmp_path = tmp.path().to_owned();
    set_len(&file, &tmp_path, size)?;
    let want_hash = expect.is_some_and(|e| e.sha256.is_some()) || opts.sha256;
    let src_side = (&src_file, src);
    let dst_side = (&file, tmp_path.as_path());

    // Sharing and in-kernel copies never see the bytes: a copy that hashes goes through io_uring.
    let mut done = None;
    if !want_hash && plan.reflink {
        done = by_kernel(job, operation, Kernel::Clone, src_side, dst_side, size)?.map(|d| (Mechanism::Reflink, d));
    }
    if done.is_none() && !want_hash && plan.data == DataMethod::CopyFileRange && !fragmented(&src_file, src, size)? {
        done = by_kernel(job, operation, Kernel::CopyRange, src_side, dst_side, size)?
            .map(|d| (Mechanism::CopyFileRange, d));
    }
    let (mechanism, out) = match done {
        Some((mechanism, data_bytes)) => {
            let out = TransferOut { data_bytes, written_bytes: data_bytes, sha256: None, dst_direct: false };
            (mechanism, out)
        }
        None => {
            let out = transfer(worker, job, operation, src_side, size, Some(dst_side), want_hash, &plan.uring)?;
            (Mechanism::Uring(UringTuning { direct: out.dst_direct, ..plan.uring }), out)
        }
    };
    // O_DIRECT writes whole blocks, which may have run past an unaligned end; growing makes the rest a hole.
    let final_size = opts.grow_to.map_or(size, |g| g.max(size));
    if out.dst_direct || final_size != size {
        set_len(&file, &tmp_path, final_size)?;
    }
    let sha256 = out.sha256.map(Digest);
    if let (Some(expected), Some(actual)) = (expect.and_then(|e| e.sha256), sha256) {
        if expected != actual {
            return Err(EngineError::ChecksumMismatch { path: src.to_owned(), expected, actual });
        }
    }
    if job.cancelled() {
        return Err(EngineError::Cancelled { operation, path: src.to_owned() });
    }
    commit(&mut worker.ring, tmp, file, dst, opts.sync)?;
    Ok(CopyReport {
        size: final_size,
        data_bytes: out.data_bytes,
        written_bytes: out.written_bytes,
        sha256,
        mechanism,
        elapsed: started.elapsed(),
    })
}

/// Extents sampled at the start of a file to judge whether it is fragmented.
const FRAGMENT_SAMPLE: usize = 64;
/// Mean data-extent length under which a file counts as fragmented.
const SMALL_EXTENT: u64 = 256 << 10;

/// Whether `file` is made of many small data extents (the first [`FRAGMENT_SAMPLE`] extents average under
/// [`SMALL_EXTENT`]). `copy_file_range` makes one synchronous call per extent, as `cp` does, while the io_uring
/// pipeline keeps several extents in flight: on 4 KiB of data every 1 MiB it was 1.4-1.9x faster than both here, so
/// such files go through io_uring whatever the data method (BENCHMARKS.md, shape "small"). Costs at most
/// 2 x [`FRAGMENT_SAMPLE`] `lseek`s.
pub(crate) fn fragmented(file: &File, path: &Path, size: u64) -> Result<bool, EngineError> {
    let (mut pos, mut count, mut data) = (0u64, 0usize, 0u64);
    while count < FRAGMENT_SAMPLE {
        let Some((start, end)) = next_extent(file, path, size, pos)? else {
            return Ok(false);
        };
        count += 1;
        data += end - start;
        pos = end;
    }
    Ok(data / FRAGMENT_SAMPLE as u64 <= SMALL_EXTENT)
}

/// The two copies the kernel does without our buffers.
#[derive(Clone, Copy)]
enum Kernel {
    Clone,
    CopyRange,
}

/// Copies every data extent of `src` into `dst` at the same offsets by reflink or `copy_file_range`, in chunks
/// (progress, cancel). Returns the bytes of data copied, or None when the mechanism does not apply here (refused
/// before anything was copied), so that the caller moves on to the next one.
fn by_kernel(
    job: &JobCtl,
    operation: &'static str,
    how: Kernel,
    (src, src_path): (&File, &Path),
    (dst, dst_path): (&File, &Path),
    size: u64,
) -> Result<Option<u64>, EngineError> {
    let chunk = match how {
        Kernel::Clone => CLONE_CHUNK,
        Kernel::CopyRange => COPY_RANGE_CHUNK,
    };
    let mut pos = 0;
    let mut data = 0u64;
    job.report(0, size);
    while let Some((start, end)) = next_extent(src, src_path, size, pos)? {
        let mut off = start;
        while off < end {
            if job.cancelled() {
                return Err(EngineError::Cancelled { operation, path: src_path.to_owned() });
            }
            let len = job.chunk(chunk).min(end - off);
            let result = match how {
                Kernel::Clone => syscalls::clone_range(src, dst, off, len).map(|()| len),
                Kernel::CopyRange => syscalls::copy_range(src, dst, off, len).map(|n| n as u64),
            };
            let n = match result {
                Ok(0) => return Err(EngineError::ShortRead { path: src_path.to_owned(), offset: off }),
                Ok(n) => n,
                Err(e) if data == 0 && syscalls::unsupported(&e) => {
                    tracing::debug!(path = %src_path.display(), error = %e, "in-kernel copy does not apply here");
                    return Ok(None);
                }
                Err(source) => {
                    let (src, dst) = (src_path.to_owned(), dst_path.to_owned());
                    return Err(match how {
                        Kernel::Clone => EngineError::Clone { src, dst, offset: off, source },
                        Kernel::CopyRange => EngineError::CopyRange { src, dst, offset: off, source },
                    });
                }
            };
            off += n;
            data += n;
            job.report(off, size);
            job.throttle(data);
        }
        pos = end;
    }
    job.report(size, size);
    Ok(Some(data))
}

pub(crate) fn sha256(worker: &mut Worker, job: &JobCtl, path: &Path) -> Result<Digest, EngineError> {
    let (file, size) = open_source(path)?;
    let tuning = worker.config.uring();
    let out = transfer(worker, job, "sha256", (&file, path), size, None, true, &tuning)?;
    Ok(Digest(out.sha256.expect("hash requested")))
}

pub(crate) fn create_raw(
    worker: &mut Worker,
    job: &JobCtl,
    path: &Path,
    size: u64,
    prealloc: Preallocation,
) -> Result<(), EngineError> {
    refuse_existing(path)?;
    let (tmp, file) = create_temp(path)?;
    let tmp_path = tmp.path().to_owned();
    job.report(0, size);
    set_len(&file, &tmp_path, size)?;
    if prealloc == Preallocation::Full && size > 0 {
        worker.ring.fallocate(file.as_raw_fd(), 0, 0, size).map_err(|source| EngineError::Allocate {
            path: tmp_path.clone(),
            offset: 0,
            len: size,
            source,
        })?;
    }
    if job.cancelled() {
        return Err(EngineError::Cancelled { operation: "create", path: path.to_owned() });
    }
    commit(&mut worker.ring, tmp, file, path, true)?;
    job.report(size, size);
    Ok(())
}

pub(crate) fn resize(
    worker: &mut Worker,
    path: &Path,
    new_size: u64,
    opts: &ResizeOptions,
) -> Result<u64, EngineError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| EngineError::Open { path: path.to_owned(), source })?;
    let current = file.metadata().map_err(|source| EngineError::Stat { path: path.to_owned(), source })?.len();
    if new_size < current && !opts.allow_shrink {
        return Err(EngineError::ShrinkRefused { path: path.to_owned(), current, requested: new_size });
    }
    set_len(&file, path, new_size)?;
    if opts.preallocation == Preallocation::Full && new_size > current {
        worker.ring.fallocate(file.as_raw_fd(), 0, current, new_size - current).map_err(|source| {
            EngineError::Allocate { path: path.to_owned(), offset: current, len: new_size - current, source }
        })?;
    }
    worker.ring.fsync(file.as_raw_fd()).map_err(|source| EngineError::Sync { path: path.to_owned(), source })?;
    Ok(current)
}

/// Makes every byte of `path` read as zero, freeing its blocks where the filesystem can punch holes and writing
/// zeros where it cannot.
pub(crate) fn zero(worker: &mut Worker, job: &JobCtl, path: &Path) -> Result<ZeroReport, EngineError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|source| EngineError::Open { path: path.to_owned(), source })?;
    let size = file.metadata().map_err(|source| EngineError::Stat { path: path.to_owned(), source })?.len();
    job.report(0, size);
    let mode = (FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE).bits() as i32;
    let punched = match worker.ring.fallocate(file.as_raw_fd(), mode, 0, size) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => false,
        Err(source) => return Err(EngineError::Allocate { path: path.to_owned(), offset: 0, len: size, source }),
    };
    if !punched {
        write_zeros(worker, job, &file, path, size)?;
    }
    worker.ring.fsync(file.as_raw_fd()).map_err(|source| EngineError::Sync { path: path.to_owned(), source })?;
    job.report(size, size);
    Ok(ZeroReport { size, punched })
}

/// Writes zeros over `[0, size)`, `queue_depth` blocks in flight, all from one zeroed buffer.
fn write_zeros(worker: &mut Worker, job: &JobCtl, file: &File, path: &Path, size: u64) -> Result<(), EngineError> {
    struct Drain<'a>(&'a mut Ring);
    impl Drop for Drain<'_> {
        fn drop(&mut self) {
            self.0.drain();
        }
    }
    let block = worker.config.block_size as u64;
    let depth = worker.config.queue_depth;
    let zeros = AlignedBuf::new(block as usize);
    let ring = Drain(&mut worker.ring);
    let mut next = 0u64;
    let mut completions = Vec::new();
    // Offsets of the writes in flight, to name the one that failed.
    let mut pending = std::collections::HashMap::new();
    let mut id = 0u64;
    loop {
        if job.cancelled() {
            return Err(EngineError::Cancelled { operation: "zero", path: path.to_owned() });
        }
        while ring.0.in_flight() < depth && next < size {
            let len = block.min(size - next);
            let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), zeros.as_ptr(), len as u32)
                .offset(next)
                .build()
                .user_data(id);
            // SAFETY: `zeros` is only read by the kernel and outlives every write: the Drain guard, declared after
            // it, drains the ring before `zeros` is dropped.
            unsafe { ring.0.push(&entry) }.map_err(|source| EngineError::Ring { source })?;
            pending.insert(id, (next, len));
            id += 1;
            next += len;
        }
        if ring.0.in_flight() == 0 {
            return Ok(());
        }
        completions.clear();
        ring.0.wait(&mut completions).map_err(|source| EngineError::Ring { source })?;
        for c in &completions {
            let (offset, len) = pending.remove(&c.user_data).expect("known write");
            let n = c.bytes().map_err(|source| EngineError::Write { path: path.to_owned(), offset, source })?;
            if (n as u64) < len {
                // Rare; finish this range synchronously rather than track partial zero writes.
                use std::os::unix::fs::FileExt;
                let rest = (len - n as u64) as usize;
                file.write_all_at(&zeros.as_slice()[..rest], offset + n as u64).map_err(|source| {
                    EngineError::Write { path: path.to_owned(), offset: offset + n as u64, source }
                })?;
            }
        }
        let done = next - pending.values().map(|(_, l)| l).sum::<u64>();
        job.report(done, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::control::{Cancel, JobCtl};
    use crate::OpControl;

    #[test]
    fn write_zeros_covers_unaligned_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0xa5u8; 300_001]).unwrap();
        let cfg = EngineConfig { queue_depth: 3, block_size: 64 << 10, ..EngineConfig::default() };
        let mut worker = Worker::new(cfg).unwrap();
        let job = JobCtl::new(OpControl::new(), Cancel::new());
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        write_zeros(&mut worker, &job, &file, &path, 300_001).unwrap();
        let back = std::fs::read(&path).unwrap();
        assert_eq!(back.len(), 300_001);
        assert!(back.iter().all(|&b| b == 0));
        assert_eq!(job.ctl.progress().done, 300_001);
    }
}
