//! OVN for tests and benchmarks: a private central (NB and SB ovsdb-servers, ovn-northd) and chassis (their own
//! ovsdb-server, ovs-vswitchd on the userspace datapath and ovn-controller), each in a temp dir, optionally in a
//! named network namespace, every process stopped by PID when dropped, also when the test fails.
//!
//! Two chassis made with [`Chassis::pair`] live in two network namespaces joined by a veth pair; each has the veth
//! on a `br-phy` bridge whose internal port carries the Geneve endpoint address (userspace tunneling: ovs-vswitchd
//! routes the outer packets through the namespace's routing table and `br-phy`).
//!
//! Nothing here touches the system's OVN or Open vSwitch services: every socket, pidfile, database and log lives in
//! the temp dirs. Run `net/tests/install-ovn.sh` first.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::ovs::{find_program, ovs_installed, privileged, wait_for, Guard, Ovs};

/// Where Debian's ovn-common installs the schemas.
const NB_SCHEMA: &str = "/usr/share/ovn/ovn-nb.ovsschema";
const SB_SCHEMA: &str = "/usr/share/ovn/ovn-sb.ovsschema";
/// The programs the harness runs (besides Open vSwitch's).
const PROGRAMS: [&str; 4] = ["ovn-northd", "ovn-controller", "ovn-nbctl", "ovn-sbctl"];
/// How long a daemon gets to come up, and a chassis to register.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The underlay subnet of [`Chassis::pair`]: the first chassis is .1, the second .2.
const UNDERLAY: &str = "172.31.254";

/// Whether OVN is installed (its programs and schemas) next to Open vSwitch.
pub fn ovn_installed() -> bool {
    ovs_installed()
        && PROGRAMS.iter().all(|p| find_program(p).is_some())
        && Path::new(NB_SCHEMA).is_file()
        && Path::new(SB_SCHEMA).is_file()
}

/// Skips the calling test (returns `true`, after a line on stderr) when OVN is missing or not running as root.
/// With `QX_REQUIRE_OVS=1` (CI) it fails instead: CI installs OVN with `net/tests/install-ovn.sh`.
pub fn skip_without_ovn() -> bool {
    let reason = if !privileged() {
        "needs root (network namespaces, taps)"
    } else if !ovn_installed() {
        "OVN is not installed (run net/tests/install-ovn.sh)"
    } else {
        return false;
    };
    assert!(std::env::var_os("QX_REQUIRE_OVS").is_none(), "cannot run: {reason}");
    crate::skip(reason);
    true
}

fn run(mut command: Command, what: &str) -> String {
    let out: Output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} not found (run net/tests/install-ovn.sh)"))
}

/// A named network namespace (`ip netns add`), deleted when dropped. Stop what runs in it first.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with loopback up; `tag` goes into its unique name.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!("qx-{tag}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        run(ip_command(&["netns", "add", &name]), "ip netns add");
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` run inside the namespace (`ip netns exec NAME program`, which execs: the PID is the program's).
    pub fn command(&self, program_name: &str) -> Command {
        let mut command = Command::new(program("ip"));
        command.args(["netns", "exec", &self.name]).arg(program(program_name));
        command
    }

    /// Runs `ip args...` inside the namespace and returns its trimmed stdout; panics if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut command = self.command("ip");
        command.args(args);
        run(command, &format!("ip {args:?} in {}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip_command(&["netns", "delete", &self.name]).stderr(Stdio::null()).status();
    }
}

fn ip_command(args: &[&str]) -> Command {
    let mut command = Command::new(program("ip"));
    command.args(args);
    command
}

/// The OVN central: NB and SB ovsdb-servers (unix sockets, and TCP on 127.0.0.1 for the NB) and ovn-northd.
pub struct OvnCentral {
    // Fields drop in order: northd first, the directory last.
    northd: Option<Guard>,
    nb: Option<Guard>,
    sb: Option<Guard>,
    nb_tcp_port: u16,
    /// `None` only while dropping.
    dir: Option<tempfile::TempDir>,
}

impl OvnCentral {
    /// Creates both databases, starts their servers and ovn-northd, and waits until northd has the NB lock.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("qx-ovn-central-").tempdir().expect("temp dir");
        let mut central = Self { northd: None, nb: None, sb: None, nb_tcp_port: free_port(), dir: Some(dir) };
        for (file, schema) in [(central.nb_file(), NB_SCHEMA), (central.sb_file(), SB_SCHEMA)] {
            let mut create = central.command("ovsdb-tool");
            create.arg("create").arg(&file).arg(schema);
            run(create, "ovsdb-tool create");
        }
        central.start_nb();
        central.sb = Some(central.start_server("sb", &central.sb_file(), &central.sb_socket(), None));
        run(central.nbctl_command(&["--no-wait", "init"]), "ovn-nbctl init");
        run(central.sbctl_command(&["init"]), "ovn-sbctl init");
        let d = central.dir().to_owned();
        let mut northd = central.command("ovn-northd");
        northd
            .arg(format!("--ovnnb-db={}", central.nb_endpoint()))
            .arg(format!("--ovnsb-db=unix:{}", central.sb_socket().display()))
            .arg(format!("--pidfile={}", d.join("ovn-northd.pid").display()))
            .arg(format!("--unixctl={}", d.join("ovn-northd.ctl").display()))
            .arg(format!("--log-file={}", d.join("ovn-northd.log").display()));
        central.northd = Some(spawn(&d, "ovn-northd", northd));
        // northd is active once it has written the SB_Global options it owns.
        wait_for(START_TIMEOUT, "ovn-northd to become active", || {
            let out = central.sbctl_command(&["--bare", "get", "SB_Global", ".", "options"]).output();
            out.is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("mac_prefix"))
        });
        central
    }

    fn command(&self, name: &str) -> Command {
        let mut command = Command::new(program(name));
        let d = self.dir();
        for var in ["OVS_RUNDIR", "OVS_LOGDIR", "OVS_DBDIR", "OVS_SYSCONFDIR", "OVN_RUNDIR", "OVN_LOGDIR", "OVN_DBDIR"]
        {
            command.env(var, d);
        }
        command.stdin(Stdio::null());
        command
    }

    fn start_server(&self, name: &'static str, db: &Path, socket: &Path, tcp: Option<u16>) -> Guard {
        let d = self.dir();
        let mut command = self.command("ovsdb-server");
        command
            .arg(db)
            .arg(format!("--remote=punix:{}", socket.display()))
            .arg(format!("--pidfile={}", d.join(format!("{name}.pid")).display()))
            .arg(format!("--unixctl={}", d.join(format!("{name}.ctl")).display()))
            .arg(format!("--log-file={}", d.join(format!("{name}.log")).display()));
        if let Some(port) = tcp {
            command.arg(format!("--remote=ptcp:{port}:127.0.0.1"));
        }
        let _ = std::fs::remove_file(socket);
        let label = if name == "nb" { "nb-ovsdb-server" } else { "sb-ovsdb-server" };
        let mut guard = spawn(d, label, command);
        wait_for(START_TIMEOUT, "the OVN ovsdb-server's socket", || {
            if let Ok(Some(status)) = guard.child.try_wait() {
                panic!("{label} exited: {status}; see {}", d.display());
            }
            std::os::unix::net::UnixStream::connect(socket).is_ok()
        });
        if let Some(port) = tcp {
            wait_for(START_TIMEOUT, "the NB server's TCP port", || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
        guard
    }

    fn start_nb(&mut self) {
        assert!(self.nb.is_none(), "the NB server is running");
        self.nb = Some(self.start_server("nb", &self.nb_file(), &self.nb_socket(), Some(self.nb_tcp_port)));
    }

    /// The temp dir (databases, sockets and logs are there).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("not dropped").path()
    }

    pub fn nb_file(&self) -> PathBuf {
        self.dir().join("ovnnb_db.db")
    }

    pub fn sb_file(&self) -> PathBuf {
        self.dir().join("ovnsb_db.db")
    }

    pub fn nb_socket(&self) -> PathBuf {
        self.dir().join("ovnnb_db.sock")
    }

    pub fn sb_socket(&self) -> PathBuf {
        self.dir().join("ovnsb_db.sock")
    }

    /// The NB database, in OVS notation (`unix:...`).
    pub fn nb_endpoint(&self) -> String {
        format!("unix:{}", self.nb_socket().display())
    }

    /// The SB database, in OVS notation (`unix:...`).
    pub fn sb_endpoint(&self) -> String {
        format!("unix:{}", self.sb_socket().display())
    }

    /// The NB database over TCP (`tcp:127.0.0.1:PORT`), on the network namespace the central started in.
    pub fn nb_tcp_endpoint(&self) -> String {
        format!("tcp:127.0.0.1:{}", self.nb_tcp_port)
    }

    /// The NB ovsdb-server's PID.
    pub fn nb_pid(&self) -> u32 {
        self.nb.as_ref().expect("NB server running").pid()
    }

    /// Kills the NB ovsdb-server (SIGKILL, by PID) and waits until it is gone.
    pub fn kill_nb(&mut self) {
        drop(self.nb.take());
    }

    /// Starts the NB ovsdb-server again on the same database file, socket and port (after
    /// [`kill_nb`](Self::kill_nb)).
    pub fn restart_nb(&mut self) {
        self.start_nb();
    }

    /// An `ovn-nbctl` command for this NB database.
    pub fn nbctl_command(&self, args: &[&str]) -> Command {
        let mut command = self.command("ovn-nbctl");
        command.arg(format!("--db={}", self.nb_endpoint())).args(args);
        command
    }

    /// An `ovn-sbctl` command for this SB database.
    pub fn sbctl_command(&self, args: &[&str]) -> Command {
        let mut command = self.command("ovn-sbctl");
        command.arg(format!("--db={}", self.sb_endpoint())).args(args);
        command
    }

    /// Runs `ovn-nbctl args...` and returns its trimmed stdout; panics if it fails.
    pub fn nbctl(&self, args: &[&str]) -> String {
        run(self.nbctl_command(args), &format!("ovn-nbctl {args:?} (logs in {})", self.dir().display()))
    }

    /// Runs `ovn-sbctl args...` and returns its trimmed stdout; panics if it fails.
    pub fn sbctl(&self, args: &[&str]) -> String {
        run(self.sbctl_command(args), &format!("ovn-sbctl {args:?} (logs in {})", self.dir().display()))
    }

    /// The chassis names in the SB database.
    pub fn chassis_names(&self) -> Vec<String> {
        self.sbctl(&["--bare", "--columns=name", "list", "Chassis"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
            .collect()
    }

    /// The chassis a logical port is bound to (its Port_Binding's chassis name), if any.
    pub fn bound_chassis(&self, logical_port: &str) -> Option<String> {
        let uuid = self.sbctl(&[
            "--bare",
            "--columns=chassis",
            "find",
            "Port_Binding",
            &format!("logical_port={logical_port}"),
        ]);
        if uuid.is_empty() {
            return None;
        }
        Some(self.sbctl(&["--bare", "--columns=name", "list", "Chassis", uuid.trim()]))
    }
}

impl Drop for OvnCentral {
    fn drop(&mut self) {
        stop_all([self.northd.take(), self.nb.take(), self.sb.take()]);
        keep_dir_if_panicking(&mut self.dir, "OVN central");
    }
}

/// Where a chassis's Geneve tunnels start: a device it owns in its namespace, moved onto `br-phy`, and the address
/// `br-phy` gets.
#[derive(Debug, Clone)]
pub struct Underlay {
    /// The device (a veth end) already in the chassis's namespace.
    pub device: String,
    /// `br-phy`'s address, with prefix (`172.31.254.1/24`).
    pub cidr: String,
}

/// An OVN chassis: ovsdb-server, ovs-vswitchd (netdev datapath) with `br-int`, and ovn-controller, registered in the
/// central's SB database under `name`.
pub struct Chassis {
    // Fields drop in order: ovn-controller, then Open vSwitch, then the namespace.
    controller: Option<Guard>,
    ovs: Option<Ovs>,
    name: String,
    encap_ip: String,
    netns: Option<Netns>,
}

impl Chassis {
    /// A chassis in the caller's network namespace (isolate the test first with
    /// [`crate::ovs::isolate_network`]); its tunnel endpoint is 127.0.0.1, enough for one chassis.
    pub fn start(central: &OvnCentral, name: &str) -> Self {
        Self::start_with(central, name, None, None)
    }

    /// Two chassis (`name-a`, `name-b`), each in a network namespace of its own, joined by a veth pair on
    /// 172.31.254.0/24 that carries their Geneve tunnels. Returns once each has a tunnel port to the other.
    pub fn pair(central: &OvnCentral, name: &str) -> (Self, Self) {
        let (ns_a, ns_b) = (Netns::new(&format!("{name}a")), Netns::new(&format!("{name}b")));
        run(
            ip_command(&[
                "link",
                "add",
                "qxul0",
                "netns",
                ns_a.name(),
                "type",
                "veth",
                "peer",
                "name",
                "qxul1",
                "netns",
                ns_b.name(),
            ]),
            "ip link add veth pair",
        );
        let underlay =
            |device: &str, host: u8| Underlay { device: device.into(), cidr: format!("{UNDERLAY}.{host}/24") };
        let a = Self::start_with(central, &format!("{name}-a"), Some(ns_a), Some(underlay("qxul0", 1)));
        let b = Self::start_with(central, &format!("{name}-b"), Some(ns_b), Some(underlay("qxul1", 2)));
        for (chassis, other) in [(&a, &b), (&b, &a)] {
            wait_for(START_TIMEOUT, "a Geneve tunnel port between the two chassis", || {
                chassis
                    .vsctl(&["--bare", "--columns=options", "find", "Interface", "type=geneve"])
                    .contains(&other.encap_ip)
            });
        }
        (a, b)
    }

    /// A chassis named `name`, in `netns` when given (else the caller's namespace), with its tunnels on `underlay`
    /// (else 127.0.0.1).
    pub fn start_with(central: &OvnCentral, name: &str, netns: Option<Netns>, underlay: Option<Underlay>) -> Self {
        let ovs = match &netns {
            Some(netns) => Ovs::start_in_netns(netns.name()),
            None => Ovs::start(),
        };
        let mut chassis =
            Self { controller: None, ovs: Some(ovs), name: name.to_owned(), encap_ip: String::new(), netns };
        chassis.encap_ip = match &underlay {
            Some(underlay) => {
                let ns = chassis.netns.as_ref().expect("an underlay needs the chassis's own network namespace");
                ns.ip(&["link", "set", &underlay.device, "up"]);
                chassis.vsctl(&[
                    "add-br",
                    "br-phy",
                    "--",
                    "set",
                    "Bridge",
                    "br-phy",
                    "datapath_type=netdev",
                    "--",
                    "add-port",
                    "br-phy",
                    &underlay.device,
                ]);
                ns.ip(&["addr", "add", &underlay.cidr, "dev", "br-phy"]);
                ns.ip(&["link", "set", "br-phy", "up"]);
                underlay.cidr.split('/').next().unwrap_or_default().to_owned()
            }
            None => "127.0.0.1".to_owned(),
        };
        chassis.vsctl(&[
            "add-br",
            "br-int",
            "--",
            "set",
            "Bridge",
            "br-int",
            "datapath_type=netdev",
            "fail_mode=secure",
            "other_config:disable-in-band=true",
        ]);
        chassis.vsctl(&[
            "set",
            "Open_vSwitch",
            ".",
            &format!("external_ids:system-id={name}"),
            &format!("external_ids:ovn-remote={}", central.sb_endpoint()),
            "external_ids:ovn-encap-type=geneve",
            &format!("external_ids:ovn-encap-ip={}", chassis.encap_ip),
            "external_ids:ovn-bridge=br-int",
            "external_ids:ovn-bridge-datapath-type=netdev",
        ]);
        let ovs = chassis.ovs();
        let d = ovs.dir().to_owned();
        let mut controller = ovs.command("ovn-controller");
        controller
            .arg(format!("unix:{}", ovs.db_socket().display()))
            .arg(format!("--pidfile={}", d.join("ovn-controller.pid").display()))
            .arg(format!("--log-file={}", d.join("ovn-controller.log").display()));
        // ovn-controller has no --unixctl: its control socket goes to OVN_RUNDIR.
        for var in ["OVN_RUNDIR", "OVN_LOGDIR", "OVN_DBDIR", "OVN_SYSCONFDIR"] {
            controller.env(var, &d);
        }
        chassis.controller = Some(spawn(&d, "ovn-controller", controller));
        wait_for(START_TIMEOUT, "the chassis to register in the SB database", || {
            if let Some(Ok(Some(status))) = chassis.controller.as_mut().map(|g| g.child.try_wait()) {
                panic!("ovn-controller exited: {status}; see {}", d.display());
            }
            central.chassis_names().iter().any(|n| n == name)
        });
        chassis
    }

    /// The chassis name (`system-id`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its Geneve endpoint address.
    pub fn encap_ip(&self) -> &str {
        &self.encap_ip
    }

    /// Its network namespace, when it has its own.
    pub fn netns(&self) -> Option<&Netns> {
        self.netns.as_ref()
    }

    /// Its Open vSwitch (database socket, logs).
    pub fn ovs(&self) -> &Ovs {
        self.ovs.as_ref().expect("not dropped")
    }

    /// ovn-controller's PID.
    pub fn controller_pid(&self) -> u32 {
        self.controller.as_ref().expect("ovn-controller running").pid()
    }

    /// Runs `ovs-vsctl args...` against this chassis's database; panics if it fails.
    pub fn vsctl(&self, args: &[&str]) -> String {
        self.ovs().vsctl(args)
    }
}

impl Drop for Chassis {
    fn drop(&mut self) {
        stop_all([self.controller.take()]);
        if std::thread::panicking() {
            eprintln!("chassis {}: ovn-controller and Open vSwitch logs in {}", self.name, self.ovs().dir().display());
        }
        drop(self.ovs.take());
        drop(self.netns.take());
    }
}

fn spawn(dir: &Path, name: &'static str, mut command: Command) -> Guard {
    let log = std::fs::File::create(dir.join(format!("{name}.stderr"))).expect("stderr file");
    let child = command.stdout(Stdio::null()).stderr(log).spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    Guard { name, child }
}

fn stop_all<const N: usize>(guards: [Option<Guard>; N]) {
    for guard in guards.into_iter().flatten() {
        let (name, pid) = (guard.name, guard.pid());
        drop(guard);
        if std::thread::panicking() {
            eprintln!("stopped {name} (pid {pid})");
        }
    }
}

fn keep_dir_if_panicking(dir: &mut Option<tempfile::TempDir>, what: &str) {
    if std::thread::panicking() {
        if let Some(dir) = dir.take() {
            eprintln!("{what} logs kept in {}", dir.keep().display());
        }
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}
