//! Host paths under one configurable root, so tests can fake `/sys`, `/dev` and `/proc` in a temp dir.
//!
//! The same type as `qx_vmm::host::HostRoot`; both become `qx_common::HostRoot` when the common crate lands.

use std::path::{Path, PathBuf};

/// The directory that stands for `/` when this crate looks at the host. `/` in production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRoot(PathBuf);

impl Default for HostRoot {
    fn default() -> Self {
        Self(PathBuf::from("/"))
    }
}

impl HostRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    /// `absolute` (e.g. `/sys/bus/pci/devices`) under this root.
    pub fn path(&self, absolute: impl AsRef<Path>) -> PathBuf {
        let relative = absolute.as_ref().strip_prefix("/").unwrap_or(absolute.as_ref());
        self.0.join(relative)
    }

    /// Whether this is the real host (`/`), where device files and ioctls are real too.
    pub fn is_real(&self) -> bool {
        self.0 == Path::new("/")
    }
}
