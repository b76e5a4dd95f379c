//! `qxctl vm snapshot`: VM snapshots (SnapshotService).

use clap::Subcommand;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::snapshot_service_client::SnapshotServiceClient;
use serde_json::json;
use tonic::transport::Channel;

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot every writable disk (qcow2); --memory also saves the running guest's state.
    Create {
        name: String,
        snapshot: String,
        #[arg(long)]
        memory: bool,
    },
    /// The VM's snapshots with their parents; `*` marks the one the VM is at.
    List { name: String },
    /// Back to a snapshot: a memory snapshot on the running VM, a disk-only one on the stopped VM.
    Revert { name: String, snapshot: String },
    /// Delete a snapshot; later ones keep their data.
    Delete { name: String, snapshot: String },
}

fn kind_name(kind: i32) -> &'static str {
    match pb::SnapshotKind::try_from(kind) {
        Ok(pb::SnapshotKind::Memory) => "memory",
        _ => "disk-only",
    }
}

fn state_name(state: i32) -> &'static str {
    match pb::SnapshotState::try_from(state) {
        Ok(pb::SnapshotState::Creating) => "creating",
        Ok(pb::SnapshotState::Deleting) => "deleting",
        _ => "ready",
    }
}

fn snapshot_json(s: &pb::VmSnapshot) -> serde_json::Value {
    json!({
        "name": s.name, "kind": kind_name(s.kind), "parent": s.parent, "created_at_unix_ms": s.created_at_unix_ms,
        "quiesced": s.quiesced, "state": state_name(s.state),
    })
}

pub async fn run(channel: Channel, command: SnapshotCommand, json: bool) -> anyhow::Result<()> {
    let mut client = SnapshotServiceClient::new(channel);
    match command {
        SnapshotCommand::Create { name, snapshot, memory } => {
            let kind = if memory { pb::SnapshotKind::Memory } else { pb::SnapshotKind::DiskOnly };
            let request = pb::CreateSnapshotRequest { vm: name, name: snapshot, kind: kind as i32 };
            let taken = client.create_snapshot(request).await?.into_inner();
            if json {
                println!("{}", snapshot_json(&taken));
            } else {
                let quiesced = if taken.quiesced { "quiesced" } else { "not quiesced" };
                println!("snapshot {} taken ({}, {quiesced})", taken.name, kind_name(taken.kind));
            }
        }
        SnapshotCommand::List { name } => {
            let list = client.list_snapshots(pb::ListSnapshotsRequest { vm: name }).await?.into_inner();
            if json {
                let snapshots: Vec<_> = list.snapshots.iter().map(snapshot_json).collect();
                println!("{}", json!({ "current": list.current, "snapshots": snapshots }));
                return Ok(());
            }
            println!(
                "  {:<20} {:<10} {:<20} {:<9} {:<9} CREATED (unix ms)",
                "NAME", "KIND", "PARENT", "QUIESCED", "STATE"
            );
            for s in &list.snapshots {
                let mark = if s.name == list.current { "*" } else { " " };
                let quiesced = if s.quiesced { "yes" } else { "no" };
                println!(
                    "{mark} {:<20} {:<10} {:<20} {quiesced:<9} {:<9} {}",
                    s.name,
                    kind_name(s.kind),
                    s.parent,
                    state_name(s.state),
                    s.created_at_unix_ms
                );
            }
        }
        SnapshotCommand::Revert { name, snapshot } => {
            client.revert_snapshot(pb::SnapshotRef { vm: name, name: snapshot.clone() }).await?;
            if json {
                println!("{}", json!({ "reverted_to": snapshot }));
            } else {
                println!("reverted to {snapshot}");
            }
        }
        SnapshotCommand::Delete { name, snapshot } => {
            client.delete_snapshot(pb::SnapshotRef { vm: name, name: snapshot.clone() }).await?;
            if json {
                println!("{}", json!({ "deleted": snapshot }));
            } else {
                println!("deleted {snapshot}");
            }
        }
    }
    Ok(())
}
