//! `qxctl system`: the host's A/B systems and updates (UpdateService).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use futures::StreamExt;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::update_service_client::UpdateServiceClient;
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use crate::progress::ProgressBar;

/// Bytes per streamed message, well under gRPC's 4 MiB default.
const CHUNK: usize = 1 << 20;

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// The active and fallback systems, a pending update, the last update's outcome.
    Status,
    /// Installs a system image (image/build.sh's system.qxi) on the inactive system and points the next boot at it.
    Update {
        /// The image: streamed from this machine, or a file on the node with --on-node.
        image: PathBuf,
        /// IMAGE is a path on the node; its size and SHA-256 must then be given.
        #[arg(long)]
        on_node: bool,
        /// With --on-node: the image's size in bytes.
        #[arg(long, requires = "on_node")]
        size: Option<u64>,
        /// With --on-node: the image's SHA-256.
        #[arg(long, requires = "on_node")]
        sha256: Option<String>,
        /// Hex ed25519 signature of the SHA-256 digest (needed when the node has update.public_key).
        #[arg(long, default_value = "")]
        signature: String,
        /// Reboot into the new system once it is installed.
        #[arg(long)]
        reboot: bool,
        /// Reboot even though VMs run (they stop with the host).
        #[arg(long, requires = "reboot")]
        confirm_running_vms: bool,
        /// Seconds the new system has to report healthy before the previous one boots again; 0: the node's.
        #[arg(long, default_value_t = 0)]
        health_timeout: u32,
    },
}

pub async fn run(channel: Channel, command: SystemCommand, json: bool) -> anyhow::Result<()> {
    let mut client = UpdateServiceClient::new(channel);
    match command {
        SystemCommand::Status => {
            let status = client.get_system_status(pb::GetSystemStatusRequest {}).await?.into_inner();
            print_status(&status, json);
        }
        SystemCommand::Update {
            image,
            on_node,
            size,
            sha256,
            signature,
            reboot,
            confirm_running_vms,
            health_timeout,
        } => {
            let (size, sha256) = if on_node {
                match (size, sha256) {
                    (Some(size), Some(sha256)) => (size, sha256),
                    _ => bail!("--on-node needs --size and --sha256 (qxctl cannot read the node's file)"),
                }
            } else {
                hash_file(&image).await?
            };
            let start = pb::UpdateHostStart {
                path: if on_node { image.display().to_string() } else { String::new() },
                size,
                sha256,
                signature,
                reboot,
                confirm_running_vms,
                health_timeout_seconds: health_timeout,
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(pb::UpdateHostRequest { message: Some(pb::update_host_request::Message::Start(start)) }).await?;
            let sender = (!on_node).then(|| tokio::spawn(stream_file(image, tx)));
            let mut progress = client.update_host(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
            let mut bar = ProgressBar::new("update", json);
            let mut last = None;
            while let Some(message) = progress.next().await {
                let message = message?;
                bar.update(message.bytes_done, message.bytes_total);
                if message.status.is_some() {
                    last = message.status;
                }
            }
            bar.finish();
            if let Some(sender) = sender {
                sender.await??;
            }
            let status = last.context("the node ended the update without a result")?;
            print_status(&status, json);
            if reboot && !json {
                println!("rebooting into the new system");
            }
        }
    }
    Ok(())
}

async fn hash_file(path: &PathBuf) -> anyhow::Result<(u64, String)> {
    let mut file = tokio::fs::File::open(path).await.with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()))
}

async fn stream_file(path: PathBuf, tx: tokio::sync::mpsc::Sender<pb::UpdateHostRequest>) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::open(&path).await.with_context(|| format!("cannot open {}", path.display()))?;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        buf.truncate(n);
        let chunk = pb::UpdateHostRequest { message: Some(pb::update_host_request::Message::Chunk(buf)) };
        if tx.send(chunk).await.is_err() {
            // The node ended the call; its answer says why.
            return Ok(());
        }
    }
}

/// "A (0.1.0)" or "none".
fn slot_text(slot: Option<&pb::SystemSlot>) -> String {
    slot.map_or_else(|| "none".to_owned(), |s| format!("{} ({})", s.slot.to_uppercase(), s.version))
}

fn outcome_text(outcome: i32) -> &'static str {
    match pb::UpdateOutcome::try_from(outcome) {
        Ok(pb::UpdateOutcome::Installing) => "installing",
        Ok(pb::UpdateOutcome::Pending) => "pending",
        Ok(pb::UpdateOutcome::Succeeded) => "succeeded",
        Ok(pb::UpdateOutcome::RolledBack) => "rolled back",
        Ok(pb::UpdateOutcome::Failed) => "failed",
        Ok(pb::UpdateOutcome::Cancelled) => "cancelled",
        Ok(pb::UpdateOutcome::Unspecified) | Err(_) => "unknown",
    }
}

pub fn status_lines(status: &pb::SystemStatus) -> Vec<(&'static str, String)> {
    if !status.unavailable.is_empty() {
        return vec![("system", format!("no A/B updates: {}", status.unavailable))];
    }
    let mut lines = vec![
        ("active system", slot_text(status.active.as_ref()) + if status.trial { ", on trial" } else { "" }),
        ("fallback system", slot_text(status.fallback.as_ref())),
    ];
    if !status.pending.is_empty() {
        lines.push(("next boot", format!("tries system {} once", status.pending.to_uppercase())));
    }
    if let Some(last) = &status.last_update {
        lines.push((
            "last update",
            format!(
                "{} on {}: {} ({})",
                last.version,
                last.slot.to_uppercase(),
                outcome_text(last.outcome),
                last.message
            ),
        ));
    }
    lines
}

pub fn status_json(status: &pb::SystemStatus) -> serde_json::Value {
    let slot = |s: &Option<pb::SystemSlot>| s.as_ref().map(|s| json!({"slot": s.slot, "version": s.version}));
    let last = status.last_update.as_ref().map(|l| {
        json!({"version": l.version, "slot": l.slot, "outcome": outcome_text(l.outcome), "message": l.message,
               "at_unix": l.at_unix})
    });
    json!({
        "unavailable": status.unavailable, "active": slot(&status.active), "fallback": slot(&status.fallback),
        "pending": status.pending, "trial": status.trial, "last_update": last,
    })
}

fn print_status(status: &pb::SystemStatus, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(status)).unwrap_or_default());
        return;
    }
    for (label, value) in status_lines(status) {
        println!("{label:<16} {value}");
    }
}
