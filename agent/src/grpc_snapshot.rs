//! `quantix.node.v1.SnapshotService` over the VM manager's snapshot operations (`qx_vmm`'s `snapshot_ops`).

use std::sync::Arc;

use qx_proto::node::v1 as pb;
use qx_proto::node::v1::snapshot_service_server::SnapshotService;
use qx_vmm::{Snapshot, SnapshotKind, SnapshotState};
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};

use crate::convert::vm_to_pb;
use crate::grpc::status;
use crate::node::Node;

/// The gRPC face of VM snapshots.
#[derive(Debug, Clone)]
pub struct SnapshotApi {
    node: Arc<Node>,
}

impl SnapshotApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

fn snapshot_to_pb(snapshot: &Snapshot) -> pb::VmSnapshot {
    let kind = match snapshot.kind {
        SnapshotKind::DiskOnly => pb::SnapshotKind::DiskOnly,
        SnapshotKind::Memory => pb::SnapshotKind::Memory,
    };
    let state = match snapshot.state {
        SnapshotState::Ready => pb::SnapshotState::Ready,
        SnapshotState::Creating => pb::SnapshotState::Creating,
        SnapshotState::Deleting => pb::SnapshotState::Deleting,
    };
    pb::VmSnapshot {
        name: snapshot.name.clone(),
        kind: kind as i32,
        parent: snapshot.parent.clone().unwrap_or_default(),
        created_at_unix_ms: snapshot.created_at_unix_ms,
        quiesced: snapshot.quiesced,
        state: state as i32,
    }
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::VmSnapshot>, Status> {
        let request = request.into_inner();
        let kind = match pb::SnapshotKind::try_from(request.kind) {
            Ok(pb::SnapshotKind::Memory) => SnapshotKind::Memory,
            Ok(pb::SnapshotKind::DiskOnly | pb::SnapshotKind::Unspecified) => SnapshotKind::DiskOnly,
            Err(_) => return Err(Status::invalid_argument(format!("kind: \"{}\" is no snapshot kind", request.kind))),
        };
        let span = info_span!("CreateSnapshot", vm = %request.vm, snapshot = %request.name);
        let taken = self.node.vms().create_snapshot(&request.vm, &request.name, kind).instrument(span).await;
        Ok(Response::new(snapshot_to_pb(&taken.map_err(status)?)))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let vm = request.into_inner().vm;
        let tree = self.node.vms().list_snapshots(&vm).await.map_err(status)?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: tree.snapshots.iter().map(snapshot_to_pb).collect(),
            current: tree.current.unwrap_or_default(),
        }))
    }

    async fn revert_snapshot(&self, request: Request<pb::SnapshotRef>) -> Result<Response<pb::Vm>, Status> {
        let request = request.into_inner();
        let span = info_span!("RevertSnapshot", vm = %request.vm, snapshot = %request.name);
        let vm = self.node.vms().revert_snapshot(&request.vm, &request.name).instrument(span).await;
        Ok(Response::new(vm_to_pb(&vm.map_err(status)?)))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::SnapshotRef>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let request = request.into_inner();
        let span = info_span!("DeleteSnapshot", vm = %request.vm, snapshot = %request.name);
        self.node.vms().delete_snapshot(&request.vm, &request.name).instrument(span).await.map_err(status)?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }
}
