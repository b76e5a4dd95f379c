//! HostService end to end: a real qx-node whose `host:` config points at a temp dir and harmless commands, called
//! over its real unix socket; a control-plane stub (a tonic server in this process, on 127.0.0.1) for cluster
//! membership; and real QEMUs for the restart test.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod common;

use common::*;
use qx_proto::controlplane::v1 as cp;
use qx_proto::controlplane::v1::control_plane_server::{ControlPlane, ControlPlaneServer};
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::host_service_client::HostServiceClient;
use qx_test_infra::{pid_alive, test_guest, wait_until, Daemon};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

type Host = HostServiceClient<Channel>;

/// A daemon whose host backend writes under `root` and runs `sh -c` one-liners that leave traces there.
struct Fixture {
    root: tempfile::TempDir,
    daemon: Daemon,
}

impl Fixture {
    fn start() -> Self {
        let root = tempfile::Builder::new().prefix("qx-host-").tempdir().unwrap();
        let r = root.path().display();
        // The apply command refuses any config naming 198.51.100.0/24, so a test can make it fail on purpose.
        let config = format!(
            "host:\n  network_config: {r}/etc/quantix/network.yaml\n  interfaces_file: {r}/etc/network/interfaces\n  \
             apply_network_command: [sh, -c, 'echo applied >> {r}/applied; ! grep -q 198.51.100 {r}/etc/quantix/network.yaml || {{ echo bad network >&2; exit 4; }}']\n  \
             ssh_enable_command: [sh, -c, 'echo on >> {r}/ssh']\n  \
             ssh_disable_command: [sh, -c, 'echo off >> {r}/ssh']\n  \
             reboot_command: [sh, -c, 'echo reboot >> {r}/power']\n  \
             shutdown_command: [sh, -c, 'echo shutdown >> {r}/power']\n  \
             shell_command: [/bin/sh, -l]\n"
        );
        let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config));
        Self { root, daemon }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.path().join(relative)
    }

    fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.path(relative)).unwrap_or_default()
    }

    async fn host(&self) -> Host {
        HostServiceClient::new(qx_agent::client::channel(self.daemon.socket()).await.expect("connect to qx-node"))
    }
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn static_network(address: &str, gateway: &str) -> pb::ManagementNetwork {
    pb::ManagementNetwork {
        interface: "eth0".into(),
        mode: pb::AddressMode::Static.into(),
        address: address.into(),
        gateway: gateway.into(),
        vlan: 0,
        dns_servers: vec!["192.0.2.53".into()],
    }
}

async fn status(host: &mut Host) -> pb::HostStatus {
    host.get_host_status(pb::GetHostStatusRequest {}).await.expect("GetHostStatus").into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_config_is_validated_written_applied_and_restored() {
    let fx = Fixture::start();
    let mut host = fx.host().await;
    let initial = host.get_network_config(pb::GetNetworkConfigRequest {}).await.unwrap().into_inner();
    assert_eq!(initial.mode(), pb::AddressMode::Dhcp, "defaults without network.yaml: {initial:?}");
    assert!(!initial.interface.is_empty());

    // Bad input: every problem named, nothing written, nothing run.
    let mut bad = static_network("10.0.0.5", "10.0.1.1");
    bad.vlan = 5000;
    bad.dns_servers.push("resolver".into());
    let err = host.set_network_config(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        r#"address: "10.0.0.5" has no prefix length (e.g. /24); vlan: "5000" is outside 1..=4094; dns_servers[1]: "resolver" is not an IP address"#
    );
    let err = host.set_network_config(static_network("10.0.0.5/24", "10.0.1.1")).await.unwrap_err();
    assert_eq!(err.message(), r#"gateway: "10.0.1.1" is outside the subnet 10.0.0.0/24"#);
    assert!(!fx.path("etc").exists() && !fx.path("applied").exists(), "nothing written, nothing applied");

    // Good input: both files written, the apply command run, and the config reported back.
    let good = static_network("192.0.2.10/24", "192.0.2.1");
    let set = host.set_network_config(good.clone()).await.unwrap().into_inner();
    assert_eq!(set, good);
    assert_eq!(fx.read("applied"), "applied\n");
    let yaml = fx.read("etc/quantix/network.yaml");
    assert_eq!(
        yaml,
        "interface: eth0\nmode: static\naddress: 192.0.2.10/24\ngateway: 192.0.2.1\ndns_servers:\n- 192.0.2.53\n"
    );
    let interfaces = fx.read("etc/network/interfaces");
    assert!(
        interfaces.contains("auto eth0\niface eth0 inet static\n\taddress 192.0.2.10/24\n\tgateway 192.0.2.1\n"),
        "{interfaces}"
    );
    assert_eq!(host.get_network_config(pb::GetNetworkConfigRequest {}).await.unwrap().into_inner(), good);
    assert_eq!(status(&mut host).await.network, Some(good.clone()));

    // A failing apply command: the previous files come back and are applied again.
    let err = host.set_network_config(static_network("198.51.100.10/24", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .starts_with("cannot apply the management network (the previous configuration was restored): `sh -c"),
        "{}",
        err.message()
    );
    assert!(err.message().ends_with("exit status: 4: bad network"), "{}", err.message());
    assert_eq!(fx.read("etc/quantix/network.yaml"), yaml);
    assert_eq!(fx.read("etc/network/interfaces"), interfaces);
    assert_eq!(fx.read("applied"), "applied\napplied\napplied\n", "the failed apply, then the old config again");
    assert_eq!(host.get_network_config(pb::GetNetworkConfigRequest {}).await.unwrap().into_inner(), good);

    // The management address comes from the configured interface: loopback is the one every host has.
    let lo = pb::ManagementNetwork { interface: "lo".into(), mode: pb::AddressMode::Dhcp.into(), ..Default::default() };
    host.set_network_config(lo).await.unwrap();
    let reported = status(&mut host).await;
    assert_eq!(reported.management_address, "127.0.0.1/8");
    assert_eq!(reported.management_url, "", "standalone, no TCP listener");
    let vlan = pb::ManagementNetwork { vlan: 42, ..reported.network.unwrap() };
    host.set_network_config(vlan).await.unwrap();
    assert_eq!(status(&mut host).await.management_address, "", "lo.42 does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_timer_is_shown_survives_a_restart_and_disable_clears_it() {
    let mut fx = Fixture::start();
    let mut host = fx.host().await;
    let ssh = status(&mut host).await.ssh.unwrap();
    assert_eq!((ssh.enabled, ssh.disable_at_unix), (false, 0));

    let on = host.set_ssh(pb::SetSshRequest { enabled: true, timeout_minutes: 1 }).await.unwrap().into_inner();
    assert!(on.enabled);
    assert!((on.disable_at_unix - now_unix() - 60).abs() <= 3, "{on:?}");
    assert_eq!(status(&mut host).await.ssh, Some(on));
    assert_eq!(fx.read("ssh"), "on\n");

    fx.daemon.kill9();
    fx.daemon.restart();
    let mut host = fx.host().await;
    assert_eq!(status(&mut host).await.ssh, Some(on), "the timer is re-armed from ssh.json");

    let off = host.set_ssh(pb::SetSshRequest { enabled: false, timeout_minutes: 0 }).await.unwrap().into_inner();
    assert_eq!((off.enabled, off.disable_at_unix), (false, 0));
    assert_eq!(status(&mut host).await.ssh, Some(off));
    assert_eq!(fx.read("ssh"), "on\noff\n");
}

/// A control plane that accepts `good-token`, names the node `node-1` in cluster `lab`, asks for a heartbeat
/// every second, and records what it is sent.
#[derive(Clone, Default)]
struct Stub {
    registrations: Arc<Mutex<Vec<cp::RegisterNodeRequest>>>,
    heartbeats: Arc<Mutex<Vec<cp::HeartbeatRequest>>>,
}

#[tonic::async_trait]
impl ControlPlane for Stub {
    async fn register_node(
        &self,
        request: Request<cp::RegisterNodeRequest>,
    ) -> Result<Response<cp::RegisterNodeResponse>, Status> {
        let request = request.into_inner();
        if request.join_token != "good-token" {
            return Err(Status::unauthenticated("unknown join token"));
        }
        self.registrations.lock().unwrap().push(request);
        Ok(Response::new(cp::RegisterNodeResponse {
            node_id: "node-1".into(),
            cluster_name: "lab".into(),
            heartbeat_interval_seconds: 1,
            ..Default::default()
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<cp::HeartbeatRequest>,
    ) -> Result<Response<cp::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        if request.node_id != "node-1" {
            return Err(Status::not_found("unknown node"));
        }
        self.heartbeats.lock().unwrap().push(request);
        Ok(Response::new(cp::HeartbeatResponse {}))
    }
}

impl Stub {
    /// Serves on a fresh 127.0.0.1 port until `stop` fires; returns the URL.
    async fn serve(&self) -> (String, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let service = ControlPlaneServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await
        });
        (url, stop)
    }

    fn heartbeat_count(&self) -> usize {
        self.heartbeats.lock().unwrap().len()
    }
}

fn cluster(status: &pb::HostStatus) -> pb::ClusterStatus {
    status.cluster.clone().unwrap()
}

async fn wait_for_heartbeats(stub: &Stub, count: usize) {
    let arrived = tokio::time::timeout(Duration::from_secs(15), async {
        while stub.heartbeat_count() < count {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(arrived.is_ok(), "{count} heartbeats within 15 s; got {}", stub.heartbeat_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_a_control_plane_sends_heartbeats_resumes_them_and_leaves() {
    let mut fx = Fixture::start();
    let mut host = fx.host().await;
    let stub = Stub::default();
    let (url, stop) = stub.serve().await;
    let membership = fx.daemon.data_dir().join("cluster.json");
    let join =
        |url: &str, token: &str| pb::JoinClusterRequest { control_plane_url: url.into(), join_token: token.into() };

    // Refused: bad input, an unreachable control plane, a refused token. The node stays standalone.
    let err = host.join_cluster(join("ftp://cp", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        r#"control_plane_url: "ftp://cp" must be an http:// or https:// URL with a host; join_token: must not be empty"#
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = host.join_cluster(join(&format!("http://{closed}"), "good-token")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().starts_with(&format!("cannot reach the control plane at http://{closed}")),
        "{}",
        err.message()
    );
    let err = host.join_cluster(join(&url, "wrong-secret-token")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), format!("the control plane at {url} refused the join token: unknown join token"));
    assert_eq!(cluster(&status(&mut host).await).state(), pb::ClusterState::Standalone);
    assert!(!membership.exists());

    // Joined: registered with the host's facts, heartbeats with telemetry every second.
    let joined = host.join_cluster(join(&url, "good-token")).await.unwrap().into_inner();
    assert_eq!(joined.state(), pb::ClusterState::Member);
    assert_eq!((joined.node_id.as_str(), joined.cluster_name.as_str()), ("node-1", "lab"));
    let registered = stub.registrations.lock().unwrap()[0].clone();
    assert!(registered.memory_total_bytes > 0 && registered.cpu_count > 0, "{registered:?}");
    assert!(!registered.node_name.is_empty() && !registered.version.is_empty());
    let saved = std::fs::read_to_string(&membership).unwrap();
    assert!(saved.contains("node-1") && !saved.contains("good-token"), "{saved}");
    wait_for_heartbeats(&stub, 2).await;
    let heartbeat = stub.heartbeats.lock().unwrap()[0].clone();
    let telemetry = heartbeat.telemetry.unwrap();
    assert!(telemetry.memory_total_bytes > 0 && telemetry.memory_used_bytes > 0, "{telemetry:?}");
    assert!(telemetry.uptime_seconds > 0 && !telemetry.disks.is_empty(), "{telemetry:?}");
    assert_eq!((telemetry.vms_total, telemetry.vms_running), (0, 0));
    let reported = status(&mut host).await;
    assert_eq!(cluster(&reported).state(), pb::ClusterState::Member);
    assert!(cluster(&reported).last_heartbeat_unix > 0);
    assert_eq!(reported.management_url, url, "a member is managed from its control plane");
    let err = host.join_cluster(join(&url, "good-token")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());

    // A restarted daemon resumes the heartbeats from cluster.json.
    fx.daemon.kill9();
    let before = stub.heartbeat_count();
    fx.daemon.restart();
    let mut host = fx.host().await;
    wait_for_heartbeats(&stub, before + 2).await;
    assert_eq!(cluster(&status(&mut host).await).node_id, "node-1");

    // The control plane goes away: disconnected, with the reason; heartbeats keep being tried.
    let _ = stop.send(());
    let disconnected = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let state = cluster(&status(&mut host).await);
            if state.state() == pb::ClusterState::Disconnected {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("disconnected within 30 s");
    assert!(disconnected.last_error.starts_with("heartbeat failed (Unavailable)"), "{}", disconnected.last_error);

    let left = host.leave_cluster(pb::LeaveClusterRequest {}).await.unwrap().into_inner();
    assert_eq!(left.state(), pb::ClusterState::Standalone);
    assert!(!membership.exists());
    assert_eq!(cluster(&status(&mut host).await).state(), pb::ClusterState::Standalone);
    let log = fx.daemon.log_text();
    assert!(!log.contains("good-token") && !log.contains("wrong-secret-token"), "a join token was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_power_and_shell() {
    let fx = Fixture::start();
    let mut host = fx.host().await;
    let diagnostics = host.get_diagnostics(pb::GetDiagnosticsRequest { log_lines: 0 }).await.unwrap().into_inner();
    assert!(diagnostics.log_lines.iter().any(|l| l.contains("serving")), "{:?}", diagnostics.log_lines);
    assert!(diagnostics.hardware.iter().any(|l| l.starts_with("CPU: ")), "{:?}", diagnostics.hardware);
    assert!(diagnostics.hardware.iter().any(|l| l.starts_with("Memory: ")), "{:?}", diagnostics.hardware);
    assert!(!diagnostics.accelerator.is_empty() && !diagnostics.accelerator_reason.is_empty());
    assert!(!diagnostics.qemu_version.is_empty());
    let two = host.get_diagnostics(pb::GetDiagnosticsRequest { log_lines: 2 }).await.unwrap().into_inner();
    assert_eq!(two.log_lines.len(), 2);

    let err = host.power(pb::PowerRequest { action: 0, confirm_running_vms: false }).await.unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::InvalidArgument, r#"action: "POWER_ACTION_UNSPECIFIED" must be REBOOT or SHUTDOWN"#)
    );
    // No VM runs, so no confirmation is needed; the command runs after the reply.
    host.power(pb::PowerRequest { action: pb::PowerAction::Reboot.into(), confirm_running_vms: false }).await.unwrap();
    let ran = wait_until(Duration::from_secs(10), || (fx.read("power") == "reboot\n").then_some(()));
    assert!(ran.is_some(), "the reboot command ran: {:?}", fx.read("power"));

    let shell = host.open_shell(pb::OpenShellRequest {}).await.unwrap().into_inner();
    assert_eq!(shell.command, ["/bin/sh", "-l"]);
    let audit = wait_until(Duration::from_secs(5), || fx.daemon.log_text().contains("emergency shell").then_some(()));
    assert!(audit.is_some(), "the shell opening is in the log");
}

/// Gone for good: not alive and not a zombie either (`pid_alive` counts a zombie as gone).
fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

fn parent_of(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_services_reexecutes_in_place_and_keeps_vms_which_are_reaped_later() {
    test_guest();
    let fx = Fixture::start();
    let daemon_pid = fx.daemon.pid().unwrap();
    let mut client = client(&fx.daemon).await;
    let mut host = fx.host().await;
    let mut qemu = Vec::new();
    for name in ["stay", "victim"] {
        create(&mut client, name).await;
        qemu.push(pid(&start(&mut client, name).await));
    }
    boot(&mut client, "stay").await;

    let err = host
        .power(pb::PowerRequest { action: pb::PowerAction::Shutdown.into(), confirm_running_vms: false })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), "2 VMs are running; stop them first or confirm with confirm_running_vms");
    assert_eq!(fx.read("power"), "", "nothing ran");

    // An open event stream (qx-console keeps one) must not hold the restart up for more than the grace period.
    let _events = client.watch_events(pb::WatchEventsRequest { vm: String::new() }).await.unwrap().into_inner();
    host.restart_services(pb::RestartServicesRequest {}).await.unwrap();
    let serving = |log: &str| log.matches("serving socket=").count();
    let restarted = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if serving(&fx.daemon.log_text()) >= 2 {
                if let Ok(mut host) = tokio::time::timeout(Duration::from_secs(2), fx.host()).await {
                    if host.get_host_status(pb::GetHostStatusRequest {}).await.is_ok() {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(restarted.is_ok(), "qx-node answers again after re-executing");
    let log = fx.daemon.log_text();
    assert!(log.contains("re-executing qx-node"), "{log}");
    assert!(pid_alive(daemon_pid), "the same process, re-executed");
    for &pid in &qemu {
        assert_eq!(parent_of(pid), Some(daemon_pid), "QEMU {pid} is still the daemon's child");
    }

    let mut client = common::client(&fx.daemon).await;
    let vms = client.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms;
    let listed: Vec<(String, pb::VmState, u32)> =
        vms.iter().map(|vm| (vm.spec.clone().unwrap().name, state(vm), pid(vm))).collect();
    assert_eq!(
        listed,
        [("stay".into(), pb::VmState::Running, qemu[0]), ("victim".into(), pb::VmState::Running, qemu[1])],
        "reattached to both QEMUs"
    );
    let mut console = Console::open(&mut client, "stay").await;
    console.run(40, 2).await;

    // A graceful stop after the re-exec: the QEMU is reaped by the new image, no zombie left.
    let request = pb::StopVmRequest { name: "stay".into(), force: false, timeout_seconds: 60 };
    let vm = client.stop_vm(request).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Stopped);
    assert!(wait_until(Duration::from_secs(10), || reaped(qemu[0]).then_some(())).is_some(), "QEMU {} reaped", qemu[0]);

    // A QEMU killed behind the daemon's back after the re-exec: noticed (crashed) and reaped.
    qx_test_infra::kill_pid(qemu[1] as i32);
    let crashed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if state(&get(&mut client, "victim").await) == pb::VmState::Crashed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(crashed.is_ok(), "the killed VM is crashed");
    assert!(wait_until(Duration::from_secs(10), || reaped(qemu[1]).then_some(())).is_some(), "QEMU {} reaped", qemu[1]);
}
