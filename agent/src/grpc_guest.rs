//! `quantix.node.v1.GuestAgentService` over the VM manager's guest agent operations (`qx_vmm`'s `guest_ops`), and
//! the conversions of what the agent reports to its messages.

use std::sync::Arc;
use std::time::Duration;

use qx_proto::node::v1 as pb;
use qx_proto::node::v1::guest_agent_service_server::GuestAgentService;
use qx_vmm::qga::{qapi_qga, GuestExec, QgaError};
use qx_vmm::{AgentState, AgentStatus, GuestInfo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use tracing::{info_span, Instrument};

use crate::grpc::status;
use crate::node::Node;

/// How long ExecGuest waits for the program when the request says 0.
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// What ReadGuestFile returns at most when the request says 0.
const DEFAULT_READ_MAX: usize = 1 << 20;

/// The gRPC face of the guest agents.
#[derive(Debug, Clone)]
pub struct GuestApi {
    node: Arc<Node>,
}

impl GuestApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// The status code of a guest agent failure: silence is DEADLINE_EXCEEDED (the agent's timeout passed), a gone
/// connection UNAVAILABLE, the agent's refusal FAILED_PRECONDITION (a missing file, a disabled command).
pub(crate) fn agent_code(error: &QgaError) -> Code {
    match error {
        QgaError::NotResponding { .. } => Code::DeadlineExceeded,
        QgaError::Connect { .. } | QgaError::Closed { .. } => Code::Unavailable,
        QgaError::Command { .. } | QgaError::FileTooLarge { .. } | QgaError::ShortWrite { .. } => {
            Code::FailedPrecondition
        }
        QgaError::Sync { .. } | QgaError::Decode { .. } | QgaError::Send { .. } => Code::Internal,
    }
}

pub(crate) fn agent_to_pb(status: &AgentStatus) -> pb::GuestAgentStatus {
    let state = match status.state {
        AgentState::Unknown => pb::GuestAgentState::Unknown,
        AgentState::Connected => pb::GuestAgentState::Connected,
        AgentState::NotResponding => pb::GuestAgentState::NotResponding,
    };
    pb::GuestAgentStatus {
        state: state as i32,
        version: status.version.clone().unwrap_or_default(),
        reason: status.reason.clone(),
        since_unix_ms: status.since_unix_ms,
    }
}

fn interface_to_pb(nic: &qapi_qga::GuestNetworkInterface) -> pb::GuestInterface {
    let addresses = nic.ip_addresses.iter().flatten().map(|ip| pb::GuestIpAddress {
        family: match ip.ip_address_type {
            qapi_qga::GuestIpAddressType::ipv4 => "ipv4".to_owned(),
            qapi_qga::GuestIpAddressType::ipv6 => "ipv6".to_owned(),
        },
        address: ip.ip_address.clone(),
        prefix: u32::try_from(ip.prefix).unwrap_or(0),
    });
    pb::GuestInterface {
        name: nic.name.clone(),
        mac: nic.hardware_address.clone().unwrap_or_default(),
        addresses: addresses.collect(),
    }
}

fn filesystem_to_pb(fs: &qapi_qga::GuestFilesystemInfo) -> pb::GuestFilesystem {
    let bytes = |n: Option<u64>| n.unwrap_or(0);
    pb::GuestFilesystem {
        mountpoint: fs.mountpoint.clone(),
        name: fs.name.clone(),
        fs_type: fs.type_.clone(),
        used_bytes: bytes(fs.used_bytes),
        total_bytes: bytes(fs.total_bytes),
        devices: fs.disk.iter().filter_map(|d| d.dev.clone()).collect(),
    }
}

pub(crate) fn guest_info_to_pb(info: &GuestInfo) -> pb::GuestInfo {
    let os = &info.os;
    let text = |s: &Option<String>| s.clone().unwrap_or_default();
    pb::GuestInfo {
        agent: Some(agent_to_pb(&info.agent)),
        os: Some(pb::GuestOs {
            id: text(&os.id),
            name: text(&os.name),
            pretty_name: text(&os.pretty_name),
            version: text(&os.version),
            version_id: text(&os.version_id),
            kernel_release: text(&os.kernel_release),
            kernel_version: text(&os.kernel_version),
            machine: text(&os.machine),
        }),
        host_name: info.host_name.clone(),
        timezone: info.timezone.as_ref().and_then(|tz| tz.zone.clone()).unwrap_or_default(),
        utc_offset_seconds: info.timezone.as_ref().map_or(0, |tz| i32::try_from(tz.offset).unwrap_or(0)),
        interfaces: info.interfaces.iter().map(interface_to_pb).collect(),
        filesystems: info.filesystems.iter().map(filesystem_to_pb).collect(),
        unavailable: info.unavailable.clone(),
    }
}

type ExecStream = ReceiverStream<Result<pb::ExecGuestEvent, Status>>;

#[tonic::async_trait]
impl GuestAgentService for GuestApi {
    async fn get_guest_info(
        &self,
        request: Request<pb::GetGuestInfoRequest>,
    ) -> Result<Response<pb::GuestInfo>, Status> {
        let vm = request.into_inner().vm;
        let info = self.node.vms().guest_info(&vm).instrument(info_span!("GetGuestInfo", vm = %vm)).await;
        Ok(Response::new(guest_info_to_pb(&info.map_err(status)?)))
    }

    type ExecGuestStream = ExecStream;

    async fn exec_guest(&self, request: Request<pb::ExecGuestRequest>) -> Result<Response<ExecStream>, Status> {
        let request = request.into_inner();
        let timeout = match request.timeout_seconds {
            0 => DEFAULT_EXEC_TIMEOUT,
            seconds => Duration::from_secs(seconds.into()),
        };
        let exec = GuestExec {
            path: request.path,
            args: request.args,
            env: request.env,
            input: (!request.stdin.is_empty()).then_some(request.stdin),
            capture_output: true,
        };
        if exec.path.is_empty() {
            return Err(Status::invalid_argument("path: \"\" must name the program to run"));
        }
        let (tx, rx) = mpsc::channel(2);
        let (node, vm) = (Arc::clone(&self.node), request.vm);
        let span = info_span!("ExecGuest", vm = %vm, path = %exec.path);
        tokio::spawn(
            async move {
                let started = tx.clone();
                let notify = move |pid| {
                    let event = pb::ExecGuestEvent { event: Some(pb::exec_guest_event::Event::Started(pid)) };
                    let _ = started.try_send(Ok(event));
                };
                let result = node.vms().guest_exec(&vm, exec, timeout, notify).await;
                let last = result.map_err(status).map(|outcome| {
                    let s = outcome.status;
                    let exited = pb::ExecGuestExited {
                        exit_code: s.exit_code,
                        signal: s.signal,
                        stdout: s.stdout,
                        stderr: s.stderr,
                        truncated: s.truncated,
                    };
                    pb::ExecGuestEvent { event: Some(pb::exec_guest_event::Event::Exited(exited)) }
                });
                let _ = tx.send(last).await;
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn read_guest_file(
        &self,
        request: Request<pb::ReadGuestFileRequest>,
    ) -> Result<Response<pb::GuestFile>, Status> {
        let request = request.into_inner();
        let max = match request.max_bytes {
            0 => DEFAULT_READ_MAX,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let span = info_span!("ReadGuestFile", vm = %request.vm, path = %request.path);
        let content = self.node.vms().guest_read_file(&request.vm, &request.path, max).instrument(span).await;
        Ok(Response::new(pb::GuestFile { content: content.map_err(status)? }))
    }

    async fn write_guest_file(
        &self,
        request: Request<pb::WriteGuestFileRequest>,
    ) -> Result<Response<pb::WriteGuestFileResponse>, Status> {
        let request = request.into_inner();
        let span = info_span!("WriteGuestFile", vm = %request.vm, path = %request.path);
        let written = self.node.vms().guest_write_file(&request.vm, &request.path, &request.content);
        written.instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::WriteGuestFileResponse {}))
    }

    async fn set_guest_password(
        &self,
        request: Request<pb::SetGuestPasswordRequest>,
    ) -> Result<Response<pb::SetGuestPasswordResponse>, Status> {
        let request = request.into_inner();
        let span = info_span!("SetGuestPassword", vm = %request.vm, user = %request.user);
        let set = self.node.vms().guest_set_password(&request.vm, &request.user, &request.password, request.crypted);
        set.instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::SetGuestPasswordResponse {}))
    }
}
