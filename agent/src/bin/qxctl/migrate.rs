//! `qxctl vm migrate NAME --to grpcs://HOST:PORT`: a live migration with a progress bar (phase, memory sent,
//! remaining, dirty rate), then its result; Ctrl-C (the stream dropped) cancels it while in precopy, as does
//! `qxctl vm migrate-cancel NAME` from elsewhere.

use anyhow::bail;
use clap::{Args, ValueEnum};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::migration_service_client::MigrationServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::progress::ProgressBar;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Postcopy {
    /// Switch to postcopy when precopy stops converging.
    Auto,
    /// Precopy only.
    Off,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    name: String,
    /// The target node's TCP listener: grpcs://HOST:PORT.
    #[arg(long)]
    to: String,
    /// Bandwidth limit in MiB/s (default: unlimited).
    #[arg(long)]
    bandwidth: Option<u64>,
    /// The downtime to aim at, in ms (default 100; doubled while the migration does not progress).
    #[arg(long)]
    downtime: Option<u64>,
    #[arg(long, value_enum, default_value = "auto")]
    postcopy: Postcopy,
    /// multifd channels (needs --postcopy off).
    #[arg(long)]
    multifd: Option<u32>,
}

pub async fn migrate(channel: Channel, args: MigrateArgs, json: bool) -> anyhow::Result<()> {
    let request = pb::MigrateVmRequest {
        name: args.name.clone(),
        target_url: args.to.clone(),
        max_bandwidth_bytes: args.bandwidth.map_or(0, |mib| mib.saturating_mul(1 << 20)),
        downtime_limit_ms: args.downtime.unwrap_or(0),
        postcopy: match args.postcopy {
            Postcopy::Auto => pb::PostcopyMode::Auto,
            Postcopy::Off => pb::PostcopyMode::Off,
        } as i32,
        multifd_channels: args.multifd.unwrap_or(0),
        xbzrle_cache_bytes: 0,
    };
    let mut stream = MigrationServiceClient::new(channel).migrate_vm(request).await?.into_inner();
    let mut bar = ProgressBar::new(format!("migrating {}", args.name), json);
    let result = loop {
        match stream.message().await?.and_then(|event| event.event) {
            Some(pb::migration_event::Event::Progress(p)) => {
                bar.set_label(label(&args.name, &p));
                bar.update(p.total_bytes.saturating_sub(p.remaining_bytes), p.total_bytes);
            }
            Some(pb::migration_event::Event::Result(result)) => break result,
            None => bail!("qx-node ended the migration without a result"),
        }
    };
    bar.finish();
    if json {
        let value = json!({
            "vm": args.name, "target": args.to, "target_node": result.target_node,
            "downtime_ms": result.downtime_ms, "total_time_ms": result.total_time_ms,
            "transferred_bytes": result.transferred_bytes, "postcopy": result.postcopy,
            "downtime_limit_ms": result.downtime_limit_ms, "encrypted": result.encrypted,
        });
        println!("{value}");
    } else {
        println!("{}", summary(&args.name, &result));
    }
    Ok(())
}

pub async fn cancel(channel: Channel, name: String) -> anyhow::Result<()> {
    MigrationServiceClient::new(channel).cancel_migration(pb::CancelMigrationRequest { name: name.clone() }).await?;
    println!("cancelling the migration of {name}; it keeps running on this node");
    Ok(())
}

/// `migrating web: precopy, pass 2, 12 MiB/s dirtied`
fn label(name: &str, p: &pb::MigrationProgress) -> String {
    let mut text = format!("migrating {name}: {}", p.phase);
    if p.iteration > 1 {
        text.push_str(&format!(", pass {}", p.iteration));
    }
    if p.dirty_rate_bytes > 0 {
        text.push_str(&format!(", {} MiB/s dirtied", p.dirty_rate_bytes >> 20));
    }
    text
}

fn summary(name: &str, r: &pb::MigrationResult) -> String {
    let via = if r.postcopy { " through postcopy" } else { "" };
    let stream = if r.encrypted { "encrypted" } else { "not encrypted" };
    format!(
        "{name} runs on {}: {} ms in all, {} ms downtime (limit {} ms), {} MiB sent{via}; the stream was {stream}",
        r.target_node,
        r.total_time_ms,
        r.downtime_ms,
        r.downtime_limit_ms,
        r.transferred_bytes >> 20
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_names_the_phase_and_the_summary_says_where_the_vm_runs() {
        let p = pb::MigrationProgress {
            phase: "precopy".into(),
            iteration: 3,
            dirty_rate_bytes: 5 << 20,
            ..Default::default()
        };
        assert_eq!(label("web", &p), "migrating web: precopy, pass 3, 5 MiB/s dirtied");
        let r = pb::MigrationResult {
            target_node: "node2".into(),
            total_time_ms: 3300,
            downtime_ms: 104,
            downtime_limit_ms: 100,
            transferred_bytes: 512 << 20,
            ..Default::default()
        };
        assert_eq!(
            summary("web", &r),
            "web runs on node2: 3300 ms in all, 104 ms downtime (limit 100 ms), 512 MiB sent; the stream was not encrypted"
        );
    }
}
