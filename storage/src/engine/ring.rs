//! The only place that touches io_uring and raw buffer memory: a ring that counts what it has in flight, and
//! page-aligned buffers that O_DIRECT accepts.
//!
//! The invariant every caller relies on: a buffer handed to the kernel in a submission stays allocated and untouched
//! until its completion has been reaped. [`Ring::drain`] waits for every outstanding completion, and the pipelines in
//! `ops.rs` call it (from `Drop` as well) before their buffers can go away.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use io_uring::{opcode, squeue, types, IoUring};

/// The alignment O_DIRECT needs on every block device and filesystem Quantix runs on (logical blocks up to 4 KiB).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// One completion: the `user_data` the submission carried and the kernel's result (a byte count, or `-errno`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub user_data: u64,
    pub result: i32,
}

impl Completion {
    /// The result as a byte count, or the error the kernel reported.
    pub fn bytes(self) -> io::Result<usize> {
        if self.result < 0 {
            Err(io::Error::from_raw_os_error(-self.result))
        } else {
            Ok(self.result as usize)
        }
    }
}

pub(crate) struct Ring {
    ring: IoUring,
    in_flight: usize,
}

impl Ring {
    pub fn new(entries: u32) -> io::Result<Self> {
        let ring = IoUring::builder().setup_clamp().build(entries.max(2))?;
        Ok(Self { ring, in_flight: 0 })
    }

    /// Submissions whose completions have not been reaped yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Queues one submission, handing the queue to the kernel first when it is full.
    ///
    /// # Safety
    ///
    /// Every buffer the entry points at must stay allocated, and must not be read (for reads) or written (for
    /// writes) by anyone else, until the completion carrying the entry's `user_data` has been returned by
    /// [`Ring::wait`] or [`Ring::drain`].
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the buffers outlive the operation (this function's contract).
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Submits what is queued, waits for at least one completion when anything is in flight, and appends every
    /// completion that is ready to `out`.
    pub fn wait(&mut self, out: &mut Vec<Completion>) -> io::Result<()> {
        if self.in_flight == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The completion queue is full: reap below, which makes room.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => return Err(e),
            }
        }
        for cqe in self.ring.completion() {
            self.in_flight -= 1;
            out.push(Completion { user_data: cqe.user_data(), result: cqe.result() });
        }
        Ok(())
    }

    /// Waits until nothing is in flight, dropping the results. Used when an operation stops early (error, cancel), so
    /// that the buffers it owns can be freed.
    pub fn drain(&mut self) {
        let mut scratch = Vec::new();
        while self.in_flight > 0 {
            scratch.clear();
            if let Err(e) = self.wait(&mut scratch) {
                // Waiting itself failed (it does not on a healthy kernel); leaking the ring's buffers is not an option
                // for the caller, so keep trying rather than return with kernel writes pending into freed memory.
                tracing::error!(error = %e, in_flight = self.in_flight, "io_uring wait failed while draining, retrying");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    /// Runs one submission that references no memory of ours and returns its result.
    fn run_one(&mut self, entry: squeue::Entry) -> io::Result<usize> {
        debug_assert_eq!(self.in_flight, 0, "run_one with operations in flight");
        // SAFETY: the callers below only build entries that point at no user memory (fsync, fallocate, ftruncate).
        unsafe { self.push(&entry.user_data(u64::MAX))? };
        let mut out = Vec::with_capacity(1);
        while out.is_empty() {
            self.wait(&mut out)?;
        }
        out[0].bytes()
    }

    pub fn fsync(&mut self, fd: RawFd) -> io::Result<()> {
        self.run_one(opcode::Fsync::new(types::Fd(fd)).build()).map(drop)
    }

    pub fn fallocate(&mut self, fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(types::Fd(fd), len).offset(offset).mode(mode).build();
        self.run_one(entry).map(drop)
    }
}

/// A heap buffer aligned for O_DIRECT, zero-filled when allocated.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>; nothing in it is tied to a thread.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN).expect("buffer layout");
        // SAFETY: the layout has a non-zero size (at least DIRECT_ALIGN).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { alloc::handle_alloc_error(layout) };
        Self { ptr, layout }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points at layout.size() initialised (zeroed at allocation) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once, here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Whether every byte is zero. Checks a short head first (data blocks almost always fail there), then whole
/// 256-byte blocks with an OR-reduction the compiler vectorises.
pub(crate) fn is_zero(buf: &[u8]) -> bool {
    let head = buf.len().min(16);
    if buf[..head].iter().any(|&b| b != 0) {
        return false;
    }
    let mut blocks = buf.chunks_exact(256);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let buf = AlignedBuf::new(10_000);
        assert_eq!(buf.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(buf.as_slice().len(), 10_000);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
    }

    #[test]
    fn is_zero_finds_a_single_byte_anywhere() {
        let mut v = vec![0u8; 4096 + 77];
        assert!(is_zero(&v));
        for pos in [0, 15, 16, 300, 4095, 4096 + 76] {
            v[pos] = 1;
            assert!(!is_zero(&v), "byte at {pos}");
            v[pos] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn ring_runs_fsync_and_fallocate() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let mut ring = Ring::new(4).unwrap();
        use std::os::fd::AsRawFd;
        ring.fallocate(file.as_raw_fd(), 0, 0, 8192).unwrap();
        ring.fsync(file.as_raw_fd()).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 8192);
        assert_eq!(ring.in_flight(), 0);
    }
}
