//! What Quantix integration tests share: the test guest and the Debian guest (each built once from Debian's packages
//! and cached), a `wait_until` helper, and guards that stop what a test started, by PID, even when the test fails.
//!
//! Not for production code: nothing outside `[dev-dependencies]` may use it.
//!
//! ```no_run
//! let guest = qx_test_infra::test_guest();
//! println!("boot {} with {}", guest.kernel.display(), guest.cmdline);
//! ```

pub mod ovn;
pub mod ovs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What the test guest prints on its serial console once its shell is up. Wait for the whole line
/// (`READY_LINE`) before typing, or the tty may echo input into the middle of it.
pub const READY_MARKER: &str = "QX-GUEST-READY";
pub const READY_LINE: &str = "QX-GUEST-READY\r\n";

/// The test guest: a Debian kernel and a busybox initramfs with a shell on ttyS0 that powers off on the ACPI
/// power button.
#[derive(Debug, Clone)]
pub struct TestGuest {
    /// The uncompressed kernel (`vmlinux`): QEMU boots it through its PVH entry, skipping ~3 s of in-guest
    /// decompression under TCG.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The recommended kernel command line (serial console on ttyS0, fast boot under TCG).
    pub cmdline: String,
}

impl TestGuest {
    /// A VM spec (YAML) that boots this guest, with `extra` appended (more YAML lines).
    pub fn spec_yaml(&self, name: &str, extra: &str) -> String {
        format!(
            "name: {name}\nmemory_mib: 256\nkernel:\n  kernel: {}\n  initrd: {}\n  cmdline: \"{}\"\n{extra}",
            self.kernel.display(),
            self.initrd.display(),
            self.cmdline
        )
    }

    /// The compressed kernel with its EFI stub (`vmlinuz`): what OVMF boots (it cannot load the PVH `vmlinux`).
    pub fn bzimage(&self) -> PathBuf {
        self.kernel.with_file_name("vmlinuz")
    }

    /// Like [`TestGuest::spec_yaml`], booting [`TestGuest::bzimage`]: for VMs on UEFI.
    pub fn efi_spec_yaml(&self, name: &str, extra: &str) -> String {
        Self { kernel: self.bzimage(), ..self.clone() }.spec_yaml(name, extra)
    }
}

/// Builds the test guest the first time any test asks (a cached no-op afterwards) and returns it.
pub fn test_guest() -> &'static TestGuest {
    static GUEST: OnceLock<TestGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = run_build_script("guest/build.sh");
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .unwrap_or_else(|e| panic!("test guest at {} has no cmdline: {e}", dir.display()));
        TestGuest { kernel: dir.join("vmlinux"), initrd: dir.join("initrd.img"), cmdline: cmdline.trim().to_owned() }
    })
}

/// The Debian guest: a Debian 12 qcow2 disk (systemd, udev, cloud-init with the NoCloud datasource,
/// qemu-guest-agent, openssh-server) booted directly from its kernel and initramfs, for tests that need a real
/// distribution: cloud-init, SSH, the guest agent.
#[derive(Debug, Clone)]
pub struct DebianGuest {
    /// One ext4 filesystem labelled `qx-root`, no partition table, no bootloader. Import it; never boot it in place.
    pub disk: PathBuf,
    /// The uncompressed kernel (PVH entry) when the build could extract it, else the bzImage.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `root=LABEL=qx-root`, the serial console on ttyS0, fast boot under TCG.
    pub cmdline: String,
}

/// Builds the Debian guest the first time any test asks (minutes, needs root and Debian's package mirror; a cached
/// no-op afterwards, keyed by the build script) and returns it.
pub fn debian_guest() -> &'static DebianGuest {
    static GUEST: OnceLock<DebianGuest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let dir = run_build_script("guest/build-debian.sh");
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .unwrap_or_else(|e| panic!("Debian guest at {} has no cmdline: {e}", dir.display()));
        let vmlinux = dir.join("vmlinux");
        DebianGuest {
            disk: dir.join("disk.qcow2"),
            kernel: if vmlinux.exists() { vmlinux } else { dir.join("vmlinuz") },
            initrd: dir.join("initrd.img"),
            cmdline: cmdline.trim().to_owned(),
        }
    })
}

/// Runs one of test_infra's build scripts and returns the directory it prints.
fn run_build_script(relative: &str) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(output.status.success(), "{} failed: {}", script.display(), output.status);
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// The reason a skipped test gives when the machine lacks the hardware it needs (an IOMMU, an SR-IOV card): the
/// only reason a test may skip under CI.
pub const NO_SUCH_HARDWARE: &str = "no such hardware";

/// Skips the rest of a test, saying why on stderr. Under CI (`CI` set) only a missing piece of hardware is a reason:
/// `reason` must then start with [`NO_SUCH_HARDWARE`], or the skip fails the test, so that CI never passes a test
/// that did not run for a reason CI could have fixed (a package, a permission).
pub fn skip(reason: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    assert!(!ci || reason.starts_with(NO_SUCH_HARDWARE), "test skipped under CI: {reason}");
    eprintln!("skipped: {reason}");
}

/// Polls `condition` every 50 ms until it returns `Some`, or gives up after `timeout`.
pub fn wait_until<T>(timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether `pid` is alive (a zombie counts as gone).
pub fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// The argv of `pid`, empty when it is gone.
pub fn cmdline_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
        })
        .unwrap_or_default()
}

/// SIGKILL to `pid`, and reap it when it is our child.
pub fn kill_pid(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
    }
}

/// Every PID whose command line contains `needle` (e.g. a VM's uuid or a test's temp dir). Tests use it to find
/// the processes they caused, never to find processes by name.
pub fn pids_with_arg(needle: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| pid_alive(*pid) && cmdline_of(*pid).iter().any(|arg| arg.contains(needle)))
        .collect()
}

/// The v1 or v2 cgroup directories of `pid` under qx-node's `quantix/` parent, from `/proc/<pid>/cgroup`.
fn vm_cgroups(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next()) else { continue };
        if !path.starts_with("/quantix/") {
            continue;
        }
        let base = Path::new("/sys/fs/cgroup");
        if controllers.is_empty() {
            dirs.push(base.join(&path[1..]));
        } else {
            dirs.extend(controllers.split(',').map(|c| base.join(c).join(&path[1..])));
        }
    }
    dirs
}

/// A qx-node daemon in a temp dir of its own. Dropping it kills the daemon and every QEMU it started (found by
/// their pidfile paths, which lie inside the temp dir), so a failing test leaves nothing behind.
#[derive(Debug)]
pub struct Daemon {
    binary: PathBuf,
    log_filter: String,
    config: Option<PathBuf>,
    /// Whether the daemon may use [`test_paths`] (`--allow-path`): tests keep their disks and images in temp dirs.
    test_paths: bool,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// Where tests keep the files their VMs use: the temp dir (disks, images to import) and the guests' caches. Every
/// [`Daemon`] but a [`Daemon::start_confined`] one may name paths under them, on top of its pools.
pub fn test_paths() -> Vec<PathBuf> {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    let guest = std::env::var_os("QX_GUEST_DIR").map_or_else(|| cache.join("quantix/test-guest"), PathBuf::from);
    let debian =
        std::env::var_os("QX_DEBIAN_GUEST_DIR").map_or_else(|| cache.join("quantix/debian-guest"), PathBuf::from);
    vec![std::env::temp_dir(), guest, debian]
}

impl Daemon {
    /// Starts `binary` (qx-node) with its data dir and socket in a fresh temp dir, and waits for its socket.
    /// Logs at debug level, QMP traffic included, for post-mortems.
    pub fn start(binary: &Path) -> Self {
        Self::start_with_log(binary, "debug")
    }

    /// Like `start`, with a tracing filter of the caller's choice (benchmarks want `warn`).
    pub fn start_with_log(binary: &Path, log_filter: &str) -> Self {
        Self::start_with(binary, log_filter, None)
    }

    /// Like `start_with_log`, and with a YAML config file holding `config` when given.
    pub fn start_with(binary: &Path, log_filter: &str, config: Option<&str>) -> Self {
        Self::start_inner(binary, log_filter, config, true)
    }

    /// Like `start_with`, but the daemon may name no host path beyond its pools and its config's `allowed_paths`
    /// (no [`test_paths`]): for tests of that confinement.
    pub fn start_confined(binary: &Path, config: Option<&str>) -> Self {
        Self::start_inner(binary, "debug", config, false)
    }

    fn start_inner(binary: &Path, log_filter: &str, config: Option<&str>, test_paths: bool) -> Self {
        let dir = tempfile::Builder::new().prefix("qx-test-").tempdir().expect("temp dir");
        let config = config.map(|text| {
            let path = dir.path().join("node.yaml");
            std::fs::write(&path, text).expect("write node.yaml");
            path
        });
        let mut daemon =
            Self { binary: binary.to_owned(), log_filter: log_filter.to_owned(), config, test_paths, child: None, dir };
        daemon.restart();
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("node.sock")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("qx-node.log")
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL to the daemon only: its VMs must survive.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same data dir and socket (after `kill9`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the daemon is still running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log()).expect("daemon log");
        let mut command = Command::new(&self.binary);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        if self.test_paths {
            for path in test_paths() {
                command.arg("--allow-path").arg(path);
            }
        }
        let child = command
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.socket())
            .env("QX_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("daemon log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.binary.display()));
        self.child = Some(child);
        let socket = self.socket();
        let up =
            wait_until(Duration::from_secs(30), || std::os::unix::net::UnixStream::connect(&socket).ok().map(|_| ()));
        if up.is_none() {
            panic!("qx-node did not open {} in 30 s; log:\n{}", socket.display(), self.log_text());
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// PIDs of the QEMUs this daemon's VMs run, by their pidfiles under this temp dir.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let data_dir = self.data_dir().display().to_string();
        pids_with_arg(&data_dir)
            .into_iter()
            .filter(|pid| cmdline_of(*pid).first().is_some_and(|argv0| argv0.contains("qemu")))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        let pids = self.qemu_pids();
        // With no daemon left to notice the QEMUs go, their cgroups (quantix/<uuid>) are removed here.
        let cgroups: Vec<PathBuf> = pids.iter().flat_map(|pid| vm_cgroups(*pid)).collect();
        for pid in &pids {
            kill_pid(*pid);
        }
        if !cgroups.is_empty() {
            wait_until(Duration::from_secs(5), || pids.iter().all(|pid| !pid_alive(*pid)).then_some(()));
            for dir in cgroups {
                let _ = std::fs::remove_dir(dir);
            }
        }
        if std::thread::panicking() {
            eprintln!("--- qx-node log ({}) ---\n{}", self.log().display(), self.log_text());
        }
    }
}
