//! QEMU processes: spawned into their own process group (so they outlive the daemon), watched through a pidfd,
//! and recognised again after a daemon restart.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};
use tokio::io::unix::AsyncFd;
use uuid::Uuid;

use crate::host::HostRoot;

/// Fds handed to the child are first moved at or above this number, so that placing them at their target numbers
/// (3, 4, ...) never overwrites one another.
const FD_STAGING_FLOOR: RawFd = 10;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot prepare fd {target} for QEMU")]
    FdStage {
        target: RawFd,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot spawn {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open a pidfd for pid {pid}")]
    PidfdOpen {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the pidfd of pid {pid}")]
    PidfdWatch {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
}

/// A running QEMU, ours or adopted after a restart.
pub struct QemuProcess {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
}

impl std::fmt::Debug for QemuProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProcess").field("pid", &self.pid).finish()
    }
}

impl QemuProcess {
    /// Spawns `binary args` in a new process group, stdin from /dev/null, stdout and stderr to `log`, with each
    /// `(fd, target)` of `fds` open in the child at number `target`. Must be called inside a tokio runtime.
    pub fn spawn(
        binary: &Path,
        args: &[OsString],
        fds: Vec<(OwnedFd, RawFd)>,
        log: File,
    ) -> Result<Self, ProcessError> {
        let mut staged = Vec::with_capacity(fds.len());
        for (fd, target) in fds {
            let high = rustix::io::fcntl_dupfd_cloexec(&fd, FD_STAGING_FLOOR)
                .map_err(|e| ProcessError::FdStage { target, source: e.into() })?;
            staged.push((high, target));
        }
        let moves: Vec<(RawFd, RawFd)> = staged.iter().map(|(fd, target)| (fd.as_raw_fd(), *target)).collect();
        let stderr =
            log.try_clone().map_err(|e| ProcessError::Spawn { binary: binary.display().to_string(), source: e })?;

        let mut command = Command::new(binary);
        command.args(args).stdin(Stdio::null()).stdout(log).stderr(stderr).process_group(0);
        // SAFETY: the closure runs between fork and exec and only calls dup2, which is async-signal-safe. Staged fds
        // are >= FD_STAGING_FLOOR and targets below it, so no dup2 overwrites a source not yet moved; dup2 clears
        // FD_CLOEXEC on the target, so exactly these fds survive exec.
        unsafe {
            command.pre_exec(move || {
                for &(from, to) in &moves {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child =
            command.spawn().map_err(|e| ProcessError::Spawn { binary: binary.display().to_string(), source: e })?;
        drop(staged);
        let pid = child.id() as i32;
        // The pid cannot be reused before we reap it, so the pidfd names our child.
        Self::watch(pid)
    }

    /// Takes over a QEMU left running by an earlier daemon, if `pid` still is the QEMU of the VM `uuid`.
    /// `Ok(None)` when it is gone or is something else now.
    pub fn adopt(pid: i32, uuid: Uuid, host: &HostRoot) -> Result<Option<Self>, ProcessError> {
        // Open the pidfd first: once open it names one process for good, so the check below cannot be fooled by
        // pid reuse between check and open.
        let process = match Self::watch(pid) {
            Ok(process) => process,
            Err(ProcessError::PidfdOpen { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if is_qemu_of(host, pid, uuid) {
            return Ok(Some(process));
        }
        // After qx-node re-executes itself its QEMUs are still its children, and one that exited in between is a
        // zombie (which `is_qemu_of` refuses) that only we can reap. For anything else this is a no-op: a live
        // process is not waited for (WNOHANG) and a process that is not our child gives ECHILD.
        process.reap();
        Ok(None)
    }

    fn watch(pid: i32) -> Result<Self, ProcessError> {
        let raw = Pid::from_raw(pid)
            .ok_or(ProcessError::PidfdOpen { pid, source: std::io::Error::from(std::io::ErrorKind::InvalidInput) })?;
        let fd =
            pidfd_open(raw, PidfdFlags::NONBLOCK).map_err(|e| ProcessError::PidfdOpen { pid, source: e.into() })?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open and names the same pidfd until the
        // AsyncFd is dropped.
        let pidfd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| ProcessError::PidfdWatch { pid, source: e.into_parts().1 })?;
        Ok(Self { pid, pidfd })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves when the process has exited; returns how, when it was our child: one we spawned, or one adopted
    /// after qx-node re-executed itself (QEMUs adopted after a daemon crash are reaped by init).
    pub async fn exited(&self) -> Option<String> {
        // A pidfd polls readable once the process exits; a watch error can only mean the fd is unusable, and then
        // the process cannot be watched any longer either.
        let _ = self.pidfd.readable().await;
        self.reap()
    }

    /// Collects our child's exit status so no zombie remains.
    fn reap(&self) -> Option<String> {
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG only writes the status integer we own; for a pid that is not our child it
        // fails with ECHILD and touches nothing.
        let reaped = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        (reaped == self.pid).then(|| {
            if libc::WIFSIGNALED(status) {
                format!("killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("exited with status {}", libc::WEXITSTATUS(status))
            }
        })
    }

    /// SIGKILL, through the pidfd so it can never hit a recycled pid.
    pub fn kill(&self) -> std::io::Result<()> {
        match pidfd_send_signal(self.pidfd.get_ref().as_fd(), Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Whether `pid` runs a QEMU started for the VM `uuid`: its argv holds `-uuid <uuid>` and it is not a zombie.
pub fn is_qemu_of(host: &HostRoot, pid: i32, uuid: Uuid) -> bool {
    let proc_dir = host.path(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_qemu = args.first().is_some_and(|argv0| argv0.windows(4).any(|w| w == b"qemu"));
    let uuid = uuid.to_string();
    let has_uuid = args.windows(2).any(|w| w[0] == b"-uuid" && w[1] == uuid.as_bytes());
    let zombie = std::fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true);
    is_qemu && has_uuid && !zombie
}

/// Reads a QEMU pidfile.
pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok().filter(|pid| *pid > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(root: &Path, pid: i32, argv: &[&str], state: &str) {
        let dir = root.join(format!("proc/{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cmdline"), argv.join("\0") + "\0").unwrap();
        std::fs::write(dir.join("stat"), format!("{pid} (qemu-system-x86) {state} 1 2 3")).unwrap();
    }

    #[test]
    fn recognises_only_the_right_qemu() {
        let root = tempfile::tempdir().unwrap();
        let host = HostRoot::new(root.path());
        let uuid = Uuid::new_v4();
        let u = uuid.to_string();
        fake_proc(root.path(), 10, &["/usr/bin/qemu-system-x86_64", "-name", "x", "-uuid", &u], "S");
        fake_proc(root.path(), 11, &["/usr/bin/qemu-system-x86_64", "-uuid", &Uuid::new_v4().to_string()], "S");
        fake_proc(root.path(), 12, &["/bin/sleep", "-uuid", &u], "S");
        fake_proc(root.path(), 13, &["/usr/bin/qemu-system-x86_64", "-uuid", &u], "Z");
        assert!(is_qemu_of(&host, 10, uuid));
        assert!(!is_qemu_of(&host, 11, uuid), "another VM's QEMU");
        assert!(!is_qemu_of(&host, 12, uuid), "not QEMU");
        assert!(!is_qemu_of(&host, 13, uuid), "zombie");
        assert!(!is_qemu_of(&host, 14, uuid), "gone");
    }

    #[tokio::test]
    async fn spawned_processes_get_their_fds_and_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let log = File::create(dir.path().join("log")).unwrap();
        let (reader, writer) = std::io::pipe().unwrap();
        let script = "echo hello >&3; exit 7".to_owned();
        let args: Vec<OsString> = ["-c", &script].iter().map(OsString::from).collect();
        let process = QemuProcess::spawn(Path::new("/bin/sh"), &args, vec![(writer.into(), 3)], log).unwrap();
        let status = process.exited().await;
        assert_eq!(status.as_deref(), Some("exited with status 7"));
        let mut out = String::new();
        std::io::Read::read_to_string(&mut { reader }, &mut out).unwrap();
        assert_eq!(out, "hello\n");
    }

    #[tokio::test]
    // The child is reaped by `adopt`, which is what this test checks.
    #[allow(clippy::zombie_processes)]
    async fn adopting_an_exited_child_reaps_it() {
        let child = Command::new("/bin/sh").args(["-c", "exit 3"]).spawn().unwrap();
        let pid = child.id() as i32;
        let zombie = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        };
        while !zombie() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let adopted = QemuProcess::adopt(pid, Uuid::new_v4(), &HostRoot::default()).unwrap();
        assert!(adopted.is_none(), "an exited process is not adopted");
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "and it is no zombie any more");
    }

    #[tokio::test]
    async fn kill_goes_through_the_pidfd() {
        let dir = tempfile::tempdir().unwrap();
        let log = File::create(dir.path().join("log")).unwrap();
        let args = vec![OsString::from("60")];
        let process = QemuProcess::spawn(Path::new("/bin/sleep"), &args, Vec::new(), log).unwrap();
        process.kill().unwrap();
        assert_eq!(process.exited().await.as_deref(), Some("killed by signal 9"));
        process.kill().unwrap();
    }
}
