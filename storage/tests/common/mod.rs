//! Helpers the qx-storage integration tests share.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Makes sure `tool` is on PATH (or in /sbin), running tests/install-tools.sh once when it is not.
pub fn require_tool(tool: &str) -> PathBuf {
    static INSTALL: Once = Once::new();
    if let Some(p) = find_tool(tool) {
        return p;
    }
    INSTALL.call_once(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/install-tools.sh");
        let status = Command::new("bash").arg(&script).status().expect("run install-tools.sh");
        assert!(status.success(), "{} failed: {status}", script.display());
    });
    find_tool(tool).unwrap_or_else(|| panic!("{tool} is missing; run storage/tests/install-tools.sh as root"))
}

fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/sbin".into(), "/usr/sbin".into()]).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Runs a command, panicking with its output when it fails; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A file of `size` bytes whose `[start, end)` ranges hold pseudo-random data (a random 1 MiB pattern, each
/// 4 KiB block stamped with its offset and the seed) and the rest is holes.
pub fn sparse_file(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let f = OpenOptions::new().write(true).create_new(true).open(path).unwrap();
    f.set_len(size).unwrap();
    let mut state = seed | 1;
    let mut pattern = vec![0u8; 1 << 20];
    for w in pattern.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        w.copy_from_slice(&state.to_le_bytes());
    }
    for &(start, end) in data {
        let mut off = start;
        while off < end {
            let len = (end - off).min(pattern.len() as u64) as usize;
            let mut buf = pattern[..len].to_vec();
            for (i, block) in buf.chunks_mut(4096).enumerate() {
                let stamp = (off + i as u64 * 4096) ^ seed.rotate_left(32);
                let n = block.len().min(8);
                block[..n].copy_from_slice(&stamp.to_le_bytes()[..n]);
            }
            f.write_all_at(&buf, off).unwrap();
            off += len as u64;
        }
    }
    f.sync_all().unwrap();
}

/// SHA-256 of a file by coreutils' sha256sum (fast even when the tests are built without optimisation).
pub fn sha256_file(path: &Path) -> [u8; 32] {
    let out = run(Command::new("sha256sum").arg("-b").arg(path));
    let hex = &out[..64];
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    d
}

/// Bytes allocated on disk.
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Names of the entries of `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A tmpfs of `size` bytes mounted on a fresh directory; unmounted on drop. None when mounting is not allowed
/// (not root).
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Makes a directory refuse new entries, even for root (`chattr +i`), until dropped. Falls back to mode 0500 for
/// non-root users, for whom that is enough.
pub struct Immutable(PathBuf);

impl Immutable {
    pub fn set(dir: &Path) -> Self {
        if is_root() {
            require_tool("chattr");
            run(Command::new("chattr").arg("+i").arg(dir));
        } else {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o500)).unwrap();
        }
        Self(dir.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        if is_root() {
            let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
        } else {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(&self.0, fs::Permissions::from_mode(0o755));
        }
    }
}

/// An XFS filesystem (which shares blocks: reflink) in a sparse file, loop-mounted on a fresh directory; unmounted
/// on drop. Err says why there is none (not root, no mkfs.xfs, no loop device), for the caller's skip message.
pub struct Xfs {
    pub mnt: tempfile::TempDir,
    _image: tempfile::TempDir,
}

impl Xfs {
    pub fn mount() -> Result<Self, String> {
        if !is_root() {
            return Err("mounting a loop device needs root".to_owned());
        }
        let mkfs = find_tool("mkfs.xfs").or_else(|| {
            let _ =
                Command::new("bash").arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/install-tools.sh")).status();
            find_tool("mkfs.xfs")
        });
        let Some(mkfs) = mkfs else { return Err("mkfs.xfs is missing (xfsprogs)".to_owned()) };
        let image = tempfile::tempdir().unwrap();
        let file = image.path().join("xfs.img");
        // 512 MiB of virtual size, a few MiB allocated: XFS wants at least 300 MiB.
        OpenOptions::new().write(true).create_new(true).open(&file).unwrap().set_len(512 << 20).unwrap();
        let out = Command::new(mkfs).args(["-q", "-m", "reflink=1"]).arg(&file).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("mkfs.xfs failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let mnt = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(mnt.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "loop mount failed (no loop devices here?): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { mnt, _image: image })
    }

    pub fn path(&self) -> &Path {
        self.mnt.path()
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // Detaches the loop device too (mount -o loop sets autoclear).
        let _ = Command::new("umount").arg(self.mnt.path()).status();
    }
}

/// Bytes used on the filesystem holding `path`.
pub fn fs_used(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    (st.f_blocks - st.f_bfree) * st.f_frsize
}
