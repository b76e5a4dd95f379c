//! `quantix.node.v1.HostService` over the node's host backend ([`crate::host::Host`]): each handler opens a span,
//! converts the request, calls the domain and maps the error, nothing more.

use std::sync::Arc;

use qx_proto::node::v1 as pb;
use qx_proto::node::v1::host_service_server::HostService;
use qx_vmm::ValidationErrors;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};

use crate::certs::Role;
use crate::host::{
    AddressMode, ClusterState, ClusterStatus, Diagnostics, HostError, HostStatus, ManagementNetwork, PowerAction,
    SshStatus,
};
use crate::node::{Node, NodeInfo};
use crate::status::status;

/// The gRPC face of the host backend.
#[derive(Debug, Clone)]
pub struct HostApi {
    node: Arc<Node>,
}

impl HostApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl HostService for HostApi {
    async fn get_host_status(&self, _: Request<pb::GetHostStatusRequest>) -> Result<Response<pb::HostStatus>, Status> {
        let status = self.node.host().status().instrument(info_span!("GetHostStatus")).await;
        Ok(Response::new(host_status_to_pb(status)))
    }

    async fn get_network_config(
        &self,
        _: Request<pb::GetNetworkConfigRequest>,
    ) -> Result<Response<pb::ManagementNetwork>, Status> {
        let network = self.node.host().network().instrument(info_span!("GetNetworkConfig")).await;
        Ok(Response::new(network_to_pb(network.map_err(status)?)))
    }

    async fn set_network_config(
        &self,
        request: Request<pb::ManagementNetwork>,
    ) -> Result<Response<pb::ManagementNetwork>, Status> {
        let network = network_from_pb(request.into_inner());
        let span = info_span!("SetNetworkConfig", interface = %network.interface);
        let network = self.node.host().set_network(network).instrument(span).await.map_err(status)?;
        Ok(Response::new(network_to_pb(network)))
    }

    async fn set_ssh(&self, request: Request<pb::SetSshRequest>) -> Result<Response<pb::SshStatus>, Status> {
        let request = request.into_inner();
        let span = info_span!("SetSsh", enabled = request.enabled, timeout_minutes = request.timeout_minutes);
        let ssh = self.node.host().set_ssh(request.enabled, request.timeout_minutes).instrument(span).await;
        Ok(Response::new(ssh_to_pb(ssh.map_err(status)?)))
    }

    async fn join_cluster(
        &self,
        request: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        let request = request.into_inner();
        // The join token is a secret: it stays out of the span.
        let span = info_span!("JoinCluster", control_plane = %request.control_plane_url);
        let joined = self.node.host().join_cluster(&request.control_plane_url, &request.join_token).instrument(span);
        Ok(Response::new(cluster_to_pb(joined.await.map_err(status)?)))
    }

    async fn leave_cluster(&self, _: Request<pb::LeaveClusterRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let left = self.node.host().leave_cluster().instrument(info_span!("LeaveCluster")).await;
        Ok(Response::new(cluster_to_pb(left.map_err(status)?)))
    }

    async fn restart_services(
        &self,
        _: Request<pb::RestartServicesRequest>,
    ) -> Result<Response<pb::RestartServicesResponse>, Status> {
        info_span!("RestartServices").in_scope(|| self.node.host().restart_services());
        Ok(Response::new(pb::RestartServicesResponse {}))
    }

    async fn get_diagnostics(
        &self,
        request: Request<pb::GetDiagnosticsRequest>,
    ) -> Result<Response<pb::Diagnostics>, Status> {
        let lines = request.into_inner().log_lines as usize;
        let (info, diagnostics) = async { (self.node.info().await, self.node.host().diagnostics(lines).await) }
            .instrument(info_span!("GetDiagnostics"))
            .await;
        Ok(Response::new(diagnostics_to_pb(diagnostics, info)))
    }

    async fn power(&self, request: Request<pb::PowerRequest>) -> Result<Response<pb::PowerResponse>, Status> {
        let request = request.into_inner();
        let action = power_action_from_pb(request.action).map_err(status)?;
        let span = info_span!("Power", ?action, confirm_running_vms = request.confirm_running_vms);
        span.in_scope(|| self.node.host().power(action, request.confirm_running_vms)).map_err(status)?;
        Ok(Response::new(pb::PowerResponse {}))
    }

    async fn open_shell(&self, _: Request<pb::OpenShellRequest>) -> Result<Response<pb::OpenShellResponse>, Status> {
        let command = info_span!("OpenShell").in_scope(|| self.node.host().open_shell());
        Ok(Response::new(pb::OpenShellResponse { command }))
    }

    async fn issue_client_certificate(
        &self,
        request: Request<pb::IssueClientCertificateRequest>,
    ) -> Result<Response<pb::IssuedCertificate>, Status> {
        let request = request.into_inner();
        let span = info_span!("IssueClientCertificate", name = %request.name.escape_debug().to_string().chars().take(64).collect::<String>());
        let role = match request.role.as_str() {
            "" => Role::Admin,
            other => Role::parse(other).ok_or_else(|| {
                let shown: String = other.chars().take(32).collect();
                Status::invalid_argument(format!("role: {shown:?} is not one of admin, read-only"))
            })?,
        };
        let days = if request.days == 0 { 365 } else { request.days };
        let issued = self.node.issue_client_certificate(request.name, role, days, request.csr_pem).instrument(span);
        let (issued, node_names) = issued.await.map_err(status)?;
        Ok(Response::new(pb::IssuedCertificate {
            certificate_pem: issued.certificate_pem,
            ca_pem: issued.ca_pem,
            node_names,
        }))
    }
}

fn network_from_pb(network: pb::ManagementNetwork) -> ManagementNetwork {
    let mode = match pb::AddressMode::try_from(network.mode) {
        Ok(pb::AddressMode::Dhcp) => Some(AddressMode::Dhcp),
        Ok(pb::AddressMode::Static) => Some(AddressMode::Static),
        Ok(pb::AddressMode::Unspecified) | Err(_) => None,
    };
    ManagementNetwork {
        interface: network.interface,
        mode,
        address: network.address,
        gateway: network.gateway,
        vlan: network.vlan,
        dns_servers: network.dns_servers,
    }
}

fn network_to_pb(network: ManagementNetwork) -> pb::ManagementNetwork {
    let mode = match network.mode {
        Some(AddressMode::Dhcp) => pb::AddressMode::Dhcp,
        Some(AddressMode::Static) => pb::AddressMode::Static,
        None => pb::AddressMode::Unspecified,
    };
    pb::ManagementNetwork {
        interface: network.interface,
        mode: mode.into(),
        address: network.address,
        gateway: network.gateway,
        vlan: network.vlan,
        dns_servers: network.dns_servers,
    }
}

fn ssh_to_pb(ssh: SshStatus) -> pb::SshStatus {
    pb::SshStatus { enabled: ssh.enabled, disable_at_unix: ssh.disable_at_unix }
}

fn cluster_to_pb(cluster: ClusterStatus) -> pb::ClusterStatus {
    let state = match cluster.state {
        ClusterState::Standalone => pb::ClusterState::Standalone,
        ClusterState::Member => pb::ClusterState::Member,
        ClusterState::Disconnected => pb::ClusterState::Disconnected,
    };
    pb::ClusterStatus {
        state: state.into(),
        control_plane_url: cluster.control_plane_url,
        node_id: cluster.node_id,
        cluster_name: cluster.cluster_name,
        last_heartbeat_unix: cluster.last_heartbeat_unix,
        last_error: cluster.last_error,
    }
}

fn host_status_to_pb(status: HostStatus) -> pb::HostStatus {
    pb::HostStatus {
        management_address: status.management_address,
        management_url: status.management_url,
        network: status.network.map(network_to_pb),
        ssh: Some(ssh_to_pb(status.ssh)),
        cluster: Some(cluster_to_pb(status.cluster)),
    }
}

fn diagnostics_to_pb(diagnostics: Diagnostics, info: NodeInfo) -> pb::Diagnostics {
    pb::Diagnostics {
        log_lines: diagnostics.log_lines,
        hardware: diagnostics.hardware,
        accelerator: info.accel.accel.to_string(),
        accelerator_reason: info.accel.reason,
        qemu_version: info.qemu_version,
    }
}

fn power_action_from_pb(action: i32) -> Result<PowerAction, HostError> {
    match pb::PowerAction::try_from(action) {
        Ok(pb::PowerAction::Reboot) => Ok(PowerAction::Reboot),
        Ok(pb::PowerAction::Shutdown) => Ok(PowerAction::Shutdown),
        Ok(pb::PowerAction::Unspecified) | Err(_) => {
            let value =
                pb::PowerAction::try_from(action).map_or_else(|_| action.to_string(), |a| a.as_str_name().into());
            Err(HostError::Invalid(ValidationErrors::one("action", value, "must be REBOOT or SHUTDOWN")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn network_round_trips_and_unknown_modes_are_unspecified() {
        let wire = pb::ManagementNetwork {
            interface: "eth0".into(),
            mode: pb::AddressMode::Static.into(),
            address: "192.0.2.10/24".into(),
            gateway: "192.0.2.1".into(),
            vlan: 7,
            dns_servers: vec!["192.0.2.53".into()],
        };
        assert_eq!(network_to_pb(network_from_pb(wire.clone())), wire);
        let odd = pb::ManagementNetwork { mode: 9, ..wire };
        assert_eq!(network_from_pb(odd).mode, None);
    }

    #[test]
    fn errors_map_to_codes() {
        let invalid = power_action_from_pb(0).unwrap_err();
        let invalid = status(invalid);
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert_eq!(invalid.message(), r#"action: "POWER_ACTION_UNSPECIFIED" must be REBOOT or SHUTDOWN"#);
        assert_eq!(status(HostError::VmsRunning { running: 2 }).code(), Code::FailedPrecondition);
        let refused = HostError::ClusterTokenRefused { url: "http://cp".into(), message: "bad token".into() };
        assert_eq!(status(refused).code(), Code::PermissionDenied);
        let register =
            HostError::ClusterRegister { url: "http://cp".into(), code: Code::Unavailable, message: "down".into() };
        assert_eq!(status(register).code(), Code::Unavailable);
    }
}
