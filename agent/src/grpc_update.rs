//! `quantix.node.v1.UpdateService` over the host's update backend ([`crate::host::update`]): UpdateHost turns the
//! request stream into an [`UpdateRequest`] (chunks into a channel, `cancel` and a broken stream into a cancel) and
//! streams the install's progress back; a client that stops reading cancels the install too.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::update_host_request::Message;
use qx_proto::node::v1::update_service_server::UpdateService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info_span, Instrument};

use crate::host::update::{
    Outcome, Phase, Slot, SlotVersion, SystemStatus, UpdateControl, UpdateProgress, UpdateRecord, UpdateRequest,
    UpdateSource,
};
use crate::node::Node;
use crate::status::status;

/// Chunks buffered between the gRPC stream and the staging file.
const CHUNKS_IN_FLIGHT: usize = 4;

#[derive(Debug, Clone)]
pub struct UpdateApi {
    node: Arc<Node>,
}

impl UpdateApi {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::UpdateHostProgress, Status>> + Send>>;

#[tonic::async_trait]
impl UpdateService for UpdateApi {
    type UpdateHostStream = ProgressStream;

    async fn update_host(
        &self,
        request: Request<Streaming<pb::UpdateHostRequest>>,
    ) -> Result<Response<ProgressStream>, Status> {
        let mut inbound = request.into_inner();
        let start = match inbound.message().await?.and_then(|m| m.message) {
            Some(Message::Start(start)) => start,
            _ => return Err(Status::invalid_argument("start: the first message must be start")),
        };
        if !start.path.is_empty() {
            self.node.confine("path", std::path::Path::new(&start.path)).await.map_err(status)?;
        }
        let ctl = UpdateControl::new();
        let (source, chunks) = if start.path.is_empty() {
            let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
            (UpdateSource::Stream(rx), Some(tx))
        } else {
            (UpdateSource::Path(start.path.clone().into()), None)
        };
        tokio::spawn(read_requests(inbound, chunks, ctl.clone()));
        let request = UpdateRequest {
            source,
            size: start.size,
            sha256: start.sha256,
            signature: start.signature,
            reboot: start.reboot,
            confirm_running_vms: start.confirm_running_vms,
            health_timeout_seconds: start.health_timeout_seconds,
        };
        let span = info_span!("UpdateHost", path = %start.path, size = start.size, reboot = start.reboot);
        let (tx, rx) = mpsc::channel(16);
        let node = Arc::clone(&self.node);
        tokio::spawn(
            async move {
                let mut progress = ctl.subscribe();
                let work = node.host().update_system(request, &ctl);
                tokio::pin!(work);
                let last = loop {
                    tokio::select! {
                        result = &mut work => break result,
                        Ok(()) = progress.changed() => {
                            // Progress is lossy (a slow reader gets the latest later); a client gone cancels.
                            let now = *progress.borrow_and_update();
                            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Ok(progress_to_pb(now, None))) {
                                ctl.cancel();
                            }
                        }
                    }
                };
                let reply = last.map(|status| {
                    let total = ctl.subscribe().borrow().total;
                    let done = UpdateProgress { phase: Phase::Done, done: total, total };
                    progress_to_pb(done, Some(status))
                });
                let _ = tx.send(reply.map_err(status)).await;
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_system_status(
        &self,
        _: Request<pb::GetSystemStatusRequest>,
    ) -> Result<Response<pb::SystemStatus>, Status> {
        let status = self.node.host().updates().status().instrument(info_span!("GetSystemStatus")).await;
        Ok(Response::new(system_status_to_pb(status)))
    }
}

/// The rest of the request stream: chunks go to the install, `cancel` or a broken stream cancel it. The chunk
/// channel closes (ending the image) when the client closes its side.
async fn read_requests(
    mut inbound: Streaming<pb::UpdateHostRequest>,
    chunks: Option<mpsc::Sender<Vec<u8>>>,
    ctl: UpdateControl,
) {
    loop {
        match inbound.message().await {
            Ok(None) => return,
            Ok(Some(pb::UpdateHostRequest { message: Some(Message::Chunk(bytes)) })) => match &chunks {
                Some(tx) if tx.send(bytes).await.is_ok() => {}
                // A path update carries no chunks; a finished install reads no more.
                _ => {}
            },
            Ok(Some(pb::UpdateHostRequest { message: Some(Message::Cancel(_)) })) | Err(_) => {
                ctl.cancel();
                return;
            }
            Ok(Some(_)) => {}
        }
    }
}

fn progress_to_pb(progress: UpdateProgress, status: Option<SystemStatus>) -> pb::UpdateHostProgress {
    let phase = match progress.phase {
        Phase::Receiving => pb::UpdatePhase::Receiving,
        Phase::Verifying => pb::UpdatePhase::Verifying,
        Phase::Writing => pb::UpdatePhase::Writing,
        Phase::Checking => pb::UpdatePhase::Checking,
        Phase::Done => pb::UpdatePhase::Done,
    };
    pb::UpdateHostProgress {
        phase: phase.into(),
        bytes_done: progress.done,
        bytes_total: progress.total,
        status: status.map(system_status_to_pb),
    }
}

fn slot_to_pb(slot: SlotVersion) -> pb::SystemSlot {
    pb::SystemSlot { slot: slot.slot.name().to_owned(), version: slot.version }
}

fn record_to_pb(record: UpdateRecord) -> pb::UpdateRecord {
    let outcome = match record.outcome {
        Outcome::Installing => pb::UpdateOutcome::Installing,
        Outcome::Pending => pb::UpdateOutcome::Pending,
        Outcome::Succeeded => pb::UpdateOutcome::Succeeded,
        Outcome::RolledBack => pb::UpdateOutcome::RolledBack,
        Outcome::Failed => pb::UpdateOutcome::Failed,
        Outcome::Cancelled => pb::UpdateOutcome::Cancelled,
    };
    pb::UpdateRecord {
        version: record.version,
        slot: record.slot.name().to_owned(),
        outcome: outcome.into(),
        message: record.message,
        at_unix: record.at_unix,
    }
}

pub fn system_status_to_pb(status: SystemStatus) -> pb::SystemStatus {
    pb::SystemStatus {
        unavailable: status.unavailable.unwrap_or_default(),
        active: status.active.map(slot_to_pb),
        fallback: status.fallback.map(slot_to_pb),
        pending: status.pending.map(Slot::name).unwrap_or_default().to_owned(),
        trial: status.trial,
        last_update: status.last_update.map(record_to_pb),
    }
}
