//! A TPM 2.0 for a VM: `swtpm` (Debian's `swtpm`), one process per VM with the TPM's state in the VM's directory,
//! and QEMU's `tpm-crb` device wired to it.
//!
//! qx-node binds the control socket itself and hands swtpm the listening fd, so QEMU can connect the moment swtpm
//! runs, with no wait for a socket file to appear. swtpm runs in its own process group like QEMU (a daemon crash
//! leaves both running), writes a pidfile by which a restarted daemon finds it again ([`is_swtpm_of`]), and exits
//! when QEMU closes the connection (`--terminate`), so a stopped or crashed VM leaves no swtpm behind.

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::firmware::opt_value;
use crate::host::HostRoot;

pub const SWTPM_BINARY: &str = "swtpm";
/// The directory, in the VM's directory, holding the TPM's persistent state (`tpm2-00.permall`).
pub const STATE_DIR: &str = "tpm";

const CHARDEV_ID: &str = "qx-tpm0-chr";
const TPMDEV_ID: &str = "qx-tpm0";

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("cannot create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on the swtpm control socket {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where one VM's swtpm keeps its state and its runtime files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swtpm {
    /// Persistent, kept (and migrated) with the VM: `<vm dir>/tpm`.
    pub state_dir: PathBuf,
    /// Runtime files: control socket, pidfile, log.
    pub run_dir: PathBuf,
}

impl Swtpm {
    pub fn new(vm_dir: &Path, run_dir: &Path) -> Self {
        Self { state_dir: vm_dir.join(STATE_DIR), run_dir: run_dir.to_owned() }
    }

    pub fn ctrl_socket(&self) -> PathBuf {
        self.run_dir.join("swtpm.sock")
    }

    pub fn pidfile(&self) -> PathBuf {
        self.run_dir.join("swtpm.pid")
    }

    pub fn log(&self) -> PathBuf {
        self.run_dir.join("swtpm.log")
    }

    /// Creates the state directory (0700: the TPM's secrets) and binds the control socket, replacing a stale one.
    /// The listener goes to swtpm as the fd [`Swtpm::args`] names.
    pub fn prepare(&self) -> Result<OwnedFd, TpmError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [&self.state_dir, &self.run_dir] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| TpmError::CreateDir { path: dir.clone(), source })?;
        }
        let socket = self.ctrl_socket();
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(TpmError::Listen { path: socket, source }),
        }
        let listener = UnixListener::bind(&socket).map_err(|source| TpmError::Listen { path: socket, source })?;
        Ok(listener.into())
    }

    /// swtpm's arguments, with the control socket's listener at fd `ctrl_fd` in the child.
    pub fn args(&self, ctrl_fd: RawFd) -> Vec<OsString> {
        [
            "socket".to_owned(),
            "--tpm2".to_owned(),
            "--tpmstate".to_owned(),
            format!("dir={},mode=0600", opt_value(&self.state_dir)),
            "--ctrl".to_owned(),
            format!("type=unixio,fd={ctrl_fd}"),
            "--pid".to_owned(),
            format!("file={}", opt_value(&self.pidfile())),
            "--log".to_owned(),
            format!("file={},level=1", opt_value(&self.log())),
            "--terminate".to_owned(),
        ]
        .into_iter()
        .map(OsString::from)
        .collect()
    }

    /// QEMU's side: the chardev to the control socket, the emulator backend, and a CRB interface (what Windows 11
    /// and Linux expect on q35).
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-chardev".to_owned(),
            format!("socket,id={CHARDEV_ID},path={}", opt_value(&self.ctrl_socket())),
            "-tpmdev".to_owned(),
            format!("emulator,id={TPMDEV_ID},chardev={CHARDEV_ID}"),
            "-device".to_owned(),
            format!("tpm-crb,tpmdev={TPMDEV_ID},id={TPMDEV_ID}-dev"),
        ]
    }
}

/// Whether `pid` is the swtpm of `swtpm` (by its `--tpmstate dir=`), alive and not a zombie: how a restarted
/// daemon knows the pidfile still names its process.
pub fn is_swtpm_of(root: &HostRoot, pid: i32, swtpm: &Swtpm) -> bool {
    let proc_dir = root.path(format!("/proc/{pid}"));
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_swtpm = args.first().is_some_and(|argv0| argv0.ends_with(SWTPM_BINARY.as_bytes()));
    let state = format!("dir={},mode=0600", opt_value(&swtpm.state_dir));
    let zombie = std::fs::read_to_string(proc_dir.join("stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true);
    is_swtpm && args.contains(&state.as_bytes()) && !zombie
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_for_swtpm_and_qemu() {
        let tpm = Swtpm::new(Path::new("/data/vms/a"), Path::new("/run/qx/a"));
        let args: Vec<String> = tpm.args(3).into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(
            args,
            [
                "socket",
                "--tpm2",
                "--tpmstate",
                "dir=/data/vms/a/tpm,mode=0600",
                "--ctrl",
                "type=unixio,fd=3",
                "--pid",
                "file=/run/qx/a/swtpm.pid",
                "--log",
                "file=/run/qx/a/swtpm.log,level=1",
                "--terminate"
            ]
        );
        assert_eq!(
            tpm.qemu_args(),
            [
                "-chardev",
                "socket,id=qx-tpm0-chr,path=/run/qx/a/swtpm.sock",
                "-tpmdev",
                "emulator,id=qx-tpm0,chardev=qx-tpm0-chr",
                "-device",
                "tpm-crb,tpmdev=qx-tpm0,id=qx-tpm0-dev"
            ]
        );
    }

    #[test]
    fn recognises_only_its_own_swtpm() {
        let root = tempfile::tempdir().unwrap();
        let tpm = Swtpm::new(Path::new("/data/vms/a"), Path::new("/run/qx/a"));
        let other = Swtpm::new(Path::new("/data/vms/b"), Path::new("/run/qx/b"));
        let fake = |pid: i32, argv0: &str, state: &str| {
            let dir = root.path().join(format!("proc/{pid}"));
            std::fs::create_dir_all(&dir).unwrap();
            let mut argv = vec![argv0.to_owned()];
            argv.extend(tpm.args(3).into_iter().map(|a| a.into_string().unwrap()));
            std::fs::write(dir.join("cmdline"), argv.join("\0")).unwrap();
            std::fs::write(dir.join("stat"), format!("{pid} (swtpm) {state} 1")).unwrap();
        };
        fake(10, "/usr/bin/swtpm", "S");
        fake(11, "/usr/bin/sleep", "S");
        fake(12, "swtpm", "Z");
        let host = HostRoot::new(root.path());
        assert!(is_swtpm_of(&host, 10, &tpm));
        assert!(!is_swtpm_of(&host, 10, &other), "another VM's state dir");
        assert!(!is_swtpm_of(&host, 11, &tpm), "not swtpm");
        assert!(!is_swtpm_of(&host, 12, &tpm), "zombie");
        assert!(!is_swtpm_of(&host, 13, &tpm), "gone");
    }
}
