//! qx-console end to end: the real `qx-console` binary in a tmux pane (keys in with `send-keys`, the screen out
//! with `capture-pane`), against a real qx-node whose `host:` section points at a temp dir and harmless commands,
//! a real QEMU running the test guest, and a control-plane stub served by this test on 127.0.0.1.
//!
//! tmux runs on a private socket in the test's temp dir and is killed (`kill-server`, then by PID) when the test
//! ends, pass or fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qx_proto::controlplane::v1 as cp;
use qx_proto::controlplane::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::host_service_client::HostServiceClient;
use qx_test_infra::{kill_pid, pid_alive, test_guest, Daemon};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// The pane's size: larger than 80x24, so the key bar fits on one line.
const WIDTH: u16 = 100;
const HEIGHT: u16 = 30;
/// How long the screen may take to show what a step expects (qx-node applies, the control plane answers, the
/// console polls every 2 s; two cores run this beside other tests).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(20);
const TOKEN: &str = "e2e-join-token-7f3a";

/// A tmux server of this test's own, on a socket in `dir`, running one session: the console.
struct Tmux {
    socket: PathBuf,
    server_pid: Option<i32>,
}

impl Tmux {
    /// Starts `argv` in a detached `WIDTH`x`HEIGHT` session, without the status line (so the pane is the whole
    /// window) and keeping the pane when the program exits, so its last words can be read.
    fn start(dir: &Path, argv: &[String]) -> Self {
        let config = dir.join("tmux.conf");
        std::fs::write(&config, "set -g status off\nset -g remain-on-exit on\nset -g history-limit 0\n").unwrap();
        let mut tmux = Self { socket: dir.join("tmux.sock"), server_pid: None };
        let size = [WIDTH.to_string(), HEIGHT.to_string()];
        let mut args = vec!["-f".to_owned(), config.display().to_string(), "new-session".into(), "-d".into()];
        args.extend(["-s".into(), "console".into(), "-x".into(), size[0].clone(), "-y".into(), size[1].clone()]);
        args.extend(argv.iter().cloned());
        let out = tmux.run(&args);
        assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        let pid = tmux.run(&["display-message".into(), "-p".into(), "#{pid}".into()]);
        tmux.server_pid = String::from_utf8_lossy(&pid.stdout).trim().parse().ok();
        tmux
    }

    fn run(&self, args: &[String]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            // A detached session needs no terminal, but tmux still looks at TERM.
            .env("TERM", "xterm-256color")
            .output()
            .expect("run tmux (scripts/install-deps.sh installs it)")
    }

    /// Named keys (`F2`, `Tab`, `BTab`, `Enter`, `C-u`).
    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys".to_owned(), "-t".into(), "console".into()];
        args.extend(keys.iter().map(|k| (*k).to_owned()));
        assert!(self.run(&args).status.success(), "send-keys {keys:?}");
    }

    /// Literal text, typed.
    fn type_text(&self, text: &str) {
        let args = ["send-keys", "-t", "console", "-l", text].map(str::to_owned);
        assert!(self.run(&args).status.success(), "send-keys -l {text:?}");
    }

    fn screen(&self) -> String {
        let out = self.run(&["capture-pane".into(), "-p".into(), "-t".into(), "console".into()]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until the screen contains every one of `needles`, and returns it.
    async fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            let screen = self.screen();
            if needles.iter().all(|n| screen.contains(n)) {
                return screen;
            }
            assert!(Instant::now() < deadline, "the console never showed {needles:?}; it shows:\n{screen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the screen no longer contains `needle`, and returns it.
    async fn wait_without(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.screen();
            if !screen.contains(needle) {
                return screen;
            }
            assert!(Instant::now() < deadline, "the console kept showing {needle:?}:\n{screen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- the console's last screen ---\n{}", self.screen());
        }
        let _ = self.run(&["kill-server".into()]);
        if let Some(pid) = self.server_pid.filter(|pid| pid_alive(*pid)) {
            kill_pid(pid);
        }
    }
}

/// A control plane that knows one join token and records what nodes send it.
#[derive(Debug, Clone, Default)]
struct ControlPlaneStub {
    registrations: Arc<Mutex<Vec<cp::RegisterNodeRequest>>>,
    heartbeats: Arc<Mutex<Vec<cp::HeartbeatRequest>>>,
}

#[tonic::async_trait]
impl ControlPlane for ControlPlaneStub {
    async fn register_node(
        &self,
        request: Request<cp::RegisterNodeRequest>,
    ) -> Result<Response<cp::RegisterNodeResponse>, Status> {
        let request = request.into_inner();
        if request.join_token != TOKEN {
            return Err(Status::unauthenticated("unknown join token"));
        }
        self.registrations.lock().unwrap().push(request);
        Ok(Response::new(cp::RegisterNodeResponse {
            node_id: "node-e2e-1".into(),
            cluster_name: "e2e-lab".into(),
            heartbeat_interval_seconds: 1,
            // This control plane signs no certificate: the node keeps its own.
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<cp::HeartbeatRequest>,
    ) -> Result<Response<cp::HeartbeatResponse>, Status> {
        self.heartbeats.lock().unwrap().push(request.into_inner());
        Ok(Response::new(cp::HeartbeatResponse {}))
    }
}

impl ControlPlaneStub {
    /// Serves on 127.0.0.1 (a free port) until the test's runtime ends; returns the URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let service = ControlPlaneServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        url
    }
}

/// The target directory's profile dir (`target/debug`), where cargo puts qx-node and this test's `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_owned()
}

/// qx-node from this workspace, built in this test's profile: `cargo test -p qx-console` builds only this
/// package's binaries, and a stale qx-node would test yesterday's server.
fn qx_node() -> PathBuf {
    let dir = profile_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-p", "qx-agent", "--bin", "qx-node"]).current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|name| name == "release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build for qx-node");
    assert!(status.success(), "building qx-node failed");
    dir.join("qx-node")
}

/// The node config: every host path under `root`, every host command a harmless `sh -c` leaving a trace there.
fn node_config(root: &Path) -> String {
    let r = root.display();
    format!(
        "host:\n  network_config: {r}/etc/quantix/network.yaml\n  interfaces_file: {r}/etc/network/interfaces\n  \
         apply_network_command: [sh, -c, 'echo applied >> {r}/applied']\n  \
         ssh_enable_command: [sh, -c, 'echo on >> {r}/ssh']\n  \
         ssh_disable_command: [sh, -c, 'echo off >> {r}/ssh']\n  \
         reboot_command: [sh, -c, 'echo reboot >> {r}/power']\n  \
         shutdown_command: [sh, -c, 'echo shutdown >> {r}/power']\n  \
         shell_command: [sh, -c, 'echo QX-SHELL-RAN; read answer; echo \"$answer\" > {r}/shell']\n"
    )
}

fn console_argv(socket: &Path) -> Vec<String> {
    let console = env!("CARGO_BIN_EXE_qx-console");
    [console, "--socket", &socket.display().to_string(), "--allow-quit", "false"].map(str::to_owned).to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_vms_configures_the_network_joins_a_cluster_and_opens_a_shell() {
    let stub = ControlPlaneStub::default();
    let control_plane = stub.serve().await;
    let root = tempfile::Builder::new().prefix("qx-console-e2e-").tempdir().unwrap();
    test_guest();
    let daemon = Daemon::start_with(&qx_node(), "debug", Some(&node_config(root.path())));

    // One VM running and one defined: the console must say 1 / 2.
    let mut node = qx_agent::client::connect(daemon.socket()).await.unwrap();
    for name in ["e2e-run", "e2e-idle"] {
        let spec_text = test_guest().spec_yaml(name, "nics:\n  - kind: user\n");
        node.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm");
    }
    let vm = node
        .start_vm(pb::StartVmRequest { name: "e2e-run".into(), paused: false })
        .await
        .expect("StartVm")
        .into_inner();
    let qemu = vm.runtime.map(|r| r.pid as i32).expect("a running VM has a pid");

    let tmux = Tmux::start(root.path(), &console_argv(&daemon.socket()));
    let screen = tmux.wait_for(&["VMs:           1 / 2 running", "Status:        standalone"]).await;
    assert!(screen.contains("SSH:           disabled"), "{screen}");
    assert!(screen.contains("F2 Network  F3 SSH  F4 Join cluster  F5 Refresh"), "{screen}");

    // F2: a static configuration, with a mistake the form catches on the way.
    tmux.keys(&["F2"]);
    tmux.wait_for(&["Configure management network", "Enter apply"]).await;
    tmux.keys(&["C-u"]);
    tmux.type_text("eth0");
    tmux.keys(&["Tab", "Right", "Tab", "C-u"]);
    tmux.type_text("192.0.2.10");
    tmux.keys(&["Tab"]);
    tmux.wait_for(&["! \"192.0.2.10\" has no prefix length (e.g. /24)"]).await;
    // Enter refuses, sends nothing, and puts focus back on the address.
    tmux.keys(&["Enter"]);
    tmux.wait_for(&["> Address         192.0.2.10_"]).await;
    tmux.type_text("/24");
    tmux.wait_without("has no prefix length", SCREEN_TIMEOUT).await;
    tmux.keys(&["Tab", "C-u"]);
    tmux.type_text("192.0.2.1");
    tmux.keys(&["Tab", "C-u"]);
    tmux.type_text("42");
    tmux.keys(&["Tab", "C-u"]);
    tmux.type_text("192.0.2.53, 192.0.2.54");
    assert!(!root.path().join("applied").exists(), "nothing was sent while the address was wrong");
    tmux.keys(&["Enter"]);
    tmux.wait_for(&["Network configuration applied: eth0, static 192.0.2.10/24, VLAN 42"]).await;
    let mut host = HostServiceClient::new(qx_agent::client::channel(daemon.socket()).await.unwrap());
    let written = host.get_network_config(pb::GetNetworkConfigRequest {}).await.unwrap().into_inner();
    let expected = pb::ManagementNetwork {
        interface: "eth0".into(),
        mode: pb::AddressMode::Static.into(),
        address: "192.0.2.10/24".into(),
        gateway: "192.0.2.1".into(),
        vlan: 42,
        dns_servers: vec!["192.0.2.53".into(), "192.0.2.54".into()],
    };
    assert_eq!(written, expected);
    assert_eq!(std::fs::read_to_string(root.path().join("applied")).unwrap(), "applied\n");
    tmux.wait_for(&["on eth0 (static, VLAN 42)"]).await;

    // F4: an empty token is caught in the console, a wrong one by the control plane, the right one joins.
    tmux.keys(&["F4"]);
    tmux.wait_for(&["Join cluster", "Enter join"]).await;
    tmux.type_text(&control_plane);
    tmux.keys(&["Tab", "Enter"]);
    tmux.wait_for(&["! must not be empty (the join token the control plane"]).await;
    tmux.type_text("wrong-token");
    tmux.keys(&["Enter"]);
    tmux.wait_for(&["Joining failed:", "unknown join token"]).await;
    assert!(stub.registrations.lock().unwrap().is_empty());
    tmux.keys(&["C-u"]);
    tmux.type_text(TOKEN);
    let screen = tmux.wait_for(&[&format!("> Join token      {}_", "*".repeat(TOKEN.len()))]).await;
    assert!(!screen.contains(TOKEN), "the token is masked:\n{screen}");
    tmux.keys(&["Enter"]);
    tmux.wait_for(&[&format!("Joined cluster \"e2e-lab\" at {control_plane}")]).await;
    let screen = tmux.wait_for(&["Status:        member of cluster \"e2e-lab\"", "heartbeat"]).await;
    assert!(screen.contains(&format!("Control plane: {control_plane}")), "{screen}");
    let registered = stub.registrations.lock().unwrap().clone();
    assert_eq!(registered.len(), 1);
    assert_eq!(registered[0].join_token, TOKEN);
    let deadline = Instant::now() + SCREEN_TIMEOUT;
    while stub.heartbeats.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "fewer than 2 heartbeats reached the control plane");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let heartbeat = stub.heartbeats.lock().unwrap()[0].clone();
    assert_eq!(heartbeat.node_id, "node-e2e-1");
    let telemetry = heartbeat.telemetry.expect("heartbeats carry telemetry");
    assert_eq!((telemetry.vms_running, telemetry.vms_total), (1, 2));

    // F12: the shell runs on the console's terminal, reads a line from it, and the console comes back.
    tmux.keys(&["F12"]);
    tmux.wait_for(&["Emergency shell", "Enter open the shell"]).await;
    tmux.keys(&["Enter"]);
    tmux.wait_for(&["QX-SHELL-RAN"]).await;
    tmux.type_text("typed-in-the-shell");
    tmux.keys(&["Enter"]);
    tmux.wait_for(&["Emergency shell ended: exit status: 0", "VMs:           1 / 2 running"]).await;
    assert_eq!(std::fs::read_to_string(root.path().join("shell")).unwrap(), "typed-in-the-shell\n");

    // F6: qx-node re-executes itself; the console says so, reconnects by itself, and the VM never stopped.
    tmux.keys(&["F6"]);
    tmux.wait_for(&["Restart services", "Enter restart"]).await;
    tmux.keys(&["Enter"]);
    tmux.wait_for(&["reconnecting to qx-node"]).await;
    let screen = tmux.wait_without("reconnecting", Duration::from_secs(40)).await;
    assert!(screen.contains("VMs:           1 / 2 running"), "{screen}");
    assert!(pid_alive(qemu), "the VM's QEMU outlived the restart");
    let vm = node_after_restart(&daemon).await;
    assert_eq!(vm.runtime.map(|r| r.pid as i32), Some(qemu));
}

async fn node_after_restart(daemon: &Daemon) -> pb::Vm {
    let mut node = qx_agent::client::connect(daemon.socket()).await.expect("reconnect to qx-node");
    node.get_vm(pb::VmRef { name: "e2e-run".into() }).await.expect("GetVm").into_inner()
}

/// The first frame does not wait for qx-node: against a daemon that accepts and never answers, the console
/// draws "connecting..." at once, then says the node does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_frame_does_not_wait_for_a_hung_daemon() {
    let dir = tempfile::Builder::new().prefix("qx-console-hung-").tempdir().unwrap();
    let socket = dir.path().join("hung.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let tmux = Tmux::start(dir.path(), &console_argv(&socket));
    // "connecting..." is drawn only until the first call gives up, so seeing it proves the frame came first. How
    // fast it comes is a speed target, measured by the `first_frame` bench, not asserted here.
    tmux.wait_for(&["Quantix", "qx-node: connecting...", "F2 Network"]).await;
    tmux.wait_for(&["qx-node is not reachable", "did not answer within"]).await;
    // Keys still work while the daemon hangs.
    tmux.keys(&["F7"]);
    tmux.wait_for(&["Diagnostics", "Loading..."]).await;
    tmux.wait_for(&["GetDiagnostics failed: qx-node did not answer GetDiagnostics within 5s"]).await;
    tmux.keys(&["Escape"]);
    tmux.wait_without("GetDiagnostics failed", SCREEN_TIMEOUT).await;
    held.abort();
}

/// `--tty`, as the OpenRC service runs it: on a terminal it leads the session of (as under supervise-daemon), the
/// console takes it and runs; on a terminal another session owns (a getty's, another console's), it refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_takes_a_free_tty_and_refuses_a_taken_one() {
    let dir = tempfile::Builder::new().prefix("qx-console-tty-").tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    // `exec` keeps the pane's session leader, as supervise-daemon's child is one.
    let script = format!(
        "exec {} --socket {} --allow-quit false --tty \"$(tty)\"",
        env!("CARGO_BIN_EXE_qx-console"),
        socket.display()
    );
    let tmux = Tmux::start(dir.path(), &["sh".into(), "-c".into(), script]);
    tmux.wait_for(&["qx-node is not reachable", "(os error 2)", "F2 Network"]).await;
    tmux.keys(&["F3"]);
    tmux.wait_for(&["SSH is disabled."]).await;

    let pane_tty = tmux.run(&["display-message".into(), "-p".into(), "#{pane_tty}".into()]);
    let pane_tty = String::from_utf8_lossy(&pane_tty.stdout).trim().to_owned();
    let taken = Command::new(env!("CARGO_BIN_EXE_qx-console"))
        .args(["--socket", &socket.display().to_string(), "--tty", &pane_tty])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!taken.status.success());
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(
        stderr.contains(&format!("make {pane_tty} the controlling terminal (does a getty run on it?)")),
        "{stderr}"
    );
    tmux.wait_for(&["SSH is disabled."]).await;
}
