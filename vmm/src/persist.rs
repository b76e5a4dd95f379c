//! What the daemon keeps on disk for each VM, and the atomic write every such file goes through.
//!
//! Layout under the data directory: `vms/<name>/` holds `spec.json`, `devices.json` (the device tree: where each
//! disk and NIC sits, see [`crate::device_tree`]), `state.json`, and while QEMU runs its
//! `qemu.pid`, `qmp.sock`, `serial.sock`, plus the logs `qemu.log` and `console.log`.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::device_tree::{DeviceTree, Growth};
use crate::spec::VmSpec;
use crate::state::VmState;

/// Writes `data` to `path` so that readers see the old file or the new one, never a mix, even across a crash
/// (temp file in the same directory, fsync, rename over, fsync the directory): `qx_common::atomic`'s write,
/// with its error as an `io::Error` for the VM manager's `Persist` errors.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    qx_common::atomic::write_atomic(path, data).map_err(io::Error::other)
}

/// The last known state of a VM, as `state.json` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: VmState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_unix: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    #[serde(default)]
    pub reason: String,
}

impl Default for StateRecord {
    fn default() -> Self {
        Self { state: VmState::Stopped, pid: None, started_at_unix: None, accel: None, reason: String::new() }
    }
}

/// Paths of one VM's directory.
#[derive(Debug, Clone)]
pub struct VmDir(PathBuf);

impl VmDir {
    pub fn new(vms_dir: &Path, name: &str) -> Self {
        Self(vms_dir.join(name))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn spec(&self) -> PathBuf {
        self.0.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }
    pub fn devices(&self) -> PathBuf {
        self.0.join("devices.json")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.0.join("qemu.pid")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.0.join("serial.sock")
    }
    /// The host end of the guest agent's virtio-serial port (`org.qemu.guest_agent.0`).
    pub fn qga_socket(&self) -> PathBuf {
        self.0.join("qga.sock")
    }
    /// The VM's snapshot records (`snapshot::SnapshotTree`), written atomically.
    pub fn snapshots(&self) -> PathBuf {
        self.0.join("snapshots.json")
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.0.join("qemu.log")
    }
    pub fn console_log(&self) -> PathBuf {
        self.0.join("console.log")
    }

    /// The cloud-init seed, rewritten at each start from the spec.
    pub fn seed_image(&self) -> PathBuf {
        self.0.join("cloud-init-seed.img")
    }

    /// Removes what only a running QEMU needs; missing files are fine.
    pub fn remove_runtime_files(&self) {
        for path in [self.pidfile(), self.qmp_socket(), self.serial_socket(), self.qga_socket()] {
            let _ = fs::remove_file(path);
        }
    }
}

/// Reads the device tree of the VM in `dir` whose spec is `spec`, upgrading what an earlier version wrote: a spec
/// without device ids gets them (`disk{i}`, `nic{i}`), a VM without `devices.json` gets the tree that version
/// launched it with ([`DeviceTree::legacy`]), and a tree is brought in line with its spec (a crash between the
/// two writes of an update); `machine` is the versioned machine type the spec's `machine` stands for (an older
/// version wrote the alias). What changed is written back (tree first, then spec) before the VM is used.
pub fn load_devices(dir: &VmDir, spec: &mut VmSpec, machine: String) -> Result<DeviceTree, String> {
    let before = spec.clone();
    spec.machine = machine;
    spec.fill_device_ids();
    let (mut tree, mut tree_changed) = match fs::read(dir.devices()) {
        Ok(bytes) => {
            let tree: DeviceTree =
                serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", dir.devices().display()))?;
            (tree, false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => (DeviceTree::legacy(spec), true),
        Err(e) => return Err(format!("{}: {e}", dir.devices().display())),
    };
    tree_changed |= tree.reconcile(spec, Growth::Allowed).map_err(|e| e.to_string())?;
    if tree_changed {
        let json = serde_json::to_vec_pretty(&tree).map_err(|e| e.to_string())?;
        write_atomic(&dir.devices(), &json).map_err(|e| format!("{}: {e}", dir.devices().display()))?;
    }
    if *spec != before {
        let json = serde_json::to_vec_pretty(&spec).map_err(|e| e.to_string())?;
        write_atomic(&dir.spec(), &json).map_err(|e| format!("{}: {e}", dir.spec().display()))?;
    }
    Ok(tree)
}

/// The tail of a log file, at most `max` bytes, for error messages and console history.
pub fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_err() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let _ = file.take(max).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["state.json"]);
    }

    #[test]
    fn failed_atomic_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        write_atomic(&path, b"old").unwrap();
        fs::create_dir(dir.path().join("blocker")).unwrap();
        assert!(write_atomic(&dir.path().join("blocker"), b"new").is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
    }

    /// A VM directory as the version before device ids left it loads with the places that version used, and is
    /// upgraded on disk once.
    #[test]
    fn old_vm_directories_are_upgraded_in_place() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir::new(root.path(), "legacy");
        fs::create_dir(dir.path()).unwrap();
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/state-v0/spec.json");
        fs::copy(fixture, dir.spec()).unwrap();
        let mut spec: VmSpec = serde_json::from_slice(&fs::read(dir.spec()).unwrap()).unwrap();
        let tree = load_devices(&dir, &mut spec, "pc-q35-7.2".into()).unwrap();
        let ids: Vec<_> =
            spec.disks.iter().map(|d| d.id.as_deref()).chain(spec.nics.iter().map(|n| n.id.as_deref())).collect();
        assert_eq!(ids, [Some("disk0"), Some("disk1"), Some("nic0")]);
        assert_eq!((spec.machine.as_str(), spec.cpu.as_deref()), ("pc-q35-7.2", None), "machine pinned, CPU as it was");
        assert_eq!(tree, DeviceTree::legacy(&spec));
        assert_eq!(tree.disks[1].device, "virtio-disk1");
        let stored: VmSpec = serde_json::from_slice(&fs::read(dir.spec()).unwrap()).unwrap();
        assert_eq!(stored, spec, "the upgraded spec is written back");
        let stored: DeviceTree = serde_json::from_slice(&fs::read(dir.devices()).unwrap()).unwrap();
        assert_eq!(stored, tree);
        let mut again: VmSpec = serde_json::from_slice(&fs::read(dir.spec()).unwrap()).unwrap();
        assert_eq!(load_devices(&dir, &mut again, "pc-q35-7.2".into()).unwrap(), tree, "a second load changes nothing");
    }

    #[test]
    fn a_tree_ahead_of_its_spec_is_trimmed() {
        let root = tempfile::tempdir().unwrap();
        let dir = VmDir::new(root.path(), "t");
        fs::create_dir(dir.path()).unwrap();
        let mut spec = VmSpec::from_text("name: t\ndisks:\n  - {id: a, path: /a}\n  - {id: b, path: /b}\n").unwrap();
        let tree = DeviceTree::new(&spec).unwrap();
        write_atomic(&dir.devices(), &serde_json::to_vec(&tree).unwrap()).unwrap();
        spec.disks.remove(0);
        let loaded = load_devices(&dir, &mut spec, "pc-q35-7.2".into()).unwrap();
        assert_eq!(loaded.disks, tree.disks[1..]);
    }

    #[test]
    fn tail_reads_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_tail(&path, 4), b"6789");
        assert_eq!(read_tail(&path, 100), b"0123456789");
        assert!(read_tail(&dir.path().join("none"), 4).is_empty());
    }
}
