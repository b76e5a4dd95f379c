//! Fetching [`Snapshot`]s from the local qx-node.

use std::error::Error as _;
use std::path::PathBuf;
use std::time::Duration;

use qx_proto::node::v1::node_service_client::NodeServiceClient;
use qx_proto::node::v1::{GetNodeInfoRequest, NodeInfo};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::app::{Snapshot, REFRESH_INTERVAL};

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
        let mut text = self.to_string();
        let mut source = self.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            // Some transport errors repeat their cause in their own message; say it once.
            if !text.ends_with(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        text
    }
}

/// A connection to qx-node that is made on first use and dropped after any failure, so the next poll reconnects.
#[derive(Debug)]
pub struct Poller {
    socket: PathBuf,
    client: Option<NodeServiceClient<Channel>>,
}

impl Poller {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), client: None }
    }

    /// Asks qx-node for its state; failures become an unreachable snapshot carrying the reason.
    pub async fn snapshot(&mut self) -> Snapshot {
        match self.node_info().await {
            Ok(info) => Snapshot::from_node_info(info),
            Err(err) => {
                self.client = None;
                Snapshot::unreachable(err.describe())
            }
        }
    }

    async fn node_info(&mut self) -> Result<NodeInfo, PollError> {
        let timeout = || PollError::Timeout { socket: self.socket.clone(), timeout: RPC_TIMEOUT };
        let mut client = match self.client.take() {
            Some(client) => client,
            None => tokio::time::timeout(RPC_TIMEOUT, qx_agent::client::connect(self.socket.clone()))
                .await
                .map_err(|_| timeout())?
                .map_err(|source| PollError::Connect { socket: self.socket.clone(), source })?,
        };
        let info = tokio::time::timeout(RPC_TIMEOUT, client.get_node_info(GetNodeInfoRequest {}))
            .await
            .map_err(|_| timeout())?
            .map_err(|status| PollError::GetNodeInfo { code: status.code(), message: status.message().to_owned() })?
            .into_inner();
        self.client = Some(client);
        Ok(info)
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
