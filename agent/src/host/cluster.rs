//! Cluster membership: the client side of `quantix.controlplane.v1.ControlPlane`. JoinCluster trades a join
//! token for a node id (RegisterNode), then a task sends a Heartbeat with telemetry every interval the control
//! plane asked for. The membership (never the token) is kept in `<data_dir>/cluster.json`, so a restarted
//! qx-node resumes its heartbeats.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qx_proto::controlplane::v1 as cp;
use qx_proto::controlplane::v1::control_plane_client::ControlPlaneClient;
use qx_vmm::spec::FieldError;
use qx_vmm::{ValidationErrors, VmManager};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};
use tonic::Code;
use tracing::{debug, info, warn, Instrument};

use super::hardware::{Sampler, Telemetry};
use super::{now_unix, persist_json, remove_durably, HostError};
use crate::certs::CertPaths;

/// How long joining waits for a TCP (and TLS) connection to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one RegisterNode or Heartbeat call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// When the control plane names no heartbeat interval.
const DEFAULT_INTERVAL_SECONDS: u32 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterState {
    #[default]
    Standalone,
    Member,
    /// A member whose last heartbeat failed; heartbeats continue.
    Disconnected,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterStatus {
    pub state: ClusterState,
    pub control_plane_url: String,
    pub node_id: String,
    pub cluster_name: String,
    /// Unix seconds of the last accepted heartbeat; 0 before the first.
    pub last_heartbeat_unix: i64,
    pub last_error: String,
}

/// What `cluster.json` holds. The join token is not part of it: it is spent at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Membership {
    control_plane_url: String,
    node_id: String,
    cluster_name: String,
    heartbeat_interval_seconds: u32,
}

/// Reads a saved membership; none when the file is missing or unreadable (unreadable ones are logged).
pub fn load(file: &Path) -> Option<Membership> {
    let bytes = std::fs::read(file).ok()?;
    serde_json::from_slice(&bytes)
        .map_err(|e| warn!(path = %file.display(), error = %e, "ignoring an unreadable cluster membership file"))
        .ok()
}

/// What registration tells the control plane about this node.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub node_name: String,
    pub hostname: String,
    pub management_address: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
}

#[derive(Debug)]
pub struct Cluster {
    file: PathBuf,
    vms: VmManager,
    /// The node's certificates: a CSR goes with the registration, the cluster CA comes back.
    certs: CertPaths,
    /// Serializes join and leave.
    ops: tokio::sync::Mutex<()>,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    status: Mutex<Tracked>,
}

#[derive(Debug, Default)]
struct Tracked {
    status: ClusterStatus,
    /// Bumped at every join and leave; a heartbeat task of an older epoch records nothing.
    epoch: u64,
    heartbeats: Option<tokio::task::AbortHandle>,
}

impl Cluster {
    /// Starts standalone, or with a `saved` membership (see [`load`]) resuming its heartbeats. Must be called
    /// inside a tokio runtime.
    pub fn open(file: PathBuf, saved: Option<Membership>, vms: VmManager, certs: CertPaths) -> Self {
        let cluster = Self { file, vms, certs, ops: tokio::sync::Mutex::new(()), shared: Arc::default() };
        if let Some(membership) = saved {
            match endpoint(&membership.control_plane_url) {
                Ok(endpoint) => {
                    info!(control_plane = %membership.control_plane_url, node_id = %membership.node_id,
                        "resuming heartbeats");
                    cluster.start_heartbeats(membership, endpoint.connect_lazy());
                }
                Err(e) => warn!(error = %crate::grpc::error_chain(&e), "cannot resume the cluster membership"),
            }
        }
        cluster
    }

    pub fn status(&self) -> ClusterStatus {
        self.shared.lock().status.clone()
    }

    /// Registers with the control plane at `url` and starts heartbeats. Valid when standalone. Fails with the
    /// control plane's reason, leaving the node standalone and nothing saved.
    pub async fn join(&self, url: &str, token: &str, registration: Registration) -> Result<ClusterStatus, HostError> {
        check_join(url, token)?;
        let _op = self.ops.lock().await;
        let current = self.status();
        if current.state != ClusterState::Standalone {
            return Err(HostError::ClusterMember { cluster: current.cluster_name, url: current.control_plane_url });
        }
        let channel = endpoint(url)?
            .connect()
            .await
            .map_err(|source| HostError::ClusterConnect { url: url.to_owned(), source })?;
        // Without a node key (certificates could not be made) the node joins without a CSR.
        let csr_pem = {
            let (certs, name) = (self.certs.clone(), registration.node_name.clone());
            tokio::task::spawn_blocking(move || certs.node_csr(&name)).await.ok().and_then(Result::ok)
        };
        let request = cp::RegisterNodeRequest {
            csr_pem: csr_pem.unwrap_or_default(),
            join_token: token.to_owned(),
            node_name: registration.node_name,
            hostname: registration.hostname,
            management_address: registration.management_address,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cpu_count: registration.cpu_count,
            memory_total_bytes: registration.memory_total_bytes,
        };
        let reply = ControlPlaneClient::new(channel.clone())
            .register_node(request)
            .await
            .map_err(|status| register_error(url, status))?
            .into_inner();
        if reply.node_id.is_empty() {
            let status = tonic::Status::internal("RegisterNode answered without a node id");
            return Err(register_error(url, status));
        }
        let interval = match reply.heartbeat_interval_seconds {
            0 => DEFAULT_INTERVAL_SECONDS,
            n => n.min(3600),
        };
        if !reply.cluster_ca_pem.is_empty() {
            let certs = self.certs.clone();
            let (ca, cert) = (reply.cluster_ca_pem.clone(), reply.node_certificate_pem.clone());
            tokio::task::spawn_blocking(move || certs.install_cluster(&ca, &cert))
                .await
                .expect("installing certificates does not panic")
                .map_err(|source| HostError::ClusterCertificates { url: url.to_owned(), source })?;
            info!(signed = !reply.node_certificate_pem.is_empty(), "installed the cluster CA");
        }
        let membership = Membership {
            control_plane_url: url.to_owned(),
            node_id: reply.node_id,
            cluster_name: reply.cluster_name,
            heartbeat_interval_seconds: interval,
        };
        persist_json(self.file.clone(), &membership).await?;
        info!(control_plane = %url, node_id = %membership.node_id, cluster = %membership.cluster_name, interval,
            "joined the cluster");
        self.start_heartbeats(membership, channel);
        Ok(self.status())
    }

    /// Stops heartbeats and forgets the membership. Valid in any state; standalone stays standalone.
    pub async fn leave(&self) -> Result<ClusterStatus, HostError> {
        let _op = self.ops.lock().await;
        remove_durably(self.file.clone()).await?;
        let mut tracked = self.shared.lock();
        tracked.epoch += 1;
        if let Some(task) = tracked.heartbeats.take() {
            task.abort();
        }
        if tracked.status.state != ClusterState::Standalone {
            info!(cluster = %tracked.status.cluster_name, "left the cluster");
        }
        tracked.status = ClusterStatus::default();
        Ok(tracked.status.clone())
    }

    fn start_heartbeats(&self, membership: Membership, channel: Channel) {
        let mut tracked = self.shared.lock();
        tracked.epoch += 1;
        let epoch = tracked.epoch;
        tracked.status = ClusterStatus {
            state: ClusterState::Member,
            control_plane_url: membership.control_plane_url.clone(),
            node_id: membership.node_id.clone(),
            cluster_name: membership.cluster_name.clone(),
            last_heartbeat_unix: 0,
            last_error: String::new(),
        };
        let span = tracing::info_span!(parent: None, "heartbeats", node_id = %membership.node_id);
        let task = tokio::spawn(
            heartbeats(Arc::clone(&self.shared), epoch, membership, channel, self.vms.clone()).instrument(span),
        );
        tracked.heartbeats = Some(task.abort_handle());
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a heartbeat's outcome, logging only changes so a long outage does not flood the log.
    fn record(&self, epoch: u64, node_id: &str, outcome: Result<(), tonic::Status>) {
        let mut tracked = self.lock();
        if tracked.epoch != epoch {
            return;
        }
        let status = &mut tracked.status;
        match outcome {
            Ok(()) => {
                if status.state == ClusterState::Disconnected {
                    info!("the control plane accepts heartbeats again");
                }
                status.state = ClusterState::Member;
                status.last_heartbeat_unix = now_unix();
                status.last_error.clear();
            }
            Err(reply) => {
                let error = if reply.code() == Code::NotFound {
                    format!("the control plane no longer knows node id {node_id}; leave and join again")
                } else {
                    format!("heartbeat failed ({:?}): {}", reply.code(), reply.message())
                };
                if status.state != ClusterState::Disconnected || status.last_error != error {
                    warn!(%error, "disconnected from the control plane");
                }
                status.state = ClusterState::Disconnected;
                status.last_error = error;
            }
        }
    }
}

async fn heartbeats(shared: Arc<Shared>, epoch: u64, membership: Membership, channel: Channel, vms: VmManager) {
    let mut client = ControlPlaneClient::new(channel);
    let mut ticker = tokio::time::interval(Duration::from_secs(membership.heartbeat_interval_seconds.into()));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sampler: Option<Sampler> = None;
    loop {
        ticker.tick().await;
        let (back, telemetry) = tokio::task::spawn_blocking(move || {
            let mut sampler = sampler.or_else(Sampler::new);
            let telemetry = sampler.as_mut().map(Sampler::sample).unwrap_or_default();
            (sampler, telemetry)
        })
        .await
        .unwrap_or_default();
        sampler = back;
        let list = vms.list();
        let running = list.iter().filter(|vm| vm.state.is_active()).count();
        let telemetry = telemetry_to_pb(telemetry, running as u32, list.len() as u32);
        let request = cp::HeartbeatRequest { node_id: membership.node_id.clone(), telemetry: Some(telemetry) };
        let outcome = client.heartbeat(request).await.map(|_| ());
        debug!(ok = outcome.is_ok(), "heartbeat");
        shared.record(epoch, &membership.node_id, outcome);
    }
}

fn telemetry_to_pb(t: Telemetry, vms_running: u32, vms_total: u32) -> cp::Telemetry {
    cp::Telemetry {
        cpu_usage_percent: t.cpu_usage_percent,
        memory_total_bytes: t.memory_total_bytes,
        memory_used_bytes: t.memory_used_bytes,
        disks: t
            .disks
            .into_iter()
            .map(|(mount_point, total_bytes, available_bytes)| cp::DiskUsage {
                mount_point,
                total_bytes,
                available_bytes,
            })
            .collect(),
        networks: t
            .networks
            .into_iter()
            .map(|(interface, rx_bytes, tx_bytes)| cp::NetworkCounters { interface, rx_bytes, tx_bytes })
            .collect(),
        vms_running,
        vms_total,
        uptime_seconds: t.uptime_seconds,
    }
}

/// The control plane's endpoint: timeouts, keepalive, and TLS with the system's roots for https.
fn endpoint(url: &str) -> Result<Endpoint, HostError> {
    let invalid = |problem: &str| HostError::Invalid(ValidationErrors::one("control_plane_url", url, problem));
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|_| invalid("is not a URL"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if url.starts_with("https://") {
        return endpoint
            .tls_config(ClientTlsConfig::new().with_native_roots())
            .map_err(|source| HostError::ClusterConnect { url: url.to_owned(), source });
    }
    Ok(endpoint)
}

/// Every problem with a join request. The token's value never appears in a message.
fn check_join(url: &str, token: &str) -> Result<(), HostError> {
    let mut problems = Vec::new();
    let uri = url.parse::<Uri>().ok();
    let scheme_ok = uri.as_ref().and_then(Uri::scheme_str).is_some_and(|s| s == "http" || s == "https");
    let host_ok = uri.as_ref().and_then(Uri::host).is_some_and(|h| !h.is_empty());
    if url.is_empty() {
        problems.push(field("control_plane_url", "", "must not be empty"));
    } else if !(scheme_ok && host_ok) {
        problems.push(field("control_plane_url", url, "must be an http:// or https:// URL with a host"));
    }
    if token.trim().is_empty() {
        problems.push(field("join_token", "", "must not be empty"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(HostError::Invalid(ValidationErrors(problems)))
    }
}

fn field(field: &str, value: &str, problem: &str) -> FieldError {
    FieldError { field: field.into(), value: value.into(), problem: problem.into() }
}

fn register_error(url: &str, status: tonic::Status) -> HostError {
    let url = url.to_owned();
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            HostError::ClusterTokenRefused { url, message: status.message().to_owned() }
        }
        code => HostError::ClusterRegister { url, code, message: status.message().to_owned() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(url: &str, token: &str) -> String {
        match check_join(url, token) {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn join_requests_are_checked_without_echoing_the_token() {
        assert_eq!(problems("http://192.0.2.1:7443", "secret"), "");
        assert_eq!(problems("https://cp.example", "secret"), "");
        assert_eq!(problems("https://cp.example", ""), "join_token: must not be empty");
        assert_eq!(problems("https://cp.example", "  "), "join_token: must not be empty");
        assert_eq!(
            problems("ftp://cp.example", "secret"),
            r#"control_plane_url: "ftp://cp.example" must be an http:// or https:// URL with a host"#
        );
        assert_eq!(
            problems("cp.example:7443", "x"),
            r#"control_plane_url: "cp.example:7443" must be an http:// or https:// URL with a host"#
        );
        assert_eq!(problems("", ""), "control_plane_url: must not be empty; join_token: must not be empty");
    }

    #[test]
    fn membership_file_has_no_token() {
        let membership = Membership {
            control_plane_url: "http://cp:1".into(),
            node_id: "n1".into(),
            cluster_name: "c".into(),
            heartbeat_interval_seconds: 30,
        };
        let text = serde_json::to_string(&membership).unwrap();
        assert_eq!(
            text,
            r#"{"control_plane_url":"http://cp:1","node_id":"n1","cluster_name":"c","heartbeat_interval_seconds":30}"#
        );
    }

    #[test]
    fn heartbeat_outcomes_move_the_state() {
        let shared = Shared::default();
        shared.lock().status.state = ClusterState::Member;
        shared.record(0, "n1", Err(tonic::Status::unavailable("connection refused")));
        let status = shared.lock().status.clone();
        assert_eq!(status.state, ClusterState::Disconnected);
        assert_eq!(status.last_error, "heartbeat failed (Unavailable): connection refused");
        shared.record(0, "n1", Err(tonic::Status::not_found("who?")));
        assert!(shared.lock().status.last_error.contains("no longer knows node id n1"));
        shared.record(0, "n1", Ok(()));
        let status = shared.lock().status.clone();
        assert_eq!((status.state, status.last_error.as_str()), (ClusterState::Member, ""));
        assert!(status.last_heartbeat_unix > 0);
        shared.record(7, "n1", Err(tonic::Status::unavailable("stale task")));
        assert_eq!(shared.lock().status.state, ClusterState::Member, "a stale epoch records nothing");
    }
}
