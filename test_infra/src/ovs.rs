//! Open vSwitch for tests and benchmarks: their own ovsdb-server (and ovs-vswitchd, userspace datapath) in a temp
//! dir, stopped by PID when dropped, and a private network namespace per test so bridges, taps and ovs-vswitchd's
//! `ovs-netdev` never collide between tests running in parallel.
//!
//! Nothing here touches /var/run/openvswitch or the system's Open vSwitch service: OVS_RUNDIR, OVS_LOGDIR and
//! OVS_DBDIR point into the temp dir, and every socket, pidfile and log lives there.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The programs the harness runs.
const PROGRAMS: [&str; 4] = ["ovsdb-server", "ovsdb-tool", "ovs-vswitchd", "ovs-vsctl"];
/// Where Debian installs the schema.
const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
/// How long a daemon gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// `program` found on `PATH` (or in the sbin directories, which a non-login `PATH` may lack).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Whether Open vSwitch is installed (its programs and schema).
pub fn ovs_installed() -> bool {
    PROGRAMS.iter().all(|p| find_program(p).is_some()) && Path::new(SCHEMA).is_file()
}

/// Whether this process may create network namespaces and devices (root; CAP_NET_ADMIN and CAP_SYS_ADMIN).
pub fn privileged() -> bool {
    rustix::process::geteuid().is_root()
}

/// Skips the calling test (returns `true`, through [`crate::skip`], which fails under `CI`) unless running as
/// root, which private network namespaces, taps and ovs-vswitchd need. `QX_REQUIRE_OVS=1` fails it outside CI too.
pub fn skip_without_root() -> bool {
    if privileged() {
        return false;
    }
    let reason = "needs root (network namespaces, taps)";
    assert!(std::env::var_os("QX_REQUIRE_OVS").is_none(), "QX_REQUIRE_OVS is set and this test {reason}");
    crate::skip(reason);
    true
}

/// Skips the calling test (returns `true`, through [`crate::skip`], which fails under `CI`) when Open vSwitch is
/// not installed or not running as root. CI installs it with `net/tests/install-ovs.sh`; `QX_REQUIRE_OVS=1` fails
/// it outside CI too.
pub fn skip_without_ovs() -> bool {
    if skip_without_root() {
        return true;
    }
    if ovs_installed() {
        return false;
    }
    let reason = "Open vSwitch is not installed (run net/tests/install-ovs.sh)";
    assert!(std::env::var_os("QX_REQUIRE_OVS").is_none(), "QX_REQUIRE_OVS is set: {reason}");
    crate::skip(reason);
    true
}

/// Moves the calling thread into a new network namespace with loopback up. Threads and processes it starts
/// afterwards (a tokio runtime's workers, ovs-vswitchd) inherit it; other tests' threads are not affected.
pub fn isolate_network() {
    // SAFETY: unshare(CLONE_NEWNET) takes no pointers; it only changes which network namespace this thread's
    // later socket and device operations use. It shares no memory state with other threads.
    let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    let status = Command::new(find_program("ip").expect("ip (iproute2) is installed"))
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip link set lo up: {status}");
}

/// Polls `condition` every 10 ms until it holds, or panics with `what` after `timeout`.
pub(crate) fn wait_for(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed (SIGKILL) and reaped by PID when dropped.
pub(crate) struct Guard {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
}

impl Guard {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // `Child::kill` signals this PID only; `wait` reaps it so no zombie is left.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// ovsdb-server (and optionally ovs-vswitchd) running in a temp dir of their own.
pub struct Ovs {
    // Fields drop in order: the daemons stop before their directory goes.
    vswitchd: Option<Guard>,
    ovsdb: Option<Guard>,
    tcp_port: Option<u16>,
    /// The named network namespace every daemon runs in (`ip netns exec`); `None`: the caller's.
    netns: Option<String>,
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
}

impl Ovs {
    /// ovsdb-server with an initialized `Open_vSwitch` database, and ovs-vswitchd.
    pub fn start() -> Self {
        let mut ovs = Self::start_db();
        ovs.start_vswitchd();
        ovs
    }

    /// ovsdb-server only (listening on a unix socket), with an initialized database.
    pub fn start_db() -> Self {
        Self::start_db_inner(false, None)
    }

    /// ovsdb-server listening on a unix socket and on a TCP port of 127.0.0.1 (see [`tcp_endpoint`]).
    ///
    /// [`tcp_endpoint`]: Self::tcp_endpoint
    pub fn start_db_with_tcp() -> Self {
        Self::start_db_inner(true, None)
    }

    /// ovsdb-server and ovs-vswitchd, both run in the named network namespace `netns` (see
    /// [`crate::ovn::Netns`]), so the bridges' devices and taps are that namespace's.
    pub fn start_in_netns(netns: &str) -> Self {
        let mut ovs = Self::start_db_inner(false, Some(netns.to_owned()));
        ovs.start_vswitchd();
        ovs
    }

    fn start_db_inner(tcp: bool, netns: Option<String>) -> Self {
        let dir = tempfile::Builder::new().prefix("qx-ovs-").tempdir().expect("temp dir");
        let mut ovs = Self { vswitchd: None, ovsdb: None, tcp_port: tcp.then(free_port), netns, dir: Some(dir) };
        let status =
            ovs.command("ovsdb-tool").arg("create").arg(ovs.db_file()).arg(SCHEMA).status().expect("run ovsdb-tool");
        assert!(status.success(), "ovsdb-tool create: {status}");
        ovs.start_ovsdb_server();
        let out = ovs.vsctl(&["--no-wait", "init"]);
        assert!(out.is_empty(), "{out}");
        ovs
    }

    /// `program` with this instance's directories in its environment, in its network namespace.
    pub fn command(&self, program: &str) -> Command {
        let path = find_program(program).unwrap_or_else(|| panic!("{program} not found"));
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new(find_program("ip").expect("ip (iproute2) is installed"));
                command.args(["netns", "exec", netns.as_str()]).arg(path);
                command
            }
            None => Command::new(path),
        };
        command
            .env("OVS_RUNDIR", self.dir())
            .env("OVS_LOGDIR", self.dir())
            .env("OVS_DBDIR", self.dir())
            .env("OVS_SYSCONFDIR", self.dir())
            .stdin(Stdio::null());
        command
    }

    fn spawn(&self, name: &'static str, mut command: Command) -> Guard {
        let log = std::fs::File::create(self.dir().join(format!("{name}.stderr"))).expect("stderr file");
        let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Guard { name, child }
    }

    fn start_ovsdb_server(&mut self) {
        let d = self.dir();
        let mut command = self.command("ovsdb-server");
        command
            .arg(self.db_file())
            .arg(format!("--remote=punix:{}", self.db_socket().display()))
            .arg(format!("--pidfile={}", d.join("ovsdb-server.pid").display()))
            .arg(format!("--unixctl={}", d.join("ovsdb-server.ctl").display()))
            .arg(format!("--log-file={}", d.join("ovsdb-server.log").display()));
        if let Some(port) = self.tcp_port {
            command.arg(format!("--remote=ptcp:{port}:127.0.0.1"));
        }
        let _ = std::fs::remove_file(self.db_socket());
        let mut guard = self.spawn("ovsdb-server", command);
        let socket = self.db_socket();
        wait_for(START_TIMEOUT, "ovsdb-server's socket", || {
            if let Ok(Some(status)) = guard.child.try_wait() {
                panic!("ovsdb-server exited: {status}; see {}", self.dir().display());
            }
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        if let Some(port) = self.tcp_port {
            wait_for(START_TIMEOUT, "ovsdb-server's TCP port", || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
        self.ovsdb = Some(guard);
    }

    /// Starts ovs-vswitchd and waits until it has applied the configuration.
    pub fn start_vswitchd(&mut self) {
        let d = self.dir();
        let mut command = self.command("ovs-vswitchd");
        command
            .arg(format!("unix:{}", self.db_socket().display()))
            .arg(format!("--pidfile={}", d.join("ovs-vswitchd.pid").display()))
            .arg(format!("--unixctl={}", d.join("ovs-vswitchd.ctl").display()))
            .arg(format!("--log-file={}", d.join("ovs-vswitchd.log").display()));
        self.vswitchd = Some(self.spawn("ovs-vswitchd", command));
        // Without --no-wait, ovs-vsctl returns once ovs-vswitchd has caught up with the change.
        let out = self.vsctl(&["--timeout=20", "set", "Open_vSwitch", ".", "external_ids:qx-test=1"]);
        assert!(out.is_empty(), "{out}");
    }

    /// The temp dir (logs are there).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("not dropped").path()
    }

    /// The database file.
    pub fn db_file(&self) -> PathBuf {
        self.dir().join("conf.db")
    }

    /// ovsdb-server's unix socket.
    pub fn db_socket(&self) -> PathBuf {
        self.dir().join("db.sock")
    }

    /// The TCP port of a server started with [`start_db_with_tcp`](Self::start_db_with_tcp), on 127.0.0.1.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port.expect("started with TCP")
    }

    /// ovsdb-server's PID.
    pub fn ovsdb_pid(&self) -> u32 {
        self.ovsdb.as_ref().expect("ovsdb-server running").pid()
    }

    /// Kills ovsdb-server (SIGKILL, by PID) and waits until it is gone.
    pub fn kill_db(&mut self) {
        drop(self.ovsdb.take());
    }

    /// Starts ovsdb-server again on the same database file (after [`kill_db`](Self::kill_db)).
    pub fn start_db_again(&mut self) {
        assert!(self.ovsdb.is_none(), "ovsdb-server is still running");
        self.start_ovsdb_server();
    }

    /// Runs `ovsdb-tool transact` on the database file while ovsdb-server is down.
    pub fn offline_transact(&self, ops: &serde_json::Value) -> String {
        assert!(self.ovsdb.is_none(), "ovsdb-server is running");
        let out = self
            .command("ovsdb-tool")
            .arg("transact")
            .arg(self.db_file())
            .arg(ops.to_string())
            .output()
            .expect("run ovsdb-tool");
        assert!(out.status.success(), "ovsdb-tool transact: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// An `ovs-vsctl` command for this database.
    pub fn vsctl_command(&self) -> Command {
        let mut command = self.command("ovs-vsctl");
        command.arg(format!("--db=unix:{}", self.db_socket().display()));
        command
    }

    /// Runs `ovs-vsctl args...` and returns its trimmed stdout; panics if it fails.
    pub fn vsctl(&self, args: &[&str]) -> String {
        let out = self.vsctl_command().args(args).output().expect("run ovs-vsctl");
        assert!(
            out.status.success(),
            "ovs-vsctl {args:?}: {}; logs in {}",
            String::from_utf8_lossy(&out.stderr),
            self.dir().display()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        for guard in [self.vswitchd.take(), self.ovsdb.take()].into_iter().flatten() {
            let (name, pid) = (guard.name, guard.pid());
            drop(guard);
            if std::thread::panicking() {
                eprintln!("stopped {name} (pid {pid})");
            }
        }
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("Open vSwitch logs kept in {}", dir.keep().display());
            }
        }
    }
}

/// A TCP port free on 127.0.0.1 of this (private) network namespace.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Runs `ip args...` (in the calling thread's network namespace) and returns its stdout; panics if it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new(find_program("ip").expect("ip is installed")).args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
