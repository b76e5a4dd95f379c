//! The seam between VM disks that name storage pool volumes and the pools: the daemon implements
//! [`VolumeBackend`] over the `storage` crate; this crate only asks where a volume lives when a VM starts.

use std::path::PathBuf;

use crate::network::BoxFuture;
use crate::spec::DiskFormat;

/// Resolves `pool/volume` names.
pub trait VolumeBackend: Send + Sync {
    /// The file and format of `volume` (`pool/volume`), or why it cannot be used (one sentence, e.g. "does not
    /// exist").
    fn resolve<'a>(&'a self, volume: &'a str) -> BoxFuture<'a, Result<(PathBuf, DiskFormat), String>>;
}
