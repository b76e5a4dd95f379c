//! VM snapshots as qx-node records them: `snapshots.json` in the VM's directory (written atomically), one record
//! per snapshot with its parent (the snapshot the VM was at when it was taken), kind, time and whether the guest's
//! file systems were frozen for it. The snapshots themselves are qcow2 internal snapshots named like the record, on
//! every writable disk of the VM (`qemu-img snapshot -l` lists them).
//!
//! A record is written `creating` (or `deleting`) before QEMU or qemu-img is asked and `ready` (or removed) after,
//! so a daemon that dies in between leaves a record that says the operation did not finish; deleting it again
//! removes what is left.

use std::fs;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::persist::write_atomic;

/// What a snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// The disks only; reverting needs the VM stopped, and it boots from the snapshot's disks.
    DiskOnly,
    /// The disks and the running guest's memory and device state (QEMU's `snapshot-save`); reverting a running
    /// VM puts the guest back where it was.
    Memory,
}

impl SnapshotKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::DiskOnly => "disk-only",
            SnapshotKind::Memory => "memory",
        }
    }
}

/// Whether the operation on a snapshot finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    Ready,
    /// Being taken, or its taking was cut short (delete it to clean up).
    Creating,
    /// Being deleted, or its deleting was cut short (delete it again).
    Deleting,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    pub name: String,
    pub kind: SnapshotKind,
    /// The snapshot the VM was at when this one was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub created_at_unix_ms: i64,
    /// The guest agent froze the guest's file systems around a disk-only snapshot.
    pub quiesced: bool,
    pub state: SnapshotState,
}

/// A VM's snapshots and the one it is at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotTree {
    /// The snapshot the VM's disks descend from: the last one taken or reverted to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
}

impl SnapshotTree {
    /// Reads `path`; a missing file is an empty tree.
    pub fn load(path: &Path) -> io::Result<Self> {
        match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, path: &Path) -> io::Result<()> {
        write_atomic(path, &serde_json::to_vec_pretty(self).map_err(io::Error::other)?)
    }

    pub fn get(&self, name: &str) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    pub fn set_state(&mut self, name: &str, state: SnapshotState) {
        if let Some(snapshot) = self.snapshots.iter_mut().find(|s| s.name == name) {
            snapshot.state = state;
        }
    }

    /// Removes `name`; its children take its parent, and a VM at it is at its parent.
    pub fn remove(&mut self, name: &str) {
        let parent = self.get(name).and_then(|s| s.parent.clone());
        self.snapshots.retain(|s| s.name != name);
        for child in self.snapshots.iter_mut().filter(|s| s.parent.as_deref() == Some(name)) {
            child.parent = parent.clone();
        }
        if self.current.as_deref() == Some(name) {
            self.current = parent;
        }
    }
}

/// Checks a snapshot name: it names a qcow2 internal snapshot and a record.
pub fn check_name(name: &str) -> Result<(), qx_common::ValidationErrors> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(qx_common::ValidationErrors::one(
            "snapshot",
            name,
            "must be 1-64 letters, digits, '-', '_' or '.', not starting with '-' or '.'",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(name: &str, parent: Option<&str>) -> Snapshot {
        Snapshot {
            name: name.into(),
            kind: SnapshotKind::DiskOnly,
            parent: parent.map(Into::into),
            created_at_unix_ms: 1,
            quiesced: false,
            state: SnapshotState::Ready,
        }
    }

    #[test]
    fn removing_a_snapshot_in_the_middle_hands_its_children_to_its_parent() {
        let mut tree = SnapshotTree {
            current: Some("b".into()),
            snapshots: vec![snapshot("a", None), snapshot("b", Some("a")), snapshot("c", Some("b"))],
        };
        tree.remove("b");
        assert_eq!(tree.current.as_deref(), Some("a"));
        assert_eq!(tree.get("c").unwrap().parent.as_deref(), Some("a"));
        tree.remove("a");
        assert_eq!((tree.current.as_deref(), tree.get("c").unwrap().parent.as_deref()), (None, None));
    }

    #[test]
    fn the_tree_round_trips_through_its_file_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots.json");
        assert_eq!(SnapshotTree::load(&path).unwrap(), SnapshotTree::default());
        let tree = SnapshotTree { current: Some("a".into()), snapshots: vec![snapshot("a", None)] };
        tree.save(&path).unwrap();
        assert_eq!(SnapshotTree::load(&path).unwrap(), tree);
    }

    #[test]
    fn names_are_checked() {
        for good in ["s1", "before-upgrade", "v1.2_final"] {
            check_name(good).unwrap();
        }
        for bad in ["", "-x", ".x", "a b", "a/b", &"x".repeat(65)] {
            let err = check_name(bad).unwrap_err().to_string();
            assert!(err.contains("snapshot"), "{err}");
        }
    }
}
