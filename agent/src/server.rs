//! Serving the API: `NodeService` on the unix socket (always, mode 0600) and a TCP listener (when configured),
//! `HostService` on the unix socket only, `UpdateService`, `GuestAgentService` and `SnapshotService` on both, and the standard gRPC health and server
//! reflection services on both. Unix connections are read through [`AuthorityFix`], so standard gRPC clients
//! (grpcio, grpc-java) work on the socket without overriding `:authority`. The TCP listener serves TLS 1.3 with
//! client certificates only ([`crate::certs`]) and checks each call against the certificate's role
//! ([`crate::authz`]).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use qx_proto::node::v1::guest_agent_service_server::GuestAgentServiceServer;
use qx_proto::node::v1::host_service_server::HostServiceServer;
use qx_proto::node::v1::migration_peer_service_server::MigrationPeerServiceServer;
use qx_proto::node::v1::migration_service_server::MigrationServiceServer;
use qx_proto::node::v1::node_service_server::NodeServiceServer;
use qx_proto::node::v1::security_group_service_server::SecurityGroupServiceServer;
use qx_proto::node::v1::snapshot_service_server::SnapshotServiceServer;
use qx_proto::node::v1::update_service_server::UpdateServiceServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tonic::server::NamedService;
use tracing::{debug, info};

use crate::authority::AuthorityFix;
use crate::authz::AuthorizeLayer;
use crate::certs::TlsState;
use crate::grpc::NodeApi;
use crate::grpc_guest::GuestApi;
use crate::grpc_host::HostApi;
use crate::grpc_migration::MigrationApi;
use crate::grpc_security_group::SecurityGroupApi;
use crate::grpc_snapshot::SnapshotApi;
use crate::grpc_update::UpdateApi;
use crate::metrics::RpcMetrics;
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
    #[error("gRPC reflection")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(
        "listen.tcp serves TLS 1.3 with client certificates only, from {dir}; fix the files named below, or set \
         tls.certificates_dir, or remove listen.tcp"
    )]
    Tls {
        dir: PathBuf,
        #[source]
        source: crate::certs::CertError,
    },
    #[error(
        "ui.listen serves HTTPS with the node certificate from {dir}; fix the files named below, or remove ui.listen"
    )]
    UiTls {
        dir: PathBuf,
        #[source]
        source: crate::certs::CertError,
    },
}

/// How long a TCP client has for its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the certificate files are checked for a rotation (SIGHUP checks at once).
const TLS_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The reflection service for a listener that serves `services` (besides health and reflection itself).
fn reflection(
    services: &[&str],
) -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    ServeError,
> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(qx_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
        .with_service_name("grpc.reflection.v1.ServerReflection");
    for service in services {
        builder = builder.with_service_name(*service);
    }
    Ok(builder.build_v1()?)
}

/// Accepts TCP connections and completes their TLS handshakes off the accept loop, with the TLS configuration
/// in force at each accept; a failed handshake drops that connection only.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<TlsState>,
) -> (ReceiverStream<Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>>, AbortOnDrop) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "TCP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => debug!(%peer, %error, "TLS handshake refused"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), AbortOnDrop(accept))
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reloads the TLS configuration on SIGHUP at once and when its files change.
fn reload_tls(tls: Arc<TlsState>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let force = tokio::select! {
                Some(()) = async { hup.as_mut()?.recv().await } => true,
                () = tokio::time::sleep(TLS_RELOAD_INTERVAL) => false,
            };
            let tls = Arc::clone(&tls);
            let _ = tokio::task::spawn_blocking(move || tls.reload_if_changed(force)).await;
        }
    }))
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
    health.set_serving::<GuestAgentServiceServer<GuestApi>>().await;
    health.set_serving::<SnapshotServiceServer<SnapshotApi>>().await;
    health.set_serving::<SecurityGroupServiceServer<SecurityGroupApi>>().await;
    let api = NodeServiceServer::new(NodeApi::new(Arc::clone(&node)));
    let host_api = HostServiceServer::new(HostApi::new(Arc::clone(&node)));
    // HostService changes the host itself (network, SSH, power): only local callers (qx-console) get it.
    // UpdateService on both: a control plane pushes system updates.
    let updates = UpdateServiceServer::new(UpdateApi::new(Arc::clone(&node)));
    // Live migration: MigrateVm for operators on both listeners; the node-to-node calls on both too (over TCP
    // the source node's certificate needs the admin role).
    health.set_serving::<MigrationServiceServer<MigrationApi>>().await;
    health.set_serving::<MigrationPeerServiceServer<MigrationApi>>().await;
    let migration = MigrationServiceServer::new(MigrationApi::new(Arc::clone(&node)));
    let migration_peer = MigrationPeerServiceServer::new(MigrationApi::new(Arc::clone(&node)));
    let guests = GuestAgentServiceServer::new(GuestApi::new(Arc::clone(&node)));
    let guest_name = <GuestAgentServiceServer<GuestApi> as NamedService>::NAME;
    let snapshots = SnapshotServiceServer::new(SnapshotApi::new(Arc::clone(&node)));
    let snapshot_name = <SnapshotServiceServer<SnapshotApi> as NamedService>::NAME;
    let security_groups = SecurityGroupServiceServer::new(SecurityGroupApi::new(Arc::clone(&node)));
    let security_group_name = <SecurityGroupServiceServer<SecurityGroupApi> as NamedService>::NAME;
    let node_name = <NodeServiceServer<NodeApi> as NamedService>::NAME;
    let update_name = <UpdateServiceServer<UpdateApi> as NamedService>::NAME;
    let host_name = <HostServiceServer<HostApi> as NamedService>::NAME;
    let migration_name = <MigrationServiceServer<MigrationApi> as NamedService>::NAME;
    let peer_name = <MigrationPeerServiceServer<MigrationApi> as NamedService>::NAME;
    // Every call is counted for /metrics, on whichever listener it came in.
    let rpc = RpcMetrics::default();
    // Over TCP every call passes the role check of the client certificate (crate::authz).
    let tcp_router = tonic::transport::Server::builder()
        .layer(rpc.layer())
        .layer(AuthorizeLayer::new(&node.config().tls.clients))
        .add_service(health_service.clone())
        .add_service(api.clone())
        .add_service(updates.clone())
        .add_service(migration.clone())
        .add_service(migration_peer.clone())
        .add_service(guests.clone())
        .add_service(snapshots.clone())
        .add_service(security_groups.clone())
        .add_service(reflection(&[
            node_name,
            update_name,
            migration_name,
            peer_name,
            guest_name,
            snapshot_name,
            security_group_name,
        ])?);
    let router = tonic::transport::Server::builder()
        .layer(rpc.layer())
        .add_service(health_service)
        .add_service(api)
        .add_service(updates)
        .add_service(host_api)
        .add_service(migration)
        .add_service(migration_peer)
        .add_service(guests)
        .add_service(snapshots)
        .add_service(security_groups)
        .add_service(reflection(&[
            node_name,
            update_name,
            host_name,
            migration_name,
            peer_name,
            guest_name,
            snapshot_name,
            security_group_name,
        ])?);

    // SIGHUP reloads certificates; without a TCP listener it must still not end the daemon (its default action).
    let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let stopped = |rx: tokio::sync::broadcast::Receiver<()>| async move {
        let mut rx = rx;
        let _ = rx.recv().await;
    };
    let tcp = match node.config().listen.tcp {
        Some(addr) => {
            let certs = node.certs().clone();
            let dir = certs.dir().to_owned();
            let tls = tokio::task::spawn_blocking(move || TlsState::load(certs))
                .await
                .expect("loading certificates does not panic")
                .map_err(|source| ServeError::Tls { dir, source })?;
            let tls = Arc::new(tls);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Listen { what: addr.to_string(), source })?;
            info!(%addr, certificates = %node.certs().dir().display(), "listening on TCP (TLS 1.3, client certificates)");
            let stop = stopped(stop_tx.subscribe());
            let (incoming, accept) = tls_incoming(listener, Arc::clone(&tls));
            let reload = reload_tls(tls);
            Some(tokio::spawn(async move {
                let served = tcp_router.serve_with_incoming_shutdown(incoming, stop).await;
                drop((accept, reload));
                served
            }))
        }
        None => None,
    };
    let ui = match node.config().ui.listen {
        Some(addr) => {
            let certs = node.certs().clone();
            let dir = certs.dir().to_owned();
            let tls = tokio::task::spawn_blocking(move || certs.browser_server_config())
                .await
                .expect("loading certificates does not panic")
                .map_err(|source| ServeError::UiTls { dir, source })?;
            let listener = crate::ui::bind(addr).await?;
            let stop = stopped(stop_tx.subscribe());
            Some(tokio::spawn(crate::ui::serve(Arc::clone(&node), rpc.clone(), listener, tls, stop)))
        }
        None => None,
    };
    let stop = stopped(stop_tx.subscribe());
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });
    info!(socket = %node.config().listen.unix.display(), "serving");
    let incoming = UnixListenerStream::new(unix).map(|stream| stream.map(AuthorityFix::new));
    router.serve_with_incoming_shutdown(incoming, stop).await?;
    if let Some(tcp) = tcp {
        if let Ok(result) = tcp.await {
            result?;
        }
    }
    if let Some(ui) = ui {
        let _ = ui.await;
    }
    let _ = fs::remove_file(&node.config().listen.unix);
    Ok(())
}
