//! Figures of a running VM for monitoring: its block devices' I/O counters (`query-blockstats`), asked of QEMU
//! without the VM's operation lock, so that a scrape never waits behind a long start or stop.

use std::time::Duration;

use qx_qmp::commands::{BlockDeviceStats, QueryBlockstats};

use super::{VmError, VmManager};

/// How long a scrape waits for a QEMU that is slow to answer.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// The I/O counters of one of a VM's disks since its QEMU started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStats {
    /// The disk's id in the spec (`disk0`), or QEMU's name for a backend the device tree does not know.
    pub disk: String,
    pub stats: BlockDeviceStats,
}

impl VmManager {
    /// The I/O counters of every disk of a VM whose QEMU runs; empty for a VM without one.
    pub async fn disk_stats(&self, name: &str) -> Result<Vec<DiskStats>, VmError> {
        let entry = self.entry(name)?;
        let Some(runtime) = entry.runtime() else { return Ok(Vec::new()) };
        let devices = entry.status().devices.clone();
        let blocks = runtime
            .qmp
            .execute_timeout(QueryBlockstats::default(), STATS_TIMEOUT)
            .await
            .map_err(entry.qmp_error("query-blockstats"))?;
        Ok(blocks
            .into_iter()
            .filter_map(|block| {
                // -blockdev backends have no name, only the QOM path of their device
                // (`/machine/peripheral/<device id>/virtio-backend`); an empty CD-ROM drive has neither.
                let qdev = block.qdev.as_deref().unwrap_or_default();
                let device = qdev
                    .strip_prefix("/machine/peripheral/")
                    .map_or(qdev, |rest| rest.split('/').next().unwrap_or(rest));
                let disk = devices
                    .disks
                    .iter()
                    .find(|slot| slot.device == device || block.node_name.as_deref() == Some(slot.node.as_str()))
                    .map(|slot| slot.id.clone())
                    .or_else(|| block.device.clone().filter(|name| !name.is_empty()))
                    .or_else(|| (!device.is_empty()).then(|| device.to_owned()))?;
                Some(DiskStats { disk, stats: block.stats })
            })
            .collect())
    }
}
