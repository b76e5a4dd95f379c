//! Host paths the API may name. A VM's disks, kernel and initrd, an image import's source and a system update's
//! image are files qx-node (root) hands to QEMU or reads itself, so a caller who could name any path could read or
//! overwrite any file of the host (`/etc/shadow` as an import, `/dev/sda` as a disk). Every such path must lie
//! under one of the node's allowed prefixes: the pools (`<data_dir>/pools`, the volumes and the image library)
//! and what `allowed_paths` in node.yaml adds.
//!
//! Paths are compared as the kernel resolves them: symlinks followed and `..` applied ([`std::fs::canonicalize`]),
//! so `/var/lib/quantix/pools/../certificates/node.key` or a symlink in a pool that points at `/etc` is refused.
//! A path that does not resolve (it does not exist) is judged by its lexical form, `..` applied, and when that lies
//! under a prefix the caller hears what the later checks say ("does not exist"). Outside every prefix the answer
//! is the same whether or not the file exists and wherever it leads, so a refusal tells a caller nothing of what
//! the host holds there.
//!
//! The check is made when a path enters (CreateVm, UpdateVm, AttachDisk, ImportImage, UpdateHost, an incoming
//! migration); QEMU opens the path later, so a symlink an administrator swaps in between is not caught here.

use std::path::{Component, Path, PathBuf};

use qx_vmm::spec::{HostFiles, RealFiles};

/// The prefixes, as configured (resolved at each check, so a prefix created after start, such as the pools
/// directory on first use, counts from then on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPaths {
    prefixes: Vec<PathBuf>,
}

impl AllowedPaths {
    /// `prefixes` must be absolute (the config's `validate` says so of `allowed_paths`).
    pub fn new(prefixes: Vec<PathBuf>) -> Self {
        Self { prefixes }
    }

    /// The node's: its pools, then `allowed_paths`.
    pub fn of(config: &crate::config::NodeConfig) -> Self {
        let mut prefixes = vec![config.data_dir.join("pools")];
        prefixes.extend(config.allowed_paths.iter().cloned());
        Self::new(prefixes)
    }

    pub fn prefixes(&self) -> &[PathBuf] {
        &self.prefixes
    }

    /// `Ok` when `path` resolves under a prefix; else the problem, for a [`qx_common::FieldError`]. Blocks (it
    /// reads the filesystem): call it off the runtime threads.
    pub fn check(&self, path: &Path) -> Result<(), String> {
        if !path.is_absolute() {
            return Err("is not an absolute path".to_owned());
        }
        let prefixes: Vec<PathBuf> =
            self.prefixes.iter().map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| lexical(p))).collect();
        let under = |resolved: &Path| prefixes.iter().any(|prefix| resolved.starts_with(prefix));
        let lexical = lexical(path);
        match std::fs::canonicalize(path) {
            Ok(real) if under(&real) => Ok(()),
            Ok(_) if under(&lexical) => Err(format!("leads out through a symlink: it {}", self.outside())),
            Ok(_) => Err(self.outside()),
            // Nothing there: the later checks say so ("does not exist"), which tells the caller nothing it may not
            // know, since the path lies under a prefix.
            Err(_) if under(&lexical) && std::fs::symlink_metadata(path).is_err() => Ok(()),
            Err(_) if under(&lexical) => Err("is a symlink that leads nowhere".to_owned()),
            Err(_) => Err(self.outside()),
        }
    }

    fn outside(&self) -> String {
        let list: Vec<String> = self.prefixes.iter().map(|p| p.display().to_string()).collect();
        format!("is outside the allowed host paths ({}; allowed_paths in node.yaml adds more)", list.join(", "))
    }
}

/// Host files for `VmSpec::validate`: confined to the allowed paths, then checked as they are.
impl HostFiles for AllowedPaths {
    fn check_image(&self, path: &Path) -> Result<(), String> {
        self.check(path)?;
        RealFiles.check_image(path)
    }
}

/// `path` with `.` dropped and each `..` taking away the component before it, without touching the filesystem.
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (tempfile::TempDir, AllowedPaths) {
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        std::fs::create_dir_all(allowed.join("sub")).unwrap();
        std::fs::write(allowed.join("sub/disk.raw"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), allowed.join("escape")).unwrap();
        std::os::unix::fs::symlink(allowed.join("sub/disk.raw"), dir.path().join("inward")).unwrap();
        (dir, AllowedPaths::new(vec![allowed, "/no/such/prefix".into()]))
    }

    #[test]
    fn paths_under_a_prefix_pass_and_others_are_refused_naming_the_prefixes() {
        let (dir, paths) = fixture();
        let root = dir.path();
        paths.check(&root.join("allowed/sub/disk.raw")).unwrap();
        paths.check(&root.join("allowed/./sub/../sub/disk.raw")).unwrap();
        // A link from outside to a file inside: where the file really is counts.
        paths.check(&root.join("inward")).unwrap();
        let problem = paths.check(&root.join("secret")).unwrap_err();
        let shown = format!("{}, /no/such/prefix", root.join("allowed").display());
        assert!(problem.starts_with("is outside the allowed host paths ("), "{problem}");
        assert!(problem.contains(&shown), "{problem}");
        assert_eq!(paths.check(Path::new("/etc/passwd")).unwrap_err(), problem);
        assert_eq!(paths.check(Path::new("relative/disk.raw")).unwrap_err(), "is not an absolute path");
    }

    #[test]
    fn dot_dot_and_symlink_escapes_are_refused() {
        let (dir, paths) = fixture();
        let root = dir.path();
        let outside = paths.check(Path::new("/etc/passwd")).unwrap_err();
        assert_eq!(paths.check(&root.join("allowed/../secret")).unwrap_err(), outside);
        assert_eq!(paths.check(&root.join("allowed/sub/../../secret")).unwrap_err(), outside);
        let problem = paths.check(&root.join("allowed/escape")).unwrap_err();
        assert_eq!(problem, format!("leads out through a symlink: it {outside}"));
        std::os::unix::fs::symlink("/no/such/target", root.join("allowed/dangling")).unwrap();
        assert_eq!(paths.check(&root.join("allowed/dangling")).unwrap_err(), "is a symlink that leads nowhere");
    }

    #[test]
    fn missing_files_say_nothing_about_the_host_outside_the_prefixes() {
        let (dir, paths) = fixture();
        let root = dir.path();
        // Under a prefix: left to the existence check, which names it.
        paths.check(&root.join("allowed/sub/missing.raw")).unwrap();
        assert_eq!(paths.check_image(&root.join("allowed/sub/missing.raw")).unwrap_err(), "does not exist");
        // Outside: the same answer as for a file that exists.
        let existing = paths.check(&root.join("secret")).unwrap_err();
        assert_eq!(paths.check(&root.join("missing")).unwrap_err(), existing);
        assert_eq!(paths.check(&root.join("allowed/../../missing")).unwrap_err(), existing);
        // A prefix that does not exist yet still counts, lexically.
        paths.check(Path::new("/no/such/prefix/x.raw")).unwrap();
        assert!(paths.check(Path::new("/no/such/prefix/../../etc/passwd")).is_err());
    }
}
