//! The Host UI listener: HTTPS on its own port (`ui.listen`, 8443 on the host image) with the node's certificate.
//! It serves the node API to the browser as gRPC-Web (`tonic-web` in front of the same `NodeService` the other
//! listeners serve: no second API), behind a login ([`auth`]); `/api/login`, `/api/logout` and `/api/session` for
//! the session; VM consoles as WebSockets bridged to VNC ([`console`]); `/metrics` for Prometheus; and the web
//! app's built files ([`assets`]).
//!
//! Not for: the node API's own clients (qxctl, a control plane), which use the unix socket or the mutual-TLS TCP
//! listener ([`crate::server`]).

mod assets;
pub mod auth;
pub mod config;
pub mod console;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use qx_proto::node::v1::node_service_server::NodeServiceServer;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::server::NamedService;
use tracing::{debug, info};

pub use config::UiConfig;

use crate::grpc::NodeApi;
use crate::metrics::{self, Format, RpcMetrics};
use crate::node::Node;
use auth::{Auth, AuthError, COOKIE, CSRF_HEADER};

/// How long a browser has for its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest login request read.
const LOGIN_BODY_LIMIT: usize = 4096;

/// What the handlers share.
struct UiState {
    node: Arc<Node>,
    rpc: RpcMetrics,
    auth: Auth,
    tickets: console::Tickets,
}

/// The routes of the listener.
fn router(node: Arc<Node>, rpc: RpcMetrics) -> Router {
    let auth = Auth::new(&node.config().ui);
    let api = NodeServiceServer::new(NodeApi::new(Arc::clone(&node)));
    let grpc_web = tower::ServiceBuilder::new().layer(tonic_web::GrpcWebLayer::new()).layer(rpc.layer()).service(api);
    let state = Arc::new(UiState { node, rpc, auth, tickets: console::Tickets::default() });
    let grpc_path = format!("/{}/{{*method}}", <NodeServiceServer<NodeApi> as NamedService>::NAME);
    let api_routes = Router::new()
        .route_service(&grpc_path, grpc_web)
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&state), require_session));
    Router::new()
        .route("/metrics", get(scrape))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/session", get(session))
        .route("/api/vms/{name}/vnc-ticket", post(console::ticket))
        .route("/api/vms/{name}/vnc", get(console::websocket))
        .merge(api_routes)
        .fallback(assets::serve)
        .with_state(state)
}

async fn scrape(State(state): State<Arc<UiState>>, headers: HeaderMap) -> Response {
    let format = Format::from_accept(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let text = metrics::scrape(&state.node, &state.rpc, format).await;
    ([(header::CONTENT_TYPE, format.content_type())], text).into_response()
}

/// The session token of a request's `Cookie` header.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('=').map(str::to_owned))
}

fn csrf_header(headers: &HeaderMap) -> Option<&str> {
    headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok())
}

/// `{"error": message}` with `status`.
fn json_error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({ "error": message.to_string() }).to_string();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn auth_status(error: &AuthError) -> StatusCode {
    match error {
        AuthError::Csrf => StatusCode::FORBIDDEN,
        AuthError::LockedOut { .. } => StatusCode::TOO_MANY_REQUESTS,
        AuthError::NoPassword => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    }
}

fn refused(error: &AuthError) -> Response {
    let mut response = json_error(auth_status(error), error);
    if let AuthError::LockedOut { seconds } = error {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*seconds));
    }
    response
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    user: String,
    password: String,
}

async fn login(State(state): State<Arc<UiState>>, body: Bytes) -> Response {
    if body.len() > LOGIN_BODY_LIMIT {
        return json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("login body: {} bytes is over the limit of {LOGIN_BODY_LIMIT}", body.len()),
        );
    }
    let request: LoginRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                format!("login body: {error}; expected {{\"user\": \"...\", \"password\": \"...\"}}"),
            )
        }
    };
    match state.auth.login(&request.user, &request.password).await {
        Ok((token, granted)) => {
            let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; Secure; SameSite=Strict");
            let body = serde_json::json!({
                "user": granted.user,
                "csrf_token": granted.csrf,
                "idle_timeout_seconds": state.auth.idle().as_secs(),
            });
            ([(header::SET_COOKIE, cookie), (header::CONTENT_TYPE, "application/json".into())], body.to_string())
                .into_response()
        }
        Err(error) => refused(&error),
    }
}

async fn logout(State(state): State<Arc<UiState>>, headers: HeaderMap) -> Response {
    let token = cookie_token(&headers);
    if let Err(error) = state.auth.check(token.as_deref(), Some(csrf_header(&headers))) {
        return refused(&error);
    }
    if let Some(token) = token {
        state.auth.logout(&token);
    }
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    (StatusCode::NO_CONTENT, [(header::SET_COOKIE, clear)]).into_response()
}

/// The session of the cookie and its CSRF token, for a page loaded again.
async fn session(State(state): State<Arc<UiState>>, headers: HeaderMap) -> Response {
    match state.auth.check(cookie_token(&headers).as_deref(), None) {
        Ok(granted) => {
            let body = serde_json::json!({ "user": granted.user, "csrf_token": granted.csrf });
            ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
        }
        Err(error) => refused(&error),
    }
}

/// Lets an API call through only with a live session and its CSRF token; refuses it as a gRPC status the
/// gRPC-Web client shows (UNAUTHENTICATED, or PERMISSION_DENIED for the CSRF token).
async fn require_session(State(state): State<Arc<UiState>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    match state.auth.check(cookie_token(headers).as_deref(), Some(csrf_header(headers))) {
        Ok(_) => next.run(request).await,
        Err(error) => {
            let status = match error {
                AuthError::Csrf => tonic::Status::permission_denied(error.to_string()),
                _ => tonic::Status::unauthenticated(error.to_string()),
            };
            let content_type = headers.get(header::CONTENT_TYPE).cloned();
            let mut response = status.into_http::<Body>();
            if let Some(content_type) = content_type {
                response.headers_mut().insert(header::CONTENT_TYPE, content_type);
            }
            response
        }
    }
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
