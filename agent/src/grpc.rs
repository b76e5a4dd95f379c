//! `quantix.node.v1.NodeService` over the `Node`: each handler opens a span, converts the request, calls the
//! domain and maps the error, nothing more.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_server::NodeService;
use qx_vmm::VmError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info_span, Instrument};

use crate::convert::{
    event_to_pb, network_from_pb, network_to_pb, nic_status_to_pb, node_info_to_pb, spec_from_request, vm_to_pb,
    volume_to_pb,
};
use crate::network::NetworkError;
use crate::node::Node;
use crate::volumes::{VolumeError, DEFAULT_POOL};

type ServiceStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC face of a node.
#[derive(Debug, Clone)]
pub struct NodeApi {
    node: Arc<Node>,
}

impl NodeApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// Domain errors to gRPC status codes, in one place.
pub fn status(error: VmError) -> Status {
    let message = error_chain(&error);
    match error {
        VmError::Invalid(_) => Status::invalid_argument(message),
        VmError::NotFound(_) => Status::not_found(message),
        VmError::AlreadyExists(_) => Status::already_exists(message),
        VmError::WrongState { .. } | VmError::NoConsole { .. } | VmError::Orphan { .. } | VmError::VolumesInUse(_) => {
            Status::failed_precondition(message)
        }
        VmError::Persist { .. } | VmError::Start { .. } | VmError::Qmp { .. } => Status::internal(message),
    }
}

/// Network errors to gRPC status codes.
pub fn network_status(error: NetworkError) -> Status {
    let message = error_chain(&error);
    match error {
        NetworkError::Invalid(_) => Status::invalid_argument(message),
        NetworkError::NotFound(_) => Status::not_found(message),
        NetworkError::AlreadyExists(_) => Status::already_exists(message),
        NetworkError::InUse { .. } => Status::failed_precondition(message),
        NetworkError::Unreachable { .. } => Status::unavailable(message),
        NetworkError::Switch { .. } | NetworkError::Persist { .. } => Status::internal(message),
    }
}

/// Storage errors to gRPC status codes, by the kind the storage crate assigns.
pub fn volume_status(error: VolumeError) -> Status {
    use qx_storage::ErrorKind;
    let message = error_chain(&error);
    let kind = match &error {
        VolumeError::PoolNotFound(_) => ErrorKind::NotFound,
        VolumeError::Engine(_) => ErrorKind::Internal,
        VolumeError::Pool(e) => e.kind(),
    };
    match kind {
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::AlreadyExists => Status::already_exists(message),
        ErrorKind::InvalidArgument => Status::invalid_argument(message),
        ErrorKind::FailedPrecondition => Status::failed_precondition(message),
        ErrorKind::Cancelled => Status::cancelled(message),
        ErrorKind::ResourceExhausted => Status::resource_exhausted(message),
        ErrorKind::Internal => Status::internal(message),
    }
}

fn pool_name(pool: &str) -> &str {
    if pool.is_empty() {
        DEFAULT_POOL
    } else {
        pool
    }
}

/// The error and its causes in one line: gRPC carries a message, not a chain.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn vm_reply(result: Result<qx_vmm::VmInfo, VmError>) -> Result<Response<pb::Vm>, Status> {
    result.map(|vm| Response::new(vm_to_pb(&vm))).map_err(status)
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    async fn get_node_info(&self, _: Request<pb::GetNodeInfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let info = self.node.info().instrument(info_span!("GetNodeInfo")).await;
        Ok(Response::new(node_info_to_pb(info)))
    }

    async fn create_vm(&self, request: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let spec = spec_from_request(request.spec, &request.spec_text).map_err(|e| status(e.into()))?;
        let span = info_span!("CreateVm", vm = %spec.name);
        vm_reply(self.node.vms().create(spec).instrument(span).await)
    }

    async fn get_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let (vm, nics) = self.node.vm(&request.into_inner().name).await.map_err(status)?;
        let mut reply = vm_to_pb(&vm);
        reply.runtime.get_or_insert_default().nics = nics.iter().map(nic_status_to_pb).collect();
        Ok(Response::new(reply))
    }

    async fn list_vms(&self, _: Request<pb::ListVmsRequest>) -> Result<Response<pb::ListVmsResponse>, Status> {
        let vms = self.node.vms().list().iter().map(vm_to_pb).collect();
        Ok(Response::new(pb::ListVmsResponse { vms }))
    }

    async fn update_vm(&self, request: Request<pb::UpdateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let spec = spec_from_request(request.spec, &request.spec_text).map_err(|e| status(e.into()))?;
        let span = info_span!("UpdateVm", vm = %spec.name);
        vm_reply(self.node.vms().update(spec).instrument(span).await)
    }

    async fn delete_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let name = request.into_inner().name;
        let span = info_span!("DeleteVm", vm = %name);
        self.node.vms().delete(&name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn start_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let name = request.into_inner().name;
        vm_reply(self.node.vms().start(&name).instrument(info_span!("StartVm", vm = %name)).await)
    }

    async fn stop_vm(&self, request: Request<pb::StopVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let timeout = (request.timeout_seconds > 0).then(|| Duration::from_secs(request.timeout_seconds.into()));
        let span = info_span!("StopVm", vm = %request.name, force = request.force);
        vm_reply(self.node.vms().stop(&request.name, request.force, timeout).instrument(span).await)
    }

    async fn reboot_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let name = request.into_inner().name;
        vm_reply(self.node.vms().reboot(&name).instrument(info_span!("RebootVm", vm = %name)).await)
    }

    async fn reset_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let name = request.into_inner().name;
        vm_reply(self.node.vms().reset(&name).instrument(info_span!("ResetVm", vm = %name)).await)
    }

    async fn pause_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let name = request.into_inner().name;
        vm_reply(self.node.vms().pause(&name).instrument(info_span!("PauseVm", vm = %name)).await)
    }

    async fn resume_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let name = request.into_inner().name;
        vm_reply(self.node.vms().resume(&name).instrument(info_span!("ResumeVm", vm = %name)).await)
    }

    async fn create_network(&self, request: Request<pb::Network>) -> Result<Response<pb::Network>, Status> {
        let spec = network_from_pb(request.into_inner());
        let span = info_span!("CreateNetwork", network = %spec.name);
        let created = self.node.create_network(spec).instrument(span).await.map_err(network_status)?;
        Ok(Response::new(network_to_pb(&created)))
    }

    async fn list_networks(
        &self,
        _: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let networks = self.node.networks().list().iter().map(network_to_pb).collect();
        Ok(Response::new(pb::ListNetworksResponse { networks }))
    }

    async fn delete_network(
        &self,
        request: Request<pb::NetworkRef>,
    ) -> Result<Response<pb::DeleteNetworkResponse>, Status> {
        let name = request.into_inner().name;
        let span = info_span!("DeleteNetwork", network = %name);
        self.node.delete_network(&name).instrument(span).await.map_err(network_status)?;
        Ok(Response::new(pb::DeleteNetworkResponse {}))
    }

    async fn create_volume(&self, request: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool).to_owned();
        let format = match pb::DiskFormat::try_from(request.format) {
            Ok(pb::DiskFormat::Raw) => qx_storage::ImageFormat::Raw,
            _ => qx_storage::ImageFormat::Qcow2,
        };
        let span = info_span!("CreateVolume", pool = %pool, volume = %request.name);
        let create = self.node.pools().create_empty(&pool, request.name, request.size_bytes, format);
        let volume = create.instrument(span).await.map_err(volume_status)?;
        Ok(Response::new(volume_to_pb(&pool, &volume)))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let pool = pool_name(&request.into_inner().pool).to_owned();
        let volumes = self.node.pools().list_volumes(&pool).await.map_err(volume_status)?;
        Ok(Response::new(pb::ListVolumesResponse { volumes: volumes.iter().map(|v| volume_to_pb(&pool, v)).collect() }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool).to_owned();
        let span = info_span!("DeleteVolume", pool = %pool, volume = %request.name);
        self.node.delete_volume(&pool, &request.name).instrument(span).await.map_err(volume_status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    type WatchEventsStream = ServiceStream<pb::VmEvent>;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let vm = request.into_inner().vm;
        let events = BroadcastStream::new(self.node.vms().subscribe()).filter_map(move |event| {
            let item = match event {
                Ok(event) if vm.is_empty() || event.vm == vm => Some(Ok(event_to_pb(&event))),
                Ok(_) => None,
                // A watcher that falls behind must know it missed changes, rather than trust a stale picture.
                Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                    Some(Err(Status::data_loss(format!("{n} events were dropped; list the VMs again and re-watch"))))
                }
            };
            std::future::ready(item)
        });
        Ok(Response::new(Box::pin(events)))
    }

    type ConsoleStream = ServiceStream<pb::ConsoleOutput>;

    async fn console(
        &self,
        request: Request<Streaming<pb::ConsoleInput>>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let mut input = request.into_inner();
        let first =
            input.message().await?.ok_or_else(|| Status::invalid_argument("vm: the first message must name a VM"))?;
        let console = self.node.vms().console(&first.vm).map_err(status)?;
        let (history, mut live) = console.subscribe();
        let (tx, rx) = mpsc::channel(64);
        if first.history && !history.is_empty() {
            let _ = tx.send(Ok(pb::ConsoleOutput { data: history })).await;
        }
        let span = info_span!("Console", vm = %first.vm);
        tokio::spawn(
            async move {
                loop {
                    match live.recv().await {
                        Ok(data) => {
                            if tx.send(Ok(pb::ConsoleOutput { data })).await.is_err() {
                                break;
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                }
            }
            .instrument(span.clone()),
        );
        tokio::spawn(
            async move {
                if !first.data.is_empty() {
                    let _ = console.write(&first.data).await;
                }
                while let Ok(Some(message)) = input.message().await {
                    if console.write(&message.data).await.is_err() {
                        break;
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
