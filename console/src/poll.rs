//! Fetching [`Snapshot`]s from the local qx-node: `GetNodeInfo` for the node, `GetHostStatus` for the host.

use std::path::PathBuf;
use std::time::Duration;

use qx_proto::node::v1::host_service_client::HostServiceClient;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use qx_proto::node::v1::{GetHostStatusRequest, GetNodeInfoRequest, NodeInfo};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::app::{Snapshot, REFRESH_INTERVAL};
use crate::host::HostSummary;

/// How long one connect or call may take before the node counts as unreachable; shorter than the refresh interval
/// so a hung daemon shows up as such instead of freezing the numbers.
pub const RPC_TIMEOUT: Duration = Duration::from_millis(1500);

/// Why no snapshot could be taken.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("cannot connect to qx-node at {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("qx-node at {socket} did not answer within {timeout:?}")]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("GetNodeInfo failed: {code:?}: {message}")]
    GetNodeInfo { code: tonic::Code, message: String },
}

impl PollError {
    /// The message and every cause, on one line, as the console shows it.
    pub fn describe(&self) -> String {
        crate::rpc::causes(self)
    }
}

/// A connection to qx-node that is made on first use and dropped after any failure, so the next poll reconnects.
#[derive(Debug)]
pub struct Poller {
    socket: PathBuf,
    channel: Option<Channel>,
}

impl Poller {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), channel: None }
    }

    /// Asks qx-node for its state; failures become an unreachable snapshot carrying the reason. A qx-node that
    /// answers GetNodeInfo but not GetHostStatus (an older one) gives a snapshot without host status, saying why.
    pub async fn snapshot(&mut self) -> Snapshot {
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(err) => return Snapshot::unreachable(err.describe()),
        };
        let node = async {
            tokio::time::timeout(
                RPC_TIMEOUT,
                NodeServiceClient::new(channel.clone()).get_node_info(GetNodeInfoRequest {}),
            )
            .await
        };
        let host = async {
            tokio::time::timeout(
                RPC_TIMEOUT,
                HostServiceClient::new(channel.clone()).get_host_status(GetHostStatusRequest {}),
            )
            .await
        };
        let (node, host) = tokio::join!(node, host);
        let info: Result<NodeInfo, PollError> = match node {
            Err(_) => Err(PollError::Timeout { socket: self.socket.clone(), timeout: RPC_TIMEOUT }),
            Ok(Err(status)) => {
                Err(PollError::GetNodeInfo { code: status.code(), message: status.message().to_owned() })
            }
            Ok(Ok(info)) => Ok(info.into_inner()),
        };
        let info = match info {
            Ok(info) => info,
            Err(err) => {
                self.channel = None;
                return Snapshot::unreachable(err.describe());
            }
        };
        self.channel = Some(channel);
        let host = match host {
            Err(_) => Err(format!("GetHostStatus did not answer within {RPC_TIMEOUT:?}")),
            Ok(Err(status)) => Err(format!("GetHostStatus failed: {:?}: {}", status.code(), status.message())),
            Ok(Ok(status)) => Ok(HostSummary::from(status.into_inner())),
        };
        Snapshot::from_node_info(info).with_host(host)
    }

    async fn channel(&mut self) -> Result<Channel, PollError> {
        if let Some(channel) = self.channel.take() {
            return Ok(channel);
        }
        tokio::time::timeout(RPC_TIMEOUT, qx_agent::client::channel(self.socket.clone()))
            .await
            .map_err(|_| PollError::Timeout { socket: self.socket.clone(), timeout: RPC_TIMEOUT })?
            .map_err(|source| PollError::Connect { socket: self.socket.clone(), source })
    }
}

/// Polls qx-node every [`REFRESH_INTERVAL`] and whenever `refresh` receives, handing each snapshot to `publish`.
/// Returns when `refresh` is closed or `publish` returns `false` (the console has gone).
pub async fn run(
    socket: impl Into<PathBuf>,
    mut refresh: mpsc::UnboundedReceiver<()>,
    mut publish: impl FnMut(Snapshot) -> bool,
) {
    let mut poller = Poller::new(socket);
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            request = refresh.recv() => {
                if request.is_none() {
                    return;
                }
                tick.reset();
            }
        }
        if !publish(poller.snapshot().await) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_socket_is_unreachable_with_reason() {
        let dir = std::env::temp_dir().join(format!("qx-console-test-{}", std::process::id()));
        let socket = dir.join("absent.sock");
        let snap = Poller::new(&socket).snapshot().await;
        assert_eq!(snap.node, None);
        let reason = snap.error.expect("an error");
        assert!(reason.starts_with(&format!("cannot connect to qx-node at {}", socket.display())), "{reason}");
        assert!(reason.contains("No such file or directory"), "{reason}");
    }

    #[tokio::test]
    async fn run_stops_when_the_console_goes() {
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(()).unwrap();
        let mut seen = 0;
        run("/nonexistent/qx-console.sock", rx, |_| {
            seen += 1;
            false
        })
        .await;
        assert_eq!(seen, 1);
    }
}
