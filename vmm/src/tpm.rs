//! A VM's TPM 2.0: the `swtpm` process a VM with `tpm: true` gets at every start, its state kept in the VM's
//! directory (`qx_devices::tpm` renders the arguments and binds the control socket).
//!
//! swtpm runs in its own process group like QEMU, so a daemon crash leaves both running, and exits by itself when
//! QEMU closes the connection (`--terminate`): a stopped or crashed VM leaves no swtpm behind, and a restarted
//! daemon has nothing to adopt.

use std::fs::OpenOptions;
use std::os::fd::RawFd;
use std::path::Path;

use qx_devices::tpm::{Swtpm, TpmError, SWTPM_BINARY};

use crate::persist::VmDir;
use crate::process::{ProcessError, QemuProcess};

/// Where swtpm finds the listening control socket qx-node bound.
const CTRL_FD: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum TpmStartError {
    #[error("cannot prepare the TPM state and control socket")]
    Prepare(#[from] TpmError),
    #[error("cannot open the swtpm log {path}")]
    Log {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start swtpm (Debian's swtpm package)")]
    Spawn(#[from] ProcessError),
}

/// The VM's TPM: where its state and sockets are.
pub fn swtpm_of(dir: &VmDir) -> Swtpm {
    Swtpm::new(dir.path(), dir.path())
}

/// Starts the VM's swtpm, listening before QEMU exists, and returns it with QEMU's arguments for it. The caller
/// kills it when QEMU does not come up (swtpm leaves only when a connected QEMU goes) and otherwise lets
/// [`reap`] collect it.
pub async fn start(dir: &VmDir) -> Result<(QemuProcess, Vec<String>), TpmStartError> {
    let swtpm = swtpm_of(dir);
    let prepared = {
        let swtpm = swtpm.clone();
        qx_common::blocking(move || -> Result<_, TpmStartError> {
            let listener = swtpm.prepare()?;
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(swtpm.log())
                .map_err(|source| TpmStartError::Log { path: swtpm.log().display().to_string(), source })?;
            Ok((listener, log))
        })
        .await
    };
    let (listener, log) = prepared?;
    let process = QemuProcess::spawn(Path::new(SWTPM_BINARY), &swtpm.args(CTRL_FD), vec![(listener, CTRL_FD)], log)?;
    Ok((process, swtpm.qemu_args()))
}

/// Collects swtpm once it exits (with its QEMU), so no zombie remains.
pub fn reap(process: QemuProcess) {
    tokio::spawn(async move {
        process.exited().await;
    });
}
