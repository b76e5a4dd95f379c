//! Guest agent operations: what qemu-ga in a running guest says of it (OS, host name, time zone, interfaces, file
//! systems) and does in it (run a program, read or write a file, set a password). They need the VM running (a
//! paused guest cannot answer) and do not take the VM's operation lock: the agent is independent of lifecycle
//! operations, and a guest that never answers only costs its own caller the command's timeout.
//!
//! Every call goes through [`GuestAgent::call`], so the VM's [`AgentStatus`] follows what the agent did.

use std::sync::Arc;
use std::time::Duration;

use qx_qmp::qga::{qapi_qga, GuestExec, GuestExecStatus, OsInfo, QgaError};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Entry, Runtime, VmError, VmManager};
use crate::guest_agent::AgentStatus;
use crate::state::VmState;

/// The most a guest file read returns: what a gRPC message carries comfortably.
pub const MAX_GUEST_FILE_BYTES: usize = 16 << 20;
/// How often a running guest program is asked whether it exited, at most (the first checks come sooner).
const EXEC_POLL_MAX: Duration = Duration::from_millis(500);

/// What the guest agent tells of its guest.
#[derive(Debug, Clone)]
pub struct GuestInfo {
    pub agent: AgentStatus,
    /// `guest-get-osinfo`.
    pub os: OsInfo,
    /// `guest-get-host-name`.
    pub host_name: String,
    /// `guest-get-timezone`.
    pub timezone: Option<qapi_qga::GuestTimezone>,
    /// `guest-network-get-interfaces`.
    pub interfaces: Vec<qapi_qga::GuestNetworkInterface>,
    /// `guest-get-fsinfo`.
    pub filesystems: Vec<qapi_qga::GuestFilesystemInfo>,
    /// Parts the agent refused (a command disabled with `qemu-ga -b`, or unsupported by the guest OS), each as
    /// `command: error`; the rest is still reported.
    pub unavailable: Vec<String>,
}

/// How a guest program ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// The pid in the guest.
    pub pid: i64,
    pub status: GuestExecStatus,
}

fn agent_error(entry: &Entry, source: QgaError) -> VmError {
    VmError::GuestAgent { name: entry.name.clone(), source }
}

/// A refused command is reported in `unavailable` and leaves its part empty; silence fails the whole call.
fn optional<T>(
    result: Result<T, QgaError>,
    command: &str,
    unavailable: &mut Vec<String>,
) -> Result<Option<T>, QgaError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e @ QgaError::Command { .. }) => {
            unavailable.push(format!("{command}: {}", qx_common::error_chain(&e)));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl VmManager {
    /// The QEMU of a running VM, for a guest agent operation.
    fn agent_runtime(&self, name: &str, operation: &'static str) -> Result<(Arc<Entry>, Arc<Runtime>), VmError> {
        let entry = self.entry(name)?;
        let state = entry.state();
        match entry.runtime() {
            Some(runtime) if state == VmState::Running => Ok((entry, runtime)),
            _ => Err(VmError::WrongState { name: name.to_owned(), state, operation, needs: "running" }),
        }
    }

    /// The guest agent's status of a VM whose QEMU runs; `None` otherwise. Never waits for the guest.
    pub fn agent_status(&self, name: &str) -> Result<Option<AgentStatus>, VmError> {
        Ok(self.entry(name)?.runtime().map(|runtime| runtime.agent.status()))
    }

    /// OS, host name, time zone, interfaces and file systems, as the guest agent reports them. Valid when
    /// running.
    pub async fn guest_info(&self, name: &str) -> Result<GuestInfo, VmError> {
        let (entry, runtime) = self.agent_runtime(name, "guest info")?;
        let agent = &runtime.agent;
        let gathered = agent
            .call(|client| async move {
                let mut unavailable = Vec::new();
                let os = optional(client.osinfo().await, "guest-get-osinfo", &mut unavailable)?.unwrap_or_default();
                let host_name =
                    optional(client.host_name().await, "guest-get-host-name", &mut unavailable)?.unwrap_or_default();
                let timezone = optional(client.timezone().await, "guest-get-timezone", &mut unavailable)?;
                let interfaces =
                    optional(client.network_interfaces().await, "guest-network-get-interfaces", &mut unavailable)?
                        .unwrap_or_default();
                let filesystems =
                    optional(client.fsinfo().await, "guest-get-fsinfo", &mut unavailable)?.unwrap_or_default();
                Ok((os, host_name, timezone, interfaces, filesystems, unavailable))
            })
            .await
            .map_err(|e| agent_error(&entry, e))?;
        if agent.status().version.is_none() {
            // The version comes with guest-info; asked once per QEMU.
            agent.probe().await;
        }
        let (os, host_name, timezone, interfaces, filesystems, unavailable) = gathered;
        Ok(GuestInfo { agent: agent.status(), os, host_name, timezone, interfaces, filesystems, unavailable })
    }

    /// Runs a program in the guest and waits for it to exit, for at most `timeout`; `started` is told its guest
    /// pid first. A program still running at the timeout is killed (`kill -KILL` through the agent) and the
    /// answer is [`VmError::GuestExecTimeout`]. Valid when running.
    pub async fn guest_exec(
        &self,
        name: &str,
        exec: GuestExec,
        timeout: Duration,
        started: impl FnOnce(i64),
    ) -> Result<ExecOutcome, VmError> {
        let (entry, runtime) = self.agent_runtime(name, "guest exec")?;
        let agent = &runtime.agent;
        let deadline = Instant::now() + timeout;
        let pid =
            agent.call(|client| async move { client.exec(&exec).await }).await.map_err(|e| agent_error(&entry, e))?;
        info!(vm = %name, pid, "guest program started");
        started(pid);
        let mut pause = Duration::from_millis(20);
        loop {
            let status = agent
                .call(|client| async move { client.exec_status(pid).await })
                .await
                .map_err(|e| agent_error(&entry, e))?;
            if status.exited {
                return Ok(ExecOutcome { pid, status });
            }
            if Instant::now() + pause > deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(EXEC_POLL_MAX);
        }
        let kill = GuestExec {
            path: "kill".to_owned(),
            args: vec!["-KILL".to_owned(), pid.to_string()],
            ..GuestExec::default()
        };
        let killed = agent.call(|client| async move { client.exec(&kill).await }).await;
        if let Err(e) = &killed {
            warn!(vm = %name, pid, error = %e, "cannot kill the guest program that ran out of time");
        }
        Err(VmError::GuestExecTimeout { name: name.to_owned(), pid, timeout, killed: killed.is_ok() })
    }

    /// The content of a guest file, refused when longer than `max_bytes` (at most [`MAX_GUEST_FILE_BYTES`]).
    /// Valid when running.
    pub async fn guest_read_file(&self, name: &str, path: &str, max_bytes: usize) -> Result<Vec<u8>, VmError> {
        check_guest_path(path)?;
        let (entry, runtime) = self.agent_runtime(name, "guest file read")?;
        let max_bytes = max_bytes.min(MAX_GUEST_FILE_BYTES);
        runtime
            .agent
            .call(|client| async move { client.read_file(path, max_bytes).await })
            .await
            .map_err(|e| agent_error(&entry, e))
    }

    /// Writes (creates or truncates) a guest file. Valid when running.
    pub async fn guest_write_file(&self, name: &str, path: &str, content: &[u8]) -> Result<(), VmError> {
        check_guest_path(path)?;
        let (entry, runtime) = self.agent_runtime(name, "guest file write")?;
        runtime
            .agent
            .call(|client| async move { client.write_file(path, content).await })
            .await
            .map_err(|e| agent_error(&entry, e))?;
        info!(vm = %name, path, bytes = content.len(), "guest file written");
        Ok(())
    }

    /// Sets a guest user's password (`crypted`: already a crypt(3) hash). The password is never logged. Valid
    /// when running.
    pub async fn guest_set_password(
        &self,
        name: &str,
        user: &str,
        password: &str,
        crypted: bool,
    ) -> Result<(), VmError> {
        let mut problems = Vec::new();
        if user.is_empty() || user.contains([':', '\n', '/']) {
            problems.push(qx_common::FieldError::new("user", user, "must be a user name (no ':', '/' or newline)"));
        }
        if password.is_empty() {
            problems.push(qx_common::FieldError::new("password", "", "must not be empty"));
        }
        if !problems.is_empty() {
            return Err(crate::spec::ValidationErrors(problems).into());
        }
        let (entry, runtime) = self.agent_runtime(name, "guest password")?;
        runtime
            .agent
            .call(|client| async move { client.set_user_password(user, password.as_bytes(), crypted).await })
            .await
            .map_err(|e| agent_error(&entry, e))?;
        info!(vm = %name, user, "guest password set");
        Ok(())
    }
}

fn check_guest_path(path: &str) -> Result<(), VmError> {
    if path.starts_with('/') && !path.contains('\0') {
        Ok(())
    } else {
        Err(crate::spec::ValidationErrors::one("path", path, "must be an absolute guest path").into())
    }
}
