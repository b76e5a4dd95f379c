//! Who may call what over TCP. The TLS handshake already proved the client certificate comes from a trusted CA;
//! here its subject becomes a [`Role`]: the `tls.clients` allow-list by common name first, then the role the
//! certificate carries as its organizational unit, else read-only. A read-only caller may use the calls that
//! change nothing (`Get*`, `List*`, `Watch*`, health, reflection); every other call is PERMISSION_DENIED before
//! it reaches a handler. The unix socket (mode 0600, root's) is not behind this layer; HostService is not served
//! over TCP at all.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::info;

use crate::certs::{subject_of, Role};
use crate::config::ClientRole;

/// The role of a client certificate (DER), and its common name.
pub fn role_of(cert: &[u8], clients: &[ClientRole]) -> Option<(String, Role)> {
    let (name, carried) = subject_of(cert)?;
    let listed = clients.iter().find(|c| c.name == name).map(|c| c.role);
    Some((name, listed.or(carried).unwrap_or(Role::ReadOnly)))
}

/// Whether `path` (`/package.Service/Method`) changes nothing.
pub fn is_read_only(path: &str) -> bool {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else { return false };
    matches!(service, "grpc.health.v1.Health" | "grpc.reflection.v1.ServerReflection")
        || ["Get", "List", "Watch"].iter().any(|verb| method.starts_with(verb))
}

/// The TCP router's layer.
#[derive(Debug, Clone)]
pub struct AuthorizeLayer {
    clients: Arc<[ClientRole]>,
}

impl AuthorizeLayer {
    pub fn new(clients: &[ClientRole]) -> Self {
        Self { clients: clients.into() }
    }
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize { inner, clients: Arc::clone(&self.clients) }
    }
}

#[derive(Debug, Clone)]
pub struct Authorize<S> {
    inner: S,
    clients: Arc<[ClientRole]>,
}

impl<S, B> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.decide(&request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

impl<S> Authorize<S> {
    fn decide<B>(&self, request: &http::Request<B>) -> Result<(), tonic::Status> {
        let path = request.uri().path();
        let cert = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs)
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let Some((name, role)) = cert.as_deref().and_then(|cert| role_of(cert, &self.clients)) else {
            return Err(tonic::Status::unauthenticated("a client certificate with a common name is required"));
        };
        if role == Role::Admin || is_read_only(path) {
            return Ok(());
        }
        info!(client = %name, role = role.as_str(), method = %path, "audit: permission denied");
        Err(tonic::Status::permission_denied(format!(
            "{path}: the client certificate {name:?} has role {}; this call needs admin",
            role.as_str()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_get_list_watch_health_and_reflection() {
        for path in [
            "/quantix.node.v1.NodeService/GetVm",
            "/quantix.node.v1.NodeService/ListVms",
            "/quantix.node.v1.NodeService/WatchEvents",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ] {
            assert!(is_read_only(path), "{path}");
        }
        for path in [
            "/quantix.node.v1.NodeService/StartVm",
            "/quantix.node.v1.NodeService/Console",
            "/quantix.node.v1.UpdateService/UpdateHost",
            "/quantix.node.v1.NodeService/DeleteVm",
            "GetVm",
            "",
        ] {
            assert!(!is_read_only(path), "{path}");
        }
    }

    #[test]
    fn the_allow_list_overrides_the_role_a_certificate_carries() {
        let dir = tempfile::tempdir().unwrap();
        let paths = crate::certs::CertPaths::new(dir.path());
        paths.ensure("node1", &[]).unwrap();
        let cert = |name: &str, role| {
            let (_, csr) = crate::certs::new_key_and_csr(name).unwrap();
            let pem = paths.issue_client(&csr, name, role, 1).unwrap().certificate_pem;
            rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
                .map(|c: rustls::pki_types::CertificateDer<'static>| c.to_vec())
                .unwrap()
        };
        let (alice, bob) = (cert("alice", Role::Admin), cert("bob", Role::ReadOnly));
        assert_eq!(role_of(&alice, &[]), Some(("alice".into(), Role::Admin)));
        assert_eq!(role_of(&bob, &[]), Some(("bob".into(), Role::ReadOnly)));
        let clients = [ClientRole { name: "alice".into(), role: Role::ReadOnly }];
        assert_eq!(role_of(&alice, &clients), Some(("alice".into(), Role::ReadOnly)));
        assert_eq!(role_of(b"not a certificate", &clients), None);
    }
}
