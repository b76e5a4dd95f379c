//! Connecting to a qx-node over its unix socket, for qxctl, qx-console and tests.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

/// Where qxctl looks unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/quantix/node.sock";

/// A client of the qx-node API at `socket`.
pub async fn connect(socket: impl Into<PathBuf>) -> Result<NodeServiceClient<Channel>, tonic::transport::Error> {
    Ok(NodeServiceClient::new(channel(socket).await?))
}

/// A channel to `socket`, for any service qx-node serves (the node API, gRPC health).
pub async fn channel(socket: impl Into<PathBuf>) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.into();
    // The URI is required by the API but unused: the connector below decides where bytes go.
    let channel = Endpoint::from_static("http://qx-node.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
        }))
        .await?;
    Ok(channel)
}
