//! The copy system calls the engine uses besides io_uring, each a thin wrapper returning `io::Result`: reflink
//! (`FICLONERANGE`), `copy_file_range`, dropping a file's pages from the page cache, and naming a filesystem.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Shares `len` bytes of `src` at `offset` into `dst` at the same offset (`ioctl(FICLONERANGE)`): no data moves,
/// both files point at the same blocks until one is written. Offsets must be aligned to the filesystem's block size;
/// `len` may be unaligned only where it reaches the end of `src`. Fails with `EOPNOTSUPP` (or `EINVAL`, `ENOTTY`)
/// where the filesystem cannot share blocks and with `EXDEV` across filesystems.
pub(crate) fn clone_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: offset,
        src_length: len,
        dest_offset: offset,
    };
    // SAFETY: FICLONERANGE reads one `file_clone_range` through the pointer, which points at a live local of exactly
    // that type; both descriptors are open files owned by the caller for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &range as *const libc::file_clone_range) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies up to `len` bytes of `src` at `offset` to `dst` at the same offset inside the kernel (`copy_file_range`):
/// no user-space buffer, and a filesystem that can share or offload the copy does. Returns the bytes copied (0 at
/// the end of `src`).
pub(crate) fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<usize> {
    let (mut off_in, mut off_out) = (offset, offset);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    Ok(rustix::fs::copy_file_range(src.as_fd(), Some(&mut off_in), dst.as_fd(), Some(&mut off_out), len)?)
}

/// Asks the kernel to drop the file's clean pages from the page cache (`posix_fadvise(DONTNEED)`), so that the next
/// read comes from the disk; needs no privilege, unlike `drop_caches`.
pub(crate) fn drop_cached(file: &File) -> io::Result<()> {
    Ok(rustix::fs::fadvise(file.as_fd(), 0, None, rustix::fs::Advice::DontNeed)?)
}

/// Whether an error from [`clone_range`] or [`copy_range`] means "this mechanism does not apply here" (another one
/// should be used), as opposed to a real failure (no space, I/O error) to report.
pub(crate) fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS | libc::EBADF)
    )
}

/// The name of the filesystem holding `file`, for reports ("ext4", "xfs"); the magic number in hex when unknown.
pub(crate) fn filesystem_name(file: &File) -> String {
    let Ok(st) = rustix::fs::fstatfs(file.as_fd()) else { return "unknown".to_owned() };
    // The magic numbers of statfs(2).
    match st.f_type as u64 {
        0xEF53 => "ext4".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        0x9123_683E => "btrfs".to_owned(),
        0x0102_1994 => "tmpfs".to_owned(),
        0x6969 => "nfs".to_owned(),
        0x794C_7630 => "overlayfs".to_owned(),
        0x2FC1_2FC1 => "zfs".to_owned(),
        0xF2F5_2010 => "f2fs".to_owned(),
        other => format!("filesystem 0x{other:x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn copy_range_copies_and_drop_cached_keeps_content() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = File::create(dir.path().join("s")).unwrap();
        src.write_all(&[7u8; 10_000]).unwrap();
        let src = File::open(dir.path().join("s")).unwrap();
        let dst = File::options().write(true).create_new(true).open(dir.path().join("d")).unwrap();
        let mut done = 0;
        while done < 10_000 {
            let n = copy_range(&src, &dst, done, 10_000 - done).unwrap();
            assert!(n > 0);
            done += n as u64;
        }
        assert_eq!(copy_range(&src, &dst, 10_000, 100).unwrap(), 0);
        drop_cached(&src).unwrap();
        assert_eq!(std::fs::read(dir.path().join("d")).unwrap(), vec![7u8; 10_000]);
        assert_ne!(filesystem_name(&src), "");
    }
}
