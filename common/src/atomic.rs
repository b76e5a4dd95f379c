//! Crash-safe file replacement: write a temporary file in the same directory, fsync it, rename it over the target,
//! fsync the directory. A reader sees the old file or the new one, never a torn mix, even across power loss.
//!
//! Also the temporary-name scheme every long operation uses (storage pools sweep its leftovers), and the guard that
//! removes a temporary file unless the operation that made it succeeded.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{renameat_with, RenameFlags, CWD};

/// The marker in every temporary name this module creates; pools sweep files carrying it at start-up, because only an
/// operation that was killed half-way leaves one behind.
pub const TEMP_MARKER: &str = ".qx-tmp.";

#[derive(Debug, thiserror::Error)]
pub enum AtomicError {
    #[error("create temporary file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("write temporary file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fsync {path}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no parent directory or file name")]
    NoParent { path: PathBuf },
    #[error("write {path} on a blocking thread")]
    Join {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// A fresh name in `target`'s directory for a temporary file that will become `target`: hidden, unique within the
/// process and across processes, and carrying [`TEMP_MARKER`].
pub fn temp_path_for(target: &Path) -> Result<PathBuf, AtomicError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(AtomicError::NoParent { path: target.to_owned() });
    };
    let mut tmp = OsString::from(".");
    tmp.push(name);
    tmp.push(format!("{TEMP_MARKER}{}.{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    Ok(dir.join(tmp))
}

/// Writes `data` to `path` atomically (see the module doc) with mode 0600. Blocking: call it from
/// `spawn_blocking` or use [`write_atomic_async`].
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), AtomicError> {
    let tmp = temp_path_for(path)?;
    let mut guard = TempFile::new(tmp.clone());
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|source| AtomicError::Create { path: tmp.clone(), source })?;
    file.write_all(data).map_err(|source| AtomicError::Write { path: tmp.clone(), source })?;
    file.sync_all().map_err(|source| AtomicError::Sync { path: tmp.clone(), source })?;
    drop(file);
    fs::rename(&tmp, path).map_err(|source| AtomicError::Rename { from: tmp.clone(), to: path.to_owned(), source })?;
    guard.disarm();
    sync_parent(path)
}

/// [`write_atomic`] on tokio's blocking pool.
pub async fn write_atomic_async(path: PathBuf, data: Vec<u8>) -> Result<(), AtomicError> {
    let p = path.clone();
    tokio::task::spawn_blocking(move || write_atomic(&p, &data))
        .await
        .map_err(|source| AtomicError::Join { path, source })?
}

/// Fsyncs the directory holding `path`, so that a rename or unlink in it survives a crash.
pub fn sync_parent(path: &Path) -> Result<(), AtomicError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        Some(_) => Path::new("."),
        None => return Err(AtomicError::NoParent { path: path.to_owned() }),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(|source| AtomicError::Sync { path: dir.to_owned(), source })
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`). Uses RENAME_NOREPLACE; filesystems without it
/// (some NFS servers) get a check-then-rename, which is only racy against writers outside this daemon.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            if to.symlink_metadata().is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            fs::rename(from, to)
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes every file in `dir` whose name carries [`TEMP_MARKER`]: leftovers of operations that were killed. Returns
/// the paths it removed.
pub fn sweep_temp_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().contains(TEMP_MARKER) && entry.file_type()?.is_file() {
            fs::remove_file(entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

/// Removes the file at `path` when dropped, unless [`TempFile::disarm`] was called: a failed or cancelled
/// operation leaves nothing behind, whichever way it returns.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    /// A guard that removes `path` when dropped.
    pub fn new(path: PathBuf) -> Self {
        Self { path, armed: true }
    }

    /// The guarded file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the file: the operation that made it succeeded.
    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let path = std::mem::take(&mut self.path);
        let remove = move || {
            if let Err(e) = fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove temporary file");
                }
            }
        };
        // Dropped on a tokio runtime thread (an async operation failed or its future was dropped): unlink on the
        // blocking pool rather than on the runtime thread. Elsewhere (engine threads, plain threads): right here.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("state.json")]);
    }

    #[test]
    fn write_atomic_into_missing_dir_names_the_temp_file() {
        let err = write_atomic(Path::new("/nonexistent-qx/dir/state.json"), b"x").unwrap_err();
        assert!(matches!(err, AtomicError::Create { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent-qx/dir/.state.json.qx-tmp."), "{err}");
    }

    #[test]
    fn temp_names_are_unique_hidden_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vol.raw");
        let a = temp_path_for(&target).unwrap();
        let b = temp_path_for(&target).unwrap();
        assert_ne!(a, b);
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(".vol.raw.qx-tmp."));
        fs::write(&a, b"x").unwrap();
        fs::write(&target, b"keep").unwrap();
        assert_eq!(sweep_temp_files(dir.path()).unwrap(), vec![a]);
        assert!(target.exists());
    }

    #[test]
    fn rename_noreplace_refuses_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert_eq!(fs::read(&b).unwrap(), b"a");
    }

    #[test]
    fn temp_file_guard_removes_unless_disarmed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, b"").unwrap();
        fs::write(&b, b"").unwrap();
        drop(TempFile::new(a.clone()));
        let mut keep = TempFile::new(b.clone());
        keep.disarm();
        drop(keep);
        assert!(!a.exists());
        assert!(b.exists());
    }
}
