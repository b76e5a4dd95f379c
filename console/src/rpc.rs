//! The console's side effects: the [`Request`]s key handling asks for, performed against qx-node's `HostService`
//! off the draw path, each answered by one [`Reply`] that goes back to [`crate::app::App::on_reply`].
//!
//! Every request opens a connection of its own (a unix socket connect costs microseconds), so a qx-node that
//! restarted between two requests is simply reached again, and every call has a timeout, so a hung daemon ends
//! in a message instead of a dialog that waits forever.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qx_proto::node::v1 as pb;
use qx_proto::node::v1::host_service_client::HostServiceClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Code;

use crate::host::{ClusterSummary, DiagnosticsReport, NetworkConfig, PowerAction, SshState};

/// How long a read (network config, diagnostics, the shell command) may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a change may take: applying a network configuration, or a control plane answering a join, can take
/// a few seconds; longer means something hangs.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many log lines F7 asks for.
pub const DIAGNOSTICS_LOG_LINES: u32 = 200;

/// One thing the operator asked qx-node to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    GetNetworkConfig,
    SetNetworkConfig(NetworkConfig),
    SetSsh { enabled: bool, timeout_minutes: u32 },
    JoinCluster { control_plane_url: String, join_token: String },
    LeaveCluster,
    RestartServices,
    GetDiagnostics,
    Power { action: PowerAction, confirm_running_vms: bool },
    OpenShell,
}

impl Request {
    /// The RPC's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::GetNetworkConfig => "GetNetworkConfig",
            Self::SetNetworkConfig(_) => "SetNetworkConfig",
            Self::SetSsh { .. } => "SetSsh",
            Self::JoinCluster { .. } => "JoinCluster",
            Self::LeaveCluster => "LeaveCluster",
            Self::RestartServices => "RestartServices",
            Self::GetDiagnostics => "GetDiagnostics",
            Self::Power { .. } => "Power",
            Self::OpenShell => "OpenShell",
        }
    }

    pub fn timeout(&self) -> Duration {
        match self {
            Self::GetNetworkConfig | Self::GetDiagnostics | Self::OpenShell => READ_TIMEOUT,
            _ => CHANGE_TIMEOUT,
        }
    }
}

/// Why a request failed: the gRPC code and qx-node's message (or the console's, for connect failures and
/// timeouts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<tonic::Status> for RpcError {
    fn from(status: tonic::Status) -> Self {
        let message =
            if status.message().is_empty() { format!("{:?}", status.code()) } else { status.message().to_owned() };
        Self { code: status.code(), message }
    }
}

/// qx-node's answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    NetworkConfig(Result<NetworkConfig, RpcError>),
    NetworkSet(Result<NetworkConfig, RpcError>),
    Ssh(Result<SshState, RpcError>),
    Joined(Result<ClusterSummary, RpcError>),
    Left(Result<ClusterSummary, RpcError>),
    Restarted(Result<(), RpcError>),
    Diagnostics(Result<DiagnosticsReport, RpcError>),
    Power(PowerAction, Result<(), RpcError>),
    /// The argv of the emergency shell.
    Shell(Result<Vec<String>, RpcError>),
}

impl Reply {
    /// The reply `request` gets when it could not be performed at all.
    pub fn failed(request: &Request, error: RpcError) -> Self {
        match request {
            Request::GetNetworkConfig => Self::NetworkConfig(Err(error)),
            Request::SetNetworkConfig(_) => Self::NetworkSet(Err(error)),
            Request::SetSsh { .. } => Self::Ssh(Err(error)),
            Request::JoinCluster { .. } => Self::Joined(Err(error)),
            Request::LeaveCluster => Self::Left(Err(error)),
            Request::RestartServices => Self::Restarted(Err(error)),
            Request::GetDiagnostics => Self::Diagnostics(Err(error)),
            Request::Power { action, .. } => Self::Power(*action, Err(error)),
            Request::OpenShell => Self::Shell(Err(error)),
        }
    }
}

/// Performs `request` against the qx-node at `socket`, within the request's timeout.
pub async fn perform(socket: &Path, request: Request) -> Reply {
    let timeout = request.timeout();
    match tokio::time::timeout(timeout, call(socket, &request)).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(error)) => Reply::failed(&request, error),
        Err(_) => Reply::failed(
            &request,
            RpcError::new(
                Code::DeadlineExceeded,
                format!("qx-node did not answer {} within {timeout:?}", request.name()),
            ),
        ),
    }
}

async fn call(socket: &Path, request: &Request) -> Result<Reply, RpcError> {
    let channel = qx_agent::client::channel(socket.to_owned()).await.map_err(|err| {
        RpcError::new(Code::Unavailable, format!("cannot connect to qx-node at {}: {}", socket.display(), causes(&err)))
    })?;
    let mut host = HostServiceClient::<Channel>::new(channel);
    let reply = match request.clone() {
        Request::GetNetworkConfig => {
            let net = host.get_network_config(pb::GetNetworkConfigRequest {}).await?.into_inner();
            Reply::NetworkConfig(Ok(net.into()))
        }
        Request::SetNetworkConfig(net) => {
            let net = host.set_network_config(pb::ManagementNetwork::from(&net)).await?.into_inner();
            Reply::NetworkSet(Ok(net.into()))
        }
        Request::SetSsh { enabled, timeout_minutes } => {
            let ssh = host.set_ssh(pb::SetSshRequest { enabled, timeout_minutes }).await?.into_inner();
            Reply::Ssh(Ok(ssh.into()))
        }
        Request::JoinCluster { control_plane_url, join_token } => {
            let cluster =
                host.join_cluster(pb::JoinClusterRequest { control_plane_url, join_token }).await?.into_inner();
            Reply::Joined(Ok(cluster.into()))
        }
        Request::LeaveCluster => {
            let cluster = host.leave_cluster(pb::LeaveClusterRequest {}).await?.into_inner();
            Reply::Left(Ok(cluster.into()))
        }
        Request::RestartServices => {
            host.restart_services(pb::RestartServicesRequest {}).await?;
            Reply::Restarted(Ok(()))
        }
        Request::GetDiagnostics => {
            let request = pb::GetDiagnosticsRequest { log_lines: DIAGNOSTICS_LOG_LINES };
            Reply::Diagnostics(Ok(host.get_diagnostics(request).await?.into_inner().into()))
        }
        Request::Power { action, confirm_running_vms } => {
            let request = pb::PowerRequest { action: pb::PowerAction::from(action).into(), confirm_running_vms };
            host.power(request).await?;
            Reply::Power(action, Ok(()))
        }
        Request::OpenShell => {
            let shell = host.open_shell(pb::OpenShellRequest {}).await?.into_inner();
            Reply::Shell(Ok(shell.command))
        }
    };
    Ok(reply)
}

/// The error and its causes on one line, each said once.
pub(crate) use qx_common::error_chain as causes;

/// Performs each request from `requests` as it comes, concurrently (a slow join never holds up diagnostics), and
/// hands every reply to `publish`. Returns when `requests` is closed.
pub async fn run(
    socket: impl Into<PathBuf>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    publish: impl Fn(Reply) + Clone + Send + Sync + 'static,
) {
    let socket = socket.into();
    while let Some(request) = requests.recv().await {
        let socket = socket.clone();
        let publish = publish.clone();
        tokio::spawn(async move { publish(perform(&socket, request).await) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_daemon_fails_every_request_with_the_reason() {
        let socket = Path::new("/nonexistent/qx-console-rpc.sock");
        let reply =
            perform(socket, Request::JoinCluster { control_plane_url: "x".into(), join_token: "t".into() }).await;
        let Reply::Joined(Err(error)) = reply else { panic!("{reply:?}") };
        assert_eq!(error.code, Code::Unavailable);
        assert!(error.message.starts_with("cannot connect to qx-node at /nonexistent/qx-console-rpc.sock"), "{error}");
        let reply = perform(socket, Request::Power { action: PowerAction::Shutdown, confirm_running_vms: false }).await;
        assert!(matches!(reply, Reply::Power(PowerAction::Shutdown, Err(_))), "{reply:?}");
    }

    #[tokio::test]
    async fn a_silent_daemon_times_out() {
        // A listener that accepts and never answers: the HTTP/2 handshake never completes.
        let dir = std::env::temp_dir().join(format!("qx-console-rpc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("silent.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let held = tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                streams.push(stream);
            }
        });
        tokio::time::pause();
        let reply = perform(&socket, Request::GetDiagnostics).await;
        let Reply::Diagnostics(Err(error)) = reply else { panic!("{reply:?}") };
        assert_eq!(error.code, Code::DeadlineExceeded);
        assert_eq!(error.message, "qx-node did not answer GetDiagnostics within 5s");
        held.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn status_without_message_names_its_code() {
        let error = RpcError::from(tonic::Status::new(Code::Unimplemented, ""));
        assert_eq!(error.message, "Unimplemented");
        let error = RpcError::from(tonic::Status::invalid_argument("vlan: \"5000\" is outside 1..=4094"));
        assert_eq!(
            (error.code, error.to_string().as_str()),
            (Code::InvalidArgument, "vlan: \"5000\" is outside 1..=4094")
        );
    }
}
