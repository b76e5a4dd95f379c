//! Serving the API: `NodeService` on the unix socket (always, mode 0600) and a TCP listener (when configured),
//! `HostService` on the unix socket only, `UpdateService` on both, and the standard gRPC health service.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qx_proto::node::v1::host_service_server::HostServiceServer;
use qx_proto::node::v1::node_service_server::NodeServiceServer;
use qx_proto::node::v1::update_service_server::UpdateServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tracing::info;

use crate::grpc::NodeApi;
use crate::grpc_host::HostApi;
use crate::grpc_update::UpdateApi;
use crate::node::Node;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another qx-node already serves {0}")]
    SocketInUse(PathBuf),
    #[error("another qx-node already uses the data directory {0}")]
    DataDirInUse(PathBuf),
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Held for the daemon's life: a second qx-node on the same data directory would fight over the same VMs.
#[derive(Debug)]
pub struct DataDirLock(#[allow(dead_code)] fs::File);

pub fn lock_data_dir(data_dir: &Path) -> Result<DataDirLock, ServeError> {
    let listen_error = |source| ServeError::Listen { what: data_dir.display().to_string(), source };
    fs::create_dir_all(data_dir).map_err(listen_error)?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("qx-node.lock"))
        .map_err(listen_error)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| ServeError::DataDirInUse(data_dir.to_owned()))?;
    Ok(DataDirLock(file))
}

/// Binds the API socket, refusing to take it from a live daemon and replacing a stale one.
pub async fn bind_unix(path: &Path) -> Result<UnixListener, ServeError> {
    let listen_error = |source| ServeError::Listen { what: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(listen_error)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(ServeError::SocketInUse(path.to_owned()));
        }
        fs::remove_file(path).map_err(listen_error)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    Ok(listener)
}

/// Serves until `shutdown` resolves. VMs keep running after it returns.
pub async fn serve(
    node: Arc<Node>,
    unix: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<NodeServiceServer<NodeApi>>().await;
    health.set_serving::<HostServiceServer<HostApi>>().await;
    health.set_serving::<UpdateServiceServer<UpdateApi>>().await;
    let api = NodeServiceServer::new(NodeApi::new(Arc::clone(&node)));
    let host_api = HostServiceServer::new(HostApi::new(Arc::clone(&node)));
    // HostService changes the host itself (network, SSH, power): only local callers (qx-console) get it.
    // UpdateService on both: a control plane pushes system updates.
    let updates = UpdateServiceServer::new(UpdateApi::new(Arc::clone(&node)));
    let tcp_router =
        tonic::transport::Server::builder().add_service(health_service).add_service(api).add_service(updates);
    let router = tcp_router.clone().add_service(host_api);

    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |rx: tokio::sync::broadcast::Receiver<()>| async move {
        let mut rx = rx;
        let _ = rx.recv().await;
    };
    let tcp = match node.config().listen.tcp {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { what: addr.to_string(), source })?;
            info!(%addr, "listening on TCP");
            let stop = stopped(stop_tx.subscribe());
            Some(tokio::spawn(async move {
                tcp_router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop).await
            }))
        }
        None => None,
    };
    let stop = stopped(stop_tx.subscribe());
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });
    info!(socket = %node.config().listen.unix.display(), "serving");
    router.serve_with_incoming_shutdown(UnixListenerStream::new(unix), stop).await?;
    if let Some(tcp) = tcp {
        if let Ok(result) = tcp.await {
            result?;
        }
    }
    let _ = fs::remove_file(&node.config().listen.unix);
    Ok(())
}
