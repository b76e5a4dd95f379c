//! The Host UI listener: HTTPS on its own port (`ui.listen`, 8443 on the host image) with the node's certificate,
//! serving `/metrics` for Prometheus.
//!
//! Not for: the node API's own clients (qxctl, a control plane), which use the unix socket or the mutual-TLS TCP
//! listener ([`crate::server`]).

pub mod config;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, info};

pub use config::UiConfig;

use crate::metrics::{self, Format, RpcMetrics};
use crate::node::Node;

/// How long a browser has for its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What the handlers share.
struct UiState {
    node: Arc<Node>,
    rpc: RpcMetrics,
}

/// The routes of the listener.
fn router(node: Arc<Node>, rpc: RpcMetrics) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(Arc::new(UiState { node, rpc }))
}

async fn scrape(State(state): State<Arc<UiState>>, headers: HeaderMap) -> Response {
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let text = metrics::scrape(&state.node, &state.rpc, format).await;
    ([(header::CONTENT_TYPE, format.content_type())], text).into_response()
}

/// Binds the listener, so that a port in use stops the daemon at start rather than later.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::server::ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::server::ServeError::Listen { what: format!("ui.listen {addr}"), source })
}

/// Serves HTTPS on `listener` until `stop` resolves; open connections are closed then.
pub async fn serve(
    node: Arc<Node>,
    rpc: RpcMetrics,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: impl std::future::Future<Output = ()>,
) {
    let app = router(node, rpc);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = JoinSet::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "Host UI listening (HTTPS)");
    }
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "Host UI accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        connections.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => return debug!(%peer, %error, "Host UI TLS handshake refused"),
                Err(_) => return debug!(%peer, "Host UI TLS handshake timed out"),
            };
            let service = TowerToHyperService::new(app);
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                debug!(%peer, %error, "Host UI connection ended");
            }
        });
    }
    connections.shutdown().await;
}
