//! Live migration between nodes, the agent's part: the source's client of the target's `MigrationPeerService`
//! (mutual TLS with the node's own certificate), the migrations running on this node (so a `CancelMigration`
//! reaches one), and the target's checks that need the host (free memory, the listen address). The VM side is
//! `qx_vmm`'s (`VmManager::migrate_to` and `prepare_incoming`).
//!
//! The migration stream itself (QEMU to QEMU) is plain TCP on a port the target's QEMU picks, on the address of the
//! target's TCP listener; it is not encrypted yet, and results say so (`encrypted: false`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use qx_common::BoxFuture;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::migration_peer_service_client::MigrationPeerServiceClient;
use qx_vmm::device_tree::DeviceTree;
use qx_vmm::migration::{MigrationConfig, Outcome, Progress};
use qx_vmm::{IncomingPeer, PeerError, SourceFacts, ValidationErrors, VmError, VmInfo, VmSpec};
use tokio::sync::watch;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::node::Node;

/// How long connecting to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The migrations this node runs as the source, by VM name: each one's cancel switch.
#[derive(Debug, Default)]
pub struct Migrations {
    active: Mutex<HashMap<String, watch::Sender<bool>>>,
}

/// A running migration's registration; dropping it forgets the migration.
pub struct Registered<'a> {
    migrations: &'a Migrations,
    name: String,
    /// Turns true to cancel.
    pub cancel: watch::Receiver<bool>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.migrations.lock().remove(&self.name);
    }
}

impl Migrations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<bool>>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a migration of `name`; refused while one runs.
    pub fn register(&self, name: &str) -> Result<Registered<'_>, VmError> {
        let mut active = self.lock();
        if active.contains_key(name) {
            return Err(VmError::WrongState {
                name: name.to_owned(),
                state: qx_vmm::VmState::Migrating,
                operation: "migrate",
                needs: "running",
            });
        }
        let (tx, rx) = watch::channel(false);
        active.insert(name.to_owned(), tx);
        Ok(Registered { migrations: self, name: name.to_owned(), cancel: rx })
    }

    /// Cancels the migration of `name`; false when none runs.
    pub fn cancel(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|tx| tx.send(true).is_ok())
    }
}

/// A target node: `HOST:PORT` of its TCP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl {
    pub host: String,
    pub port: u16,
}

impl TargetUrl {
    /// `grpcs://HOST:PORT`, `https://HOST:PORT` or `HOST:PORT` (IPv6 in brackets).
    pub fn parse(url: &str) -> Result<Self, ValidationErrors> {
        let bad = |problem: &str| ValidationErrors::one("target_url", url, problem);
        let rest = url.strip_prefix("grpcs://").or_else(|| url.strip_prefix("https://")).unwrap_or(url);
        if rest.contains("://") {
            return Err(bad("must be grpcs://HOST:PORT (the target's TLS listener)"));
        }
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("has no :PORT"))?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad("has no valid port"))?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty()
            || host.contains(['/', ' ', '[', ']'])
            || (host.contains(':') && host.parse::<IpAddr>().is_err())
        {
            return Err(bad("has no valid host"));
        }
        Ok(Self { host: host.to_owned(), port })
    }

    /// `HOST` as a URI authority part (IPv6 in brackets).
    fn authority_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl std::fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "grpcs://{}:{}", self.authority_host(), self.port)
    }
}

/// The source's view of a target: its `MigrationPeerService` over mutual TLS.
pub struct PeerClient {
    url: TargetUrl,
    source_node: String,
    client: MigrationPeerServiceClient<Channel>,
    /// The target's node name, from its PrepareIncoming answer.
    target_node: Mutex<String>,
}

impl PeerClient {
    /// A client of the target at `url` that presents this node's certificate and trusts the node-local and the
    /// cluster CA for the target's. Connects on first use.
    pub async fn new(node: &Node, url: TargetUrl) -> Result<Self, std::io::Error> {
        let certs = node.certs();
        let mut roots = vec![Certificate::from_pem(tokio::fs::read(certs.local_ca()).await?)];
        if let Ok(cluster) = tokio::fs::read(certs.cluster_ca()).await {
            roots.push(Certificate::from_pem(cluster));
        }
        let identity =
            Identity::from_pem(tokio::fs::read(certs.node_cert()).await?, tokio::fs::read(certs.node_key()).await?);
        let tls = ClientTlsConfig::new().ca_certificates(roots).identity(identity).domain_name(url.host.clone());
        let endpoint = Endpoint::from_shared(format!("https://{}:{}", url.authority_host(), url.port))
            .and_then(|e| e.tls_config(tls))
            .map_err(std::io::Error::other)?
            .connect_timeout(CONNECT_TIMEOUT);
        Ok(Self {
            client: MigrationPeerServiceClient::new(endpoint.connect_lazy()),
            source_node: node.config().node_name.clone(),
            url,
            target_node: Mutex::new(String::new()),
        })
    }

    /// The target's node name, once it prepared.
    pub fn target_node(&self) -> String {
        self.target_node.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A target's status as the source's VM operation must tell it apart.
fn peer_error(status: tonic::Status) -> PeerError {
    let message = status.message().to_owned();
    match status.code() {
        Code::FailedPrecondition | Code::InvalidArgument | Code::AlreadyExists => PeerError::Refused(message),
        Code::NotFound => PeerError::NotFound(message),
        code => PeerError::Failed(format!("{code:?}: {message}")),
    }
}

impl IncomingPeer for PeerClient {
    fn describe(&self) -> String {
        self.url.to_string()
    }

    fn prepare<'a>(
        &'a self,
        spec: &'a VmSpec,
        devices: &'a DeviceTree,
        config: &'a MigrationConfig,
        facts: &'a SourceFacts,
    ) -> BoxFuture<'a, Result<String, PeerError>> {
        Box::pin(async move {
            let json = |value: serde_json::Result<String>| value.map_err(|e| PeerError::Failed(e.to_string()));
            let request = pb::PrepareIncomingRequest {
                spec_json: json(serde_json::to_string(spec))?,
                devices_json: json(serde_json::to_string(devices))?,
                config_json: json(serde_json::to_string(config))?,
                source_node: self.source_node.clone(),
                accelerator: facts.accel.map(|a| a.to_string()).unwrap_or_default(),
            };
            let reply = self.client.clone().prepare_incoming(request).await.map_err(peer_error)?.into_inner();
            let port = u16::try_from(reply.port).map_err(|_| PeerError::Failed(format!("port {}", reply.port)))?;
            *self.target_node.lock().unwrap_or_else(|e| e.into_inner()) = reply.node_name;
            Ok(format!("tcp:{}:{port}", self.url.authority_host()))
        })
    }

    fn finish<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), PeerError>> {
        Box::pin(async move {
            let request = pb::FinishIncomingRequest { name: name.to_owned() };
            self.client.clone().finish_incoming(request).await.map(drop).map_err(peer_error)
        })
    }

    fn abort<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), PeerError>> {
        Box::pin(async move {
            let request = pb::AbortIncomingRequest { name: name.to_owned() };
            self.client.clone().abort_incoming(request).await.map(drop).map_err(peer_error)
        })
    }
}

/// How a migration ended well, for the operator.
#[derive(Debug, Clone)]
pub struct Migrated {
    pub outcome: Outcome,
    pub target_node: String,
}

impl Node {
    /// Live-migrates running VM `name` to the node at `target_url`; `on_progress` sees every poll. Cancelled by
    /// [`Migrations::cancel`] (CancelMigration) or by `cancel` turning true (the client went away).
    pub async fn migrate_vm(
        &self,
        name: &str,
        target_url: &str,
        config: MigrationConfig,
        cancel: watch::Receiver<bool>,
        on_progress: impl FnMut(&Progress) + Send,
    ) -> Result<Migrated, VmError> {
        let url = TargetUrl::parse(target_url)?;
        config.validate()?;
        let registered = self.migrations().register(name)?;
        // Either switch cancels: CancelMigration, or the caller's (a dropped stream).
        let (either_tx, either) = watch::channel(false);
        let forward = {
            let by_call = registered.cancel.clone();
            async move {
                tokio::select! {
                    () = turns_true(by_call) => {}
                    () = turns_true(cancel) => {}
                }
                let _ = either_tx.send(true);
                std::future::pending::<()>().await;
            }
        };
        let peer = PeerClient::new(self, url.clone()).await.map_err(|source| VmError::Migration {
            name: name.to_owned(),
            target: url.to_string(),
            stage: "reading this node's certificates",
            outcome: "it keeps running here",
            source: source.into(),
        })?;
        let migrate = self.vms().migrate_to(name, &peer, &config, either, on_progress);
        let outcome = tokio::select! {
            outcome = migrate => outcome?,
            () = forward => unreachable!("never ends"),
        };
        drop(registered);
        Ok(Migrated { outcome, target_node: peer.target_node() })
    }

    /// The target's side of PrepareIncoming: the host checks (free memory), then the VM's. Returns the VM and the
    /// port its QEMU listens on.
    pub async fn prepare_incoming(
        &self,
        spec: VmSpec,
        devices: DeviceTree,
        config: MigrationConfig,
        source: &str,
        facts: SourceFacts,
    ) -> Result<(VmInfo, u16), VmError> {
        let (_, _, _, available) = tokio::task::spawn_blocking(crate::node::host_resources).await.unwrap_or_default();
        let needed = spec.memory_mib.saturating_mul(1 << 20);
        if available > 0 && needed > available {
            let problem = format!("is more than the {} MiB of memory available on this node", available >> 20);
            return Err(ValidationErrors::one("memory_mib", spec.memory_mib, problem).into());
        }
        // The source confined its paths to its own allowed ones; here they must lie under this node's.
        self.confine_spec(&spec).await?;
        let listen = match self.config().listen.tcp.map(|a| a.ip()) {
            Some(IpAddr::V6(ip)) => format!("[{ip}]"),
            Some(IpAddr::V4(ip)) => ip.to_string(),
            None => "0.0.0.0".to_owned(),
        };
        self.vms().prepare_incoming(spec, devices, &config, &listen, source, facts).await
    }
}

/// Resolves once `switch` turns true; never when its sender goes without.
async fn turns_true(mut switch: watch::Receiver<bool>) {
    if switch.wait_for(|on| *on).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_urls_take_grpcs_https_or_bare_and_name_the_field_when_wrong() {
        let url = |host: &str, port| TargetUrl { host: host.into(), port };
        assert_eq!(TargetUrl::parse("grpcs://node2:7443").unwrap(), url("node2", 7443));
        assert_eq!(TargetUrl::parse("https://10.0.0.2:7443/").unwrap(), url("10.0.0.2", 7443));
        assert_eq!(TargetUrl::parse("[::1]:7443").unwrap(), url("::1", 7443));
        assert_eq!(TargetUrl::parse("[::1]:7443").unwrap().to_string(), "grpcs://[::1]:7443");
        for bad in ["http://node2:7443", "node2", "node2:0", "node2:x", ":7443", "a:b:7443"] {
            let error = TargetUrl::parse(bad).unwrap_err().to_string();
            assert!(error.starts_with(&format!("target_url: {bad:?}")), "{bad}: {error}");
        }
    }

    #[test]
    fn a_second_migration_of_a_vm_is_refused_and_cancel_reaches_the_running_one() {
        let migrations = Migrations::default();
        let first = migrations.register("web").unwrap();
        assert!(migrations.register("web").is_err());
        assert!(!migrations.cancel("other"));
        assert!(migrations.cancel("web"));
        assert!(*first.cancel.borrow());
        drop(first);
        assert!(!migrations.cancel("web"), "forgotten when the migration ends");
        migrations.register("web").unwrap();
    }

    #[test]
    fn refusals_of_the_target_stay_refusals() {
        assert!(matches!(peer_error(tonic::Status::failed_precondition("no")), PeerError::Refused(_)));
        assert!(matches!(peer_error(tonic::Status::already_exists("no")), PeerError::Refused(_)));
        assert!(matches!(peer_error(tonic::Status::not_found("no")), PeerError::NotFound(_)));
        assert!(matches!(peer_error(tonic::Status::unavailable("down")), PeerError::Failed(_)));
    }
}
