//! Host paths under one configurable root, so tests can fake `/sys`, `/dev` and `/proc` in a temp dir.

use std::path::{Path, PathBuf};

/// The directory that stands for `/` when the daemon looks at the host. `/` in production.
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

    /// `absolute` (e.g. `/sys/module/kvm`) under this root.
    pub fn path(&self, absolute: impl AsRef<Path>) -> PathBuf {
        let relative = absolute.as_ref().strip_prefix("/").unwrap_or(absolute.as_ref());
        self.0.join(relative)
    }
}
