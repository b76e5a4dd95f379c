//! `quantix.node.v1.MigrationService` (the operator's MigrateVm and CancelMigration) and
//! `MigrationPeerService` (node to node) over the `Node`: thin handlers, errors mapped by [`crate::grpc::status`],
//! except that the peer calls report the target's refusals as FAILED_PRECONDITION (the request was fine; this
//! node cannot host it).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::migration_peer_service_server::MigrationPeerService;
use qx_proto::node::v1::migration_service_server::MigrationService;
use qx_vmm::migration::{MigrationConfig, Phase, Progress};
use qx_vmm::VmError;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, info_span, Instrument};

use crate::grpc::{error_chain, status};
use crate::migration::Migrated;
use crate::node::Node;

type ServiceStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The gRPC face of a node's migrations.
#[derive(Debug, Clone)]
pub struct MigrationApi {
    node: Arc<Node>,
}

impl MigrationApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// A MigrateVm request as the driver's config; bad fields are named by the driver's validation.
fn config_from_pb(request: &pb::MigrateVmRequest) -> MigrationConfig {
    let defaults = MigrationConfig::default();
    let postcopy = pb::PostcopyMode::try_from(request.postcopy).unwrap_or_default() != pb::PostcopyMode::Off;
    MigrationConfig {
        max_bandwidth: (request.max_bandwidth_bytes > 0).then_some(request.max_bandwidth_bytes),
        downtime_limit_ms: if request.downtime_limit_ms == 0 {
            defaults.downtime_limit_ms
        } else {
            request.downtime_limit_ms
        },
        max_downtime_limit_ms: defaults.max_downtime_limit_ms.max(request.downtime_limit_ms),
        postcopy,
        multifd_channels: (request.multifd_channels > 0).then(|| request.multifd_channels.min(255) as u8),
        xbzrle_cache_bytes: (request.xbzrle_cache_bytes > 0).then_some(request.xbzrle_cache_bytes),
        ..defaults
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Setup => "setup",
        Phase::Precopy => "precopy",
        Phase::Postcopy => "postcopy",
        Phase::Switchover => "switchover",
        Phase::Completed => "completed",
        Phase::Cancelled => "cancelled",
        Phase::Failed => "failed",
    }
}

fn progress_to_pb(p: &Progress) -> pb::MigrationEvent {
    pb::MigrationEvent {
        event: Some(pb::migration_event::Event::Progress(pb::MigrationProgress {
            phase: phase_name(p.phase).to_owned(),
            transferred_bytes: p.transferred_bytes,
            remaining_bytes: p.remaining_bytes,
            total_bytes: p.total_bytes,
            dirty_rate_bytes: p.dirty_rate_bytes,
            iteration: p.iteration,
            expected_downtime_ms: p.expected_downtime_ms.unwrap_or(0),
            downtime_limit_ms: p.downtime_limit_ms,
            mbps: p.mbps,
            cpu_throttle_percent: p.cpu_throttle_percent.unwrap_or(0).min(100) as u32,
            elapsed_ms: p.elapsed.as_millis() as u64,
        })),
    }
}

fn result_to_pb(done: &Migrated) -> pb::MigrationEvent {
    let o = &done.outcome;
    pb::MigrationEvent {
        event: Some(pb::migration_event::Event::Result(pb::MigrationResult {
            downtime_ms: o.downtime_ms,
            total_time_ms: o.total_time_ms,
            transferred_bytes: o.transferred_bytes,
            postcopy: o.postcopy,
            downtime_limit_ms: o.downtime_limit_ms,
            target_node: done.target_node.clone(),
            encrypted: false,
        })),
    }
}

/// A refusal of the target: whatever the VM operation calls it, the source must hear FAILED_PRECONDITION.
fn peer_status(error: VmError) -> Status {
    match error {
        VmError::Invalid(_) | VmError::AlreadyExists(_) | VmError::VolumesInUse(_) => {
            use crate::status::ApiError;
            crate::status::to_status(tonic::Code::FailedPrecondition, &error_chain(&error), &error.problems())
        }
        other => status(other),
    }
}

#[tonic::async_trait]
impl MigrationService for MigrationApi {
    type MigrateVmStream = ServiceStream<pb::MigrationEvent>;

    async fn migrate_vm(
        &self,
        request: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<Self::MigrateVmStream>, Status> {
        let request = request.into_inner();
        let span = info_span!("MigrateVm", vm = %request.name, target = %request.target_url);
        let config = config_from_pb(&request);
        let (tx, rx) = mpsc::channel(16);
        let node = Arc::clone(&self.node);
        tokio::spawn(
            async move {
                let (cancel_tx, cancel) = watch::channel(false);
                let progress_tx = tx.clone();
                let migrate = node.migrate_vm(&request.name, &request.target_url, config, cancel, move |p| {
                    // A slow reader misses polls, never the result.
                    let _ = progress_tx.try_send(Ok(progress_to_pb(p)));
                });
                tokio::pin!(migrate);
                let result = loop {
                    tokio::select! {
                        result = &mut migrate => break result,
                        () = tx.closed(), if !*cancel_tx.borrow() => {
                            info!("client went away; cancelling the migration");
                            let _ = cancel_tx.send(true);
                        }
                    }
                };
                let _ = tx.send(result.map(|done| result_to_pb(&done)).map_err(status)).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_migration(
        &self,
        request: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::CancelMigrationResponse>, Status> {
        let name = request.into_inner().name;
        if self.node.migrations().cancel(&name) {
            info!(vm = %name, "CancelMigration: cancelling");
            Ok(Response::new(pb::CancelMigrationResponse {}))
        } else {
            Err(Status::not_found(format!("VM {name:?} is not being migrated from this node")))
        }
    }
}

#[tonic::async_trait]
impl MigrationPeerService for MigrationApi {
    async fn prepare_incoming(
        &self,
        request: Request<pb::PrepareIncomingRequest>,
    ) -> Result<Response<pb::PrepareIncomingResponse>, Status> {
        let request = request.into_inner();
        let parse_error = |field: &str, e: serde_json::Error| {
            Status::invalid_argument(format!("{field}: cannot be read as this node's version of it: {e}"))
        };
        let spec = serde_json::from_str(&request.spec_json).map_err(|e| parse_error("spec_json", e))?;
        let devices = serde_json::from_str(&request.devices_json).map_err(|e| parse_error("devices_json", e))?;
        let config = serde_json::from_str(&request.config_json).map_err(|e| parse_error("config_json", e))?;
        let accel = match request.accelerator.as_str() {
            "" => None,
            "kvm" => Some(qx_vmm::Accel::Kvm),
            "tcg" => Some(qx_vmm::Accel::Tcg),
            other => return Err(Status::invalid_argument(format!("accelerator: {other:?} is not kvm or tcg"))),
        };
        let facts = qx_vmm::SourceFacts { accel };
        let span = info_span!("PrepareIncoming", source = %request.source_node);
        let (vm, port) = self
            .node
            .prepare_incoming(spec, devices, config, &request.source_node, facts)
            .instrument(span)
            .await
            .map_err(peer_status)?;
        info!(vm = %vm.spec.name, port, "incoming migration prepared");
        let node_name = self.node.config().node_name.clone();
        Ok(Response::new(pb::PrepareIncomingResponse { port: u32::from(port), node_name }))
    }

    async fn finish_incoming(
        &self,
        request: Request<pb::FinishIncomingRequest>,
    ) -> Result<Response<pb::FinishIncomingResponse>, Status> {
        let name = request.into_inner().name;
        let span = info_span!("FinishIncoming", vm = %name);
        self.node.vms().finish_incoming(&name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::FinishIncomingResponse {}))
    }

    async fn abort_incoming(
        &self,
        request: Request<pb::AbortIncomingRequest>,
    ) -> Result<Response<pb::AbortIncomingResponse>, Status> {
        let name = request.into_inner().name;
        let span = info_span!("AbortIncoming", vm = %name);
        self.node.vms().abort_incoming(&name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::AbortIncomingResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_becomes_the_drivers_config_with_its_defaults_for_zeros() {
        let request = pb::MigrateVmRequest { name: "web".into(), ..Default::default() };
        assert_eq!(config_from_pb(&request), MigrationConfig::default());
        let request = pb::MigrateVmRequest {
            max_bandwidth_bytes: 1 << 20,
            downtime_limit_ms: 5000,
            postcopy: pb::PostcopyMode::Off as i32,
            multifd_channels: 4,
            ..Default::default()
        };
        let config = config_from_pb(&request);
        assert_eq!(
            (config.max_bandwidth, config.downtime_limit_ms, config.max_downtime_limit_ms),
            (Some(1 << 20), 5000, 5000)
        );
        assert_eq!((config.postcopy, config.multifd_channels), (false, Some(4)));
        config.validate().unwrap();
        let multifd_with_postcopy = pb::MigrateVmRequest { multifd_channels: 2, ..Default::default() };
        let error = config_from_pb(&multifd_with_postcopy).validate().unwrap_err().to_string();
        assert!(error.contains("multifd_channels: \"2\""), "{error}");
    }
}
