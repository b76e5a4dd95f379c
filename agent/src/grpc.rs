//! `quantix.node.v1.NodeService` over the `Node`: each handler opens a span, converts the request, calls the
//! domain and maps the error, nothing more.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_server::NodeService;
use qx_storage::OpControl;
use qx_vmm::VmError;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, info_span, Instrument};

use crate::convert::{
    create_volume_from_pb, disk_from_pb, event_to_pb, host_devices_to_pb, image_to_pb, import_image_from_pb,
    network_from_pb, network_to_pb, nic_from_pb, nic_status_to_pb, node_info_to_pb, pool_to_pb, spec_from_request,
    vm_to_pb, volume_to_pb,
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

/// Domain errors to gRPC statuses, in one place (`crate::status`).
pub use crate::status::status;

fn pool_name(pool: &str) -> &str {
    if pool.is_empty() {
        DEFAULT_POOL
    } else {
        pool
    }
}

fn volume_progress(progress: pb::Progress) -> pb::VolumeOperation {
    pb::VolumeOperation { event: Some(pb::volume_operation::Event::Progress(progress)) }
}

fn volume_done(pool: &str, volume: &qx_storage::Volume) -> pb::VolumeOperation {
    pb::VolumeOperation { event: Some(pb::volume_operation::Event::Volume(volume_to_pb(pool, volume))) }
}

/// How often a long storage operation reports progress at most: enough for a smooth bar, little traffic.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);

/// Runs a long storage operation in a task of its own and streams its progress, then its result. A client that
/// drops the stream cancels the operation, which then cleans up after itself (no half-written volume remains).
fn operation_stream<T, F, Fut>(span: tracing::Span, progress: fn(pb::Progress) -> T, operation: F) -> ServiceStream<T>
where
    T: Send + 'static,
    F: FnOnce(OpControl) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(8);
    let ctl = OpControl::new();
    let mut updates = ctl.subscribe();
    let work = operation(ctl.clone());
    tokio::spawn(
        async move {
            tokio::pin!(work);
            let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
            let result = loop {
                tokio::select! {
                    result = &mut work => break result,
                    _ = tx.closed(), if !ctl.is_cancelled() => {
                        info!("client went away; cancelling");
                        ctl.cancel();
                    }
                    _ = tick.tick() => {
                        if updates.has_changed().unwrap_or(false) {
                            let p = *updates.borrow_and_update();
                            let _ = tx.try_send(Ok(progress(pb::Progress { done_bytes: p.done, total_bytes: p.total })));
                        }
                    }
                }
            };
            let _ = tx.send(result).await;
        }
        .instrument(span),
    );
    Box::pin(ReceiverStream::new(rx))
}

/// The error and its causes in one line: gRPC carries a message, not a chain.
pub(crate) use qx_common::error_chain;

/// A detach's wait; 0 means the default.
fn detach_timeout(seconds: u32) -> Option<std::time::Duration> {
    (seconds > 0).then(|| std::time::Duration::from_secs(u64::from(seconds)))
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

    async fn list_host_devices(
        &self,
        _: Request<pb::ListHostDevicesRequest>,
    ) -> Result<Response<pb::ListHostDevicesResponse>, Status> {
        let devices = self.node.host_devices().instrument(info_span!("ListHostDevices")).await.map_err(status)?;
        Ok(Response::new(host_devices_to_pb(devices)))
    }

    async fn create_vm(&self, request: Request<pb::CreateVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let spec = spec_from_request(request.spec, &request.spec_text).map_err(|e| status(VmError::Invalid(e)))?;
        let span = info_span!("CreateVm", vm = %spec.name);
        vm_reply(self.node.create_vm(spec).instrument(span).await)
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
        let spec = spec_from_request(request.spec, &request.spec_text).map_err(|e| status(VmError::Invalid(e)))?;
        let span = info_span!("UpdateVm", vm = %spec.name);
        vm_reply(self.node.update_vm(spec).instrument(span).await)
    }

    async fn delete_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::DeleteVmResponse>, Status> {
        let name = request.into_inner().name;
        let span = info_span!("DeleteVm", vm = %name);
        self.node.vms().delete(&name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn start_vm(&self, request: Request<pb::StartVmRequest>) -> Result<Response<pb::Vm>, Status> {
        let pb::StartVmRequest { name, paused } = request.into_inner();
        let span = info_span!("StartVm", vm = %name, paused);
        vm_reply(self.node.vms().start_with(&name, qx_vmm::StartOptions { paused }).instrument(span).await)
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

    async fn attach_disk(&self, request: Request<pb::AttachDiskRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let disk = disk_from_pb(request.disk.unwrap_or_default()).map_err(|e| status(VmError::Invalid(e)))?;
        let span = info_span!("AttachDisk", vm = %request.vm);
        vm_reply(self.node.attach_disk(&request.vm, disk).instrument(span).await)
    }

    async fn detach_disk(&self, request: Request<pb::DetachDeviceRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let span = info_span!("DetachDisk", vm = %request.vm, disk = %request.id);
        let timeout = detach_timeout(request.timeout_seconds);
        vm_reply(self.node.detach_disk(&request.vm, &request.id, timeout).instrument(span).await)
    }

    async fn attach_nic(&self, request: Request<pb::AttachNicRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let nic = nic_from_pb(request.nic.unwrap_or_default()).map_err(|e| status(VmError::Invalid(e)))?;
        let span = info_span!("AttachNic", vm = %request.vm);
        vm_reply(self.node.attach_nic(&request.vm, nic).instrument(span).await)
    }

    async fn detach_nic(&self, request: Request<pb::DetachDeviceRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let span = info_span!("DetachNic", vm = %request.vm, nic = %request.id);
        let timeout = detach_timeout(request.timeout_seconds);
        vm_reply(self.node.detach_nic(&request.vm, &request.id, timeout).instrument(span).await)
    }

    async fn set_vcpus(&self, request: Request<pb::SetVcpusRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let span = info_span!("SetVcpus", vm = %request.vm, vcpus = request.vcpus);
        vm_reply(self.node.set_vcpus(&request.vm, request.vcpus).instrument(span).await)
    }

    async fn set_memory(&self, request: Request<pb::SetMemoryRequest>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let span = info_span!("SetMemory", vm = %request.vm, memory_mib = request.memory_mib);
        vm_reply(self.node.set_memory(&request.vm, request.memory_mib).instrument(span).await)
    }

    async fn resume_vm(&self, request: Request<pb::VmRef>) -> Result<Response<pb::Vm>, Status> {
        let name = request.into_inner().name;
        vm_reply(self.node.vms().resume(&name).instrument(info_span!("ResumeVm", vm = %name)).await)
    }

    async fn create_network(&self, request: Request<pb::Network>) -> Result<Response<pb::Network>, Status> {
        let spec = network_from_pb(request.into_inner()).map_err(|e| status(NetworkError::Invalid(e)))?;
        let span = info_span!("CreateNetwork", network = %spec.name);
        let created = self.node.create_network(spec).instrument(span).await.map_err(status)?;
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
        self.node.delete_network(&name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::DeleteNetworkResponse {}))
    }

    async fn list_pools(&self, _: Request<pb::ListPoolsRequest>) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let mut pools = Vec::new();
        for pool in self.node.pools().all().await.map_err(status)? {
            let stats = pool.stats().await.map_err(|e| status(VolumeError::from(e)))?;
            pools.push(pool_to_pb(pool.name(), pool.kind(), &stats, pool.copy_plan().as_ref()));
        }
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn get_pool(&self, request: Request<pb::PoolRef>) -> Result<Response<pb::Pool>, Status> {
        let name = pool_name(&request.into_inner().name).to_owned();
        let pool = self.node.pools().pool(&name).await.map_err(status)?;
        let stats = pool.stats().await.map_err(|e| status(VolumeError::from(e)))?;
        Ok(Response::new(pool_to_pb(pool.name(), pool.kind(), &stats, pool.copy_plan().as_ref())))
    }

    type CreateVolumeStream = ServiceStream<pb::VolumeOperation>;

    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<Self::CreateVolumeStream>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool).to_owned();
        let create = create_volume_from_pb(request).map_err(status)?;
        let span = info_span!("CreateVolume", pool = %pool, volume = %create.name);
        let node = Arc::clone(&self.node);
        let stream = operation_stream(span, volume_progress, move |ctl| async move {
            let volume = node.create_volume(&pool, create, &ctl).await.map_err(status)?;
            Ok(volume_done(&pool, &volume))
        });
        Ok(Response::new(stream))
    }

    async fn get_volume(&self, request: Request<pb::VolumeRef>) -> Result<Response<pb::Volume>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool);
        let volume = self.node.pools().pool(pool).await.map_err(status)?.volume(&request.name).await;
        Ok(Response::new(volume_to_pb(pool, &volume.map_err(|e| status(VolumeError::from(e)))?)))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let pool = pool_name(&request.into_inner().pool).to_owned();
        let volumes = self.node.pools().pool(&pool).await.map_err(status)?.list_volumes().await;
        let volumes = volumes.map_err(|e| status(VolumeError::from(e)))?;
        Ok(Response::new(pb::ListVolumesResponse { volumes: volumes.iter().map(|v| volume_to_pb(&pool, v)).collect() }))
    }

    async fn resize_volume(&self, request: Request<pb::ResizeVolumeRequest>) -> Result<Response<pb::Volume>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool);
        let span = info_span!("ResizeVolume", pool = %pool, volume = %request.name, size = request.size_bytes);
        let resize = self.node.resize_volume(pool, &request.name, request.size_bytes);
        let volume = resize.instrument(span).await.map_err(status)?;
        Ok(Response::new(volume_to_pb(pool, &volume)))
    }

    type CloneVolumeStream = ServiceStream<pb::VolumeOperation>;

    async fn clone_volume(
        &self,
        request: Request<pb::CloneVolumeRequest>,
    ) -> Result<Response<Self::CloneVolumeStream>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool).to_owned();
        let span = info_span!("CloneVolume", pool = %pool, volume = %request.name, new = %request.new_name);
        let node = Arc::clone(&self.node);
        let stream = operation_stream(span, volume_progress, move |ctl| async move {
            let clone = node.clone_volume(&pool, &request.name, &request.new_name, &ctl);
            Ok(volume_done(&pool, &clone.await.map_err(status)?))
        });
        Ok(Response::new(stream))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::VolumeRef>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool).to_owned();
        let span = info_span!("DeleteVolume", pool = %pool, volume = %request.name);
        self.node.delete_volume(&pool, &request.name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    type ImportImageStream = ServiceStream<pb::ImageOperation>;

    async fn import_image(
        &self,
        request: Request<pb::ImportImageRequest>,
    ) -> Result<Response<Self::ImportImageStream>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool).to_owned();
        let import = import_image_from_pb(request).map_err(status)?;
        let span = info_span!("ImportImage", pool = %pool, image = %import.name, source = %import.source.display());
        let node = Arc::clone(&self.node);
        let progress = |p: pb::Progress| pb::ImageOperation { event: Some(pb::image_operation::Event::Progress(p)) };
        let stream = operation_stream(span, progress, move |ctl| async move {
            let image = node.import_image(&pool, import, &ctl).await.map_err(status)?;
            Ok(pb::ImageOperation { event: Some(pb::image_operation::Event::Image(image_to_pb(&pool, &image))) })
        });
        Ok(Response::new(stream))
    }

    async fn get_image(&self, request: Request<pb::ImageRef>) -> Result<Response<pb::Image>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool);
        let image = self.node.pools().pool(pool).await.map_err(status)?.image(&request.name).await;
        Ok(Response::new(image_to_pb(pool, &image.map_err(|e| status(VolumeError::from(e)))?)))
    }

    async fn list_images(
        &self,
        request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let pool = pool_name(&request.into_inner().pool).to_owned();
        let images = self.node.pools().pool(&pool).await.map_err(status)?.list_images().await;
        let images = images.map_err(|e| status(VolumeError::from(e)))?;
        Ok(Response::new(pb::ListImagesResponse { images: images.iter().map(|i| image_to_pb(&pool, i)).collect() }))
    }

    async fn delete_image(&self, request: Request<pb::ImageRef>) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let request = request.into_inner();
        let pool = pool_name(&request.pool).to_owned();
        let span = info_span!("DeleteImage", pool = %pool, image = %request.name);
        self.node.delete_image(&pool, &request.name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::DeleteImageResponse {}))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation that reports half its work, then waits to be cancelled, and says whether it was.
    fn waits_for_cancel(cancelled: tokio::sync::oneshot::Sender<()>) -> impl FnOnce(OpControl) -> ServiceFuture {
        move |ctl: OpControl| {
            Box::pin(async move {
                ctl.report(50, 100);
                while !ctl.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let _ = cancelled.send(());
                Err(Status::cancelled("cancelled"))
            })
        }
    }

    type ServiceFuture = Pin<Box<dyn std::future::Future<Output = Result<pb::Progress, Status>> + Send>>;

    #[tokio::test]
    async fn progress_streams_and_a_dropped_stream_cancels() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut stream = operation_stream(tracing::Span::none(), |p| p, waits_for_cancel(tx));
        let first = stream.next().await.expect("a progress message").expect("progress, not an error");
        assert_eq!((first.done_bytes, first.total_bytes), (50, 100));
        drop(stream);
        tokio::time::timeout(Duration::from_secs(5), rx).await.expect("cancelled in time").expect("cancelled");
    }

    #[tokio::test]
    async fn the_result_comes_last() {
        let stream = operation_stream(
            tracing::Span::none(),
            |p| p,
            |_ctl| async { Ok(pb::Progress { done_bytes: 7, total_bytes: 7 }) },
        );
        let all: Vec<_> = stream.collect().await;
        let last = all.last().expect("a result").as_ref().expect("success");
        assert_eq!(last.done_bytes, 7);
    }
}
