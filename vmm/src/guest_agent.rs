//! The guest agent of a running VM as the manager holds it: one QGA connection per QEMU (its chardev serves one
//! client at a time, so qx-node keeps that one), opened at first use and again after it closed, and what
//! qx-node last learnt of the agent ([`AgentStatus`]), which GetVm reports without waiting for the guest.
//!
//! The status changes on QMP's `VSERPORT_CHANGE` for the agent's port (the guest opened or closed it: qemu-ga
//! started or stopped), and after every exchange: an answer (even an error answer) is `connected`, silence past a
//! command's timeout is `not responding`.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qx_qmp::qga::{QgaClient, QgaError, QgaOptions};
use tracing::{debug, info};

/// The virtio-serial port qemu-ga opens in the guest (`cmdline`'s `virtserialport` id).
pub const AGENT_PORT_ID: &str = "qga0";

/// What qx-node knows of a VM's guest agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    /// Nothing heard yet: the guest is booting, or has no agent.
    Unknown,
    /// The agent answered the last exchange.
    Connected,
    /// The last exchange got no answer in its timeout, or the guest closed the agent's port.
    NotResponding,
}

impl AgentState {
    /// The name front ends show.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentState::Unknown => "unknown",
            AgentState::Connected => "connected",
            AgentState::NotResponding => "not responding",
        }
    }
}

impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A VM's guest agent as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub state: AgentState,
    /// `guest-info`'s version (e.g. `7.2.22`), once the agent told it.
    pub version: Option<String>,
    /// Why the state is what it is (the error of the exchange that failed).
    pub reason: String,
    /// When the state last changed.
    pub since_unix_ms: i64,
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Timeouts qx-node uses with guest agents: the library's defaults (ping and sync 3 s, freeze 10 min, thaw
/// 3 min), and a short connect, since the socket is qx-node's own and exists while QEMU runs.
pub fn agent_options() -> QgaOptions {
    QgaOptions { connect_timeout: Duration::from_secs(2), ..QgaOptions::default() }
}

/// The agent connection and status of one QEMU.
pub(crate) struct GuestAgent {
    socket: PathBuf,
    opts: QgaOptions,
    client: tokio::sync::Mutex<Option<QgaClient>>,
    status: Mutex<AgentStatus>,
}

impl GuestAgent {
    pub(crate) fn new(socket: PathBuf, opts: QgaOptions) -> Self {
        let status = AgentStatus {
            state: AgentState::Unknown,
            version: None,
            reason: "no answer from the guest agent yet".to_owned(),
            since_unix_ms: now_unix_ms(),
        };
        Self { socket, opts, client: tokio::sync::Mutex::new(None), status: Mutex::new(status) }
    }

    pub(crate) fn status(&self) -> AgentStatus {
        self.status.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, state: AgentState, version: Option<String>, reason: String) {
        let mut status = self.status.lock().unwrap_or_else(|e| e.into_inner());
        if status.state != state {
            info!(from = %status.state, to = %state, %reason, "guest agent");
            status.since_unix_ms = now_unix_ms();
        }
        status.state = state;
        if version.is_some() {
            status.version = version;
        }
        status.reason = reason;
    }

    /// The connection, opened now if there is none or the last one closed.
    async fn client(&self) -> Result<QgaClient, QgaError> {
        let mut client = self.client.lock().await;
        if let Some(open) = client.as_ref().filter(|c| !c.is_closed()) {
            return Ok(open.clone());
        }
        let opened = QgaClient::connect(&self.socket, self.opts).await?;
        debug!(socket = %self.socket.display(), "guest agent connection opened");
        *client = Some(opened.clone());
        Ok(opened)
    }

    /// Runs `call` on the agent and records what its outcome says of the agent.
    pub(crate) async fn call<T, F, Fut>(&self, call: F) -> Result<T, QgaError>
    where
        F: FnOnce(QgaClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, QgaError>>,
    {
        let result = match self.client().await {
            Ok(client) => call(client).await,
            Err(e) => Err(e),
        };
        self.record(&result);
        result
    }

    fn record<T>(&self, result: &Result<T, QgaError>) {
        match result {
            Ok(_) => self.set(AgentState::Connected, None, "the guest agent answered".to_owned()),
            Err(e) if answered(e) => self.set(AgentState::Connected, None, "the guest agent answered".to_owned()),
            Err(e) => self.set(AgentState::NotResponding, None, qx_common::error_chain(e)),
        }
    }

    /// Asks the agent for its version; the status says how that went.
    pub(crate) async fn probe(&self) {
        if let Ok(info) = self.call(|client| async move { client.info().await }).await {
            self.set(AgentState::Connected, Some(info.version), "the guest agent answered".to_owned());
        }
    }

    /// [`probe`](Self::probe), then thaws a guest left frozen: only qx-node freezes guests (around a disk-only
    /// snapshot), so a frozen guest after a daemon restart is one whose snapshot was cut short.
    pub(crate) async fn probe_and_thaw(&self) {
        self.probe().await;
        if self.status().state != AgentState::Connected {
            return;
        }
        let frozen = self.call(|client| async move { client.fsfreeze_status().await }).await;
        if matches!(frozen, Ok(qx_qmp::qga::FreezeStatus::Frozen)) {
            match self.call(|client| async move { client.fsfreeze_thaw().await }).await {
                Ok(n) => info!(thawed = n, "thawed a guest left frozen by a snapshot cut short"),
                Err(e) => tracing::error!(error = %e, "the guest is frozen and thawing it failed"),
            }
        }
    }

    /// The guest closed the agent's port: qemu-ga stopped (or the guest is shutting down).
    pub(crate) fn port_closed(&self) {
        self.set(AgentState::NotResponding, None, "the guest closed the agent's port (qemu-ga stopped)".to_owned());
    }
}

/// Whether the agent answered, if only with an error: it is there.
fn answered(error: &QgaError) -> bool {
    matches!(error, QgaError::Command { .. } | QgaError::Decode { .. } | QgaError::FileTooLarge { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names() {
        let names: Vec<_> =
            [AgentState::Unknown, AgentState::Connected, AgentState::NotResponding].map(AgentState::as_str).into();
        assert_eq!(names, ["unknown", "connected", "not responding"]);
    }

    #[tokio::test]
    async fn a_socket_nobody_serves_is_not_responding_with_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let opts = QgaOptions { connect_timeout: Duration::from_millis(50), ..QgaOptions::default() };
        let agent = GuestAgent::new(dir.path().join("qga.sock"), opts);
        assert_eq!(agent.status().state, AgentState::Unknown);
        let err = agent.call(|client| async move { client.ping().await }).await.unwrap_err();
        assert!(matches!(err, QgaError::Connect { .. }), "{err:?}");
        let status = agent.status();
        assert_eq!(status.state, AgentState::NotResponding);
        assert!(status.reason.contains("qga.sock"), "{status:?}");
    }
}
