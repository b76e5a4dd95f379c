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
    /// A root at `root` (a temp dir in tests).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self(root.into())
    }

    /// `absolute` (e.g. `/sys/module/kvm`) under this root.
    pub fn path(&self, absolute: impl AsRef<Path>) -> PathBuf {
        let relative = absolute.as_ref().strip_prefix("/").unwrap_or(absolute.as_ref());
        self.0.join(relative)
    }

    /// Whether this is the real host (`/`), where device files and ioctls are real too.
    pub fn is_real(&self) -> bool {
        self.0 == Path::new("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_land_under_the_root() {
        let root = HostRoot::new("/tmp/fake");
        assert_eq!(root.path("/sys/module/kvm"), Path::new("/tmp/fake/sys/module/kvm"));
        assert_eq!(root.path("dev/kvm"), Path::new("/tmp/fake/dev/kvm"));
        assert!(!root.is_real());
        assert!(HostRoot::default().is_real());
        assert_eq!(HostRoot::default().path("/dev/kvm"), Path::new("/dev/kvm"));
    }
}
