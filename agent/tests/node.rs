//! qx-node end to end: the real daemon binary, real QEMU under TCG booting the test guest, real gRPC over the
//! daemon's unix socket, and qxctl as an operator runs it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod common;
mod tls_common;

use common::*;
use qx_agent::client::connect;
use qx_proto::node::v1 as pb;
use qx_test_infra::{pid_alive, test_guest, wait_until, Daemon, READY_LINE};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_create_boot_pause_resume_reboot_stop_update_delete() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let mut events = client.watch_events(pb::WatchEventsRequest { vm: "life".into() }).await.unwrap().into_inner();

    let disk = daemon.data_dir().parent().unwrap().join("data.raw");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    let extra = format!("nics:\n  - kind: user\ndisks:\n  - path: {}\n    read_only: true\n", disk.display());
    let spec_text = test_guest().spec_yaml("life", &extra);
    let vm = client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Stopped);
    let vm = start(&mut client, "life").await;
    assert_eq!(state(&vm), pb::VmState::Running);
    assert!(pid_alive(pid(&vm) as i32));
    let mut console = boot(&mut client, "life").await;
    console.run(20, 22).await;
    console
        .input
        .send(pb::ConsoleInput { data: b"cat /sys/block/vda/ro /sys/block/vda/size\n".to_vec(), ..Default::default() })
        .await
        .unwrap();
    console.expect("1\r\n32768", Duration::from_secs(30)).await;

    let vm = client.pause_vm(pb::VmRef { name: "life".into() }).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Paused);
    let vm = client.resume_vm(pb::VmRef { name: "life".into() }).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Running);
    console.run(1, 2).await;

    let qemu = pid(&vm);
    let vm = client.reboot_vm(pb::VmRef { name: "life".into() }).await.unwrap().into_inner();
    assert_eq!((state(&vm), pid(&vm)), (pb::VmState::Running, qemu), "a reboot keeps the QEMU process");
    console.expect_count(READY_LINE, 2, BOOT_TIMEOUT).await;

    let request = pb::StopVmRequest { name: "life".into(), force: false, timeout_seconds: 60 };
    let vm = client.stop_vm(request).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Stopped);
    assert_eq!(vm.runtime.unwrap().last_reason, "the guest powered off", "the power button was answered");
    assert!(daemon.qemu_pids().is_empty(), "QEMU is gone after a graceful stop");

    let mut spec = vm.spec.unwrap();
    spec.memory_mib = 192;
    let updated = client.update_vm(pb::UpdateVmRequest { spec: Some(spec.clone()), spec_text: String::new() }).await;
    let updated = updated.unwrap().into_inner().spec.unwrap();
    assert_eq!((updated.memory_mib, &updated.uuid, &updated.nics), (192, &spec.uuid, &spec.nics));

    client.delete_vm(pb::VmRef { name: "life".into() }).await.unwrap();
    let missing = client.get_vm(pb::VmRef { name: "life".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(!daemon.data_dir().join("vms/life").exists());

    let mut seen = Vec::new();
    while let Ok(Ok(Some(event))) = tokio::time::timeout(Duration::from_secs(5), events.message()).await {
        seen.push((pb::VmState::try_from(event.state).unwrap(), event.reason));
        if seen.last().unwrap().1 == "deleted" {
            break;
        }
    }
    let states: Vec<pb::VmState> = seen.iter().map(|(s, _)| *s).collect();
    use pb::VmState::*;
    assert_eq!(
        states,
        [Stopped, Starting, Running, Paused, Running, Running, Stopping, Stopped, Unspecified],
        "events: {seen:?}"
    );
}

/// `qxctl vm start --paused` (StartVm with `paused`): QEMU runs with every device plugged but the guest has not run
/// an instruction: the serial console, where the booting kernel prints within a second under TCG, stays empty. A
/// restarted daemon finds QEMU in `prelaunch` and keeps the VM paused (a start cut short would be stopped); ResumeVm
/// boots it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_started_paused_runs_nothing_until_resumed() {
    let mut daemon = daemon();
    let mut client = client(&daemon).await;
    create(&mut client, "held").await;
    let output = Command::new(env!("CARGO_BIN_EXE_qxctl"))
        .arg("--socket")
        .arg(daemon.socket())
        .args(["vm", "start", "held", "--paused"])
        .output()
        .unwrap();
    assert!(output.status.success(), "qxctl: {}", String::from_utf8_lossy(&output.stderr));
    let vm = get(&mut client, "held").await;
    let qemu = pid(&vm);
    assert_eq!(state(&vm), pb::VmState::Paused);
    assert!(pid_alive(qemu as i32));
    let console_log = daemon.data_dir().join("vms/held/console.log");
    let silent = |what: &str| {
        let printed = std::fs::read(&console_log).unwrap_or_default();
        assert!(printed.is_empty(), "{what}: the guest printed {:?}", String::from_utf8_lossy(&printed));
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    silent("3 s after a paused start");
    let state_file = daemon.data_dir().join("vms/held/state.json");
    let on_disk = std::fs::read_to_string(&state_file).unwrap();
    assert!(on_disk.contains("\"paused\""), "state.json is written before StartVm answers: {on_disk}");

    daemon.kill9();
    daemon.restart();
    let mut client = connect(daemon.socket()).await.unwrap();
    let vm = get(&mut client, "held").await;
    assert_eq!((state(&vm), pid(&vm)), (pb::VmState::Paused, qemu), "reattached, still paused");
    let reason = vm.runtime.as_ref().map(|r| r.last_reason.clone()).unwrap_or_default();
    assert!(reason.contains("QEMU reports prelaunch"), "query-status at reattach: {reason}");
    silent("after the daemon restart");

    let mut console = Console::open(&mut client, "held").await;
    let vm = client.resume_vm(pb::VmRef { name: "held".into() }).await.unwrap().into_inner();
    assert_eq!((state(&vm), pid(&vm)), (pb::VmState::Running, qemu));
    console.expect(READY_LINE, BOOT_TIMEOUT).await;
    console.run(40, 2).await;
    let logged = || std::fs::metadata(&console_log).ok().filter(|m| m.len() > 0).map(|_| ());
    assert!(wait_until(Duration::from_secs(10), logged).is_some(), "console.log records what the guest prints");
    let request = pb::StopVmRequest { name: "held".into(), force: true, timeout_seconds: 0 };
    assert_eq!(state(&client.stop_vm(request).await.unwrap().into_inner()), pb::VmState::Stopped);
    assert!(!pid_alive(qemu as i32));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_survive_a_daemon_kill_and_are_reattached() {
    let mut daemon = daemon();
    let mut client = client(&daemon).await;
    let mut pids = Vec::new();
    for name in ["keep1", "keep2"] {
        create(&mut client, name).await;
        pids.push(pid(&start(&mut client, name).await));
    }
    for name in ["keep1", "keep2"] {
        boot(&mut client, name).await;
    }

    daemon.kill9();
    assert!(pids.iter().all(|pid| pid_alive(*pid as i32)), "QEMU outlives the daemon");
    daemon.restart();
    let mut client = connect(daemon.socket()).await.unwrap();

    let vms = client.list_vms(pb::ListVmsRequest {}).await.unwrap().into_inner().vms;
    let listed: Vec<(pb::VmState, u32)> = vms.iter().map(|vm| (state(vm), pid(vm))).collect();
    assert_eq!(listed, [(pb::VmState::Running, pids[0]), (pb::VmState::Running, pids[1])]);
    for (i, name) in ["keep1", "keep2"].into_iter().enumerate() {
        let mut console = Console::open(&mut client, name).await;
        console.run(100, i as u32).await;
    }
    for name in ["keep1", "keep2"] {
        let request = pb::StopVmRequest { name: name.into(), force: false, timeout_seconds: 60 };
        let vm = client.stop_vm(request).await.unwrap().into_inner();
        assert_eq!(state(&vm), pb::VmState::Stopped);
    }
    assert!(wait_until(Duration::from_secs(5), || pids.iter().all(|p| !pid_alive(*p as i32)).then_some(())).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_makes_the_vm_crashed_and_is_reported() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    create(&mut client, "victim").await;
    let mut events = client.watch_events(pb::WatchEventsRequest { vm: "victim".into() }).await.unwrap().into_inner();
    let qemu = pid(&start(&mut client, "victim").await) as i32;

    qx_test_infra::kill_pid(qemu);
    let crashed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = events.message().await.unwrap() {
            if event.state == pb::VmState::Crashed as i32 {
                return event;
            }
        }
        panic!("event stream ended");
    })
    .await
    .expect("a crashed event within 10 s");
    assert!(crashed.reason.contains("unexpectedly"), "{}", crashed.reason);
    let vm = get(&mut client, "victim").await;
    assert_eq!(state(&vm), pb::VmState::Crashed);
    assert_eq!(pid(&vm), 0);

    // A crashed VM starts again like a stopped one.
    let vm = start(&mut client, "victim").await;
    assert_eq!(state(&vm), pb::VmState::Running);
    let request = pb::StopVmRequest { name: "victim".into(), force: true, timeout_seconds: 0 };
    assert_eq!(state(&client.stop_vm(request).await.unwrap().into_inner()), pb::VmState::Stopped);
}

/// A QEMU binary for qx-node that logs each VM launch to `spawns` and holds it until `release` exists: while it
/// waits, the daemon is inside StartVm's spawn, for as long as the test wants.
struct HeldQemu {
    dir: tempfile::TempDir,
}

impl HeldQemu {
    fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("qx-held-qemu-").tempdir().unwrap();
        let qemu = qx_test_infra::ovs::find_program("qemu-system-x86_64").expect("qemu-system-x86_64");
        let script = format!(
            "#!/bin/sh\n# VM launches name a pidfile; probes (-version, capabilities) pass straight through.\n\
             case \" $* \" in *\" -pidfile \"*)\n  echo \"$$ $*\" >> {dir}/spawns\n  \
             while [ ! -e {dir}/release ]; do sleep 0.05; done ;;\nesac\nexec {qemu} \"$@\"\n",
            dir = dir.path().display(),
            qemu = qemu.display()
        );
        let path = dir.path().join("qemu");
        std::fs::write(&path, script).unwrap();
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&path, perms).unwrap();
        Self { dir }
    }

    fn daemon(&self) -> Daemon {
        test_guest();
        let config = format!("qemu_binary: {}\n", self.dir.path().join("qemu").display());
        Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(&config))
    }

    /// The launches so far whose command line holds `needle` (a VM's uuid).
    fn spawns(&self, needle: &str) -> usize {
        let log = std::fs::read_to_string(self.dir.path().join("spawns")).unwrap_or_default();
        log.lines().filter(|l| l.contains(needle)).count()
    }

    fn release(&self) {
        std::fs::write(self.dir.path().join("release"), "").unwrap();
    }
}

impl Drop for HeldQemu {
    fn drop(&mut self) {
        // A held launch must not outlive a failed test.
        self.release();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_starts_spawn_one_qemu() {
    let held = HeldQemu::new();
    let daemon = held.daemon();
    let mut client = client(&daemon).await;
    let uuid = create(&mut client, "race").await.spec.unwrap().uuid;
    let start_race = |mut client: Client| async move {
        client
            .start_vm(pb::StartVmRequest { name: "race".into(), paused: false })
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    };
    // The first start is held inside its QEMU spawn; the second arrives while it is.
    let first = tokio::spawn(start_race(client.clone()));
    let spawning = wait_until(Duration::from_secs(30), || (held.spawns(&uuid) == 1).then_some(()));
    assert!(spawning.is_some(), "the first start never reached the spawn");
    let mut second = tokio::spawn(start_race(client.clone()));
    // Bounded wait for what must not happen: the second start succeeding while the first still spawns.
    if let Ok(outcome) = tokio::time::timeout(Duration::from_millis(500), &mut second).await {
        assert_eq!(outcome.unwrap(), Err(Code::FailedPrecondition), "the second start, refused during the first");
    }
    assert!(!first.is_finished(), "the first start is still held");
    held.release();
    let outcomes = [first.await.unwrap(), second.await.unwrap()];
    assert_eq!(outcomes, [Ok(()), Err(Code::FailedPrecondition)]);
    assert_eq!(held.spawns(&uuid), 1, "one QEMU was spawned for the two starts");
    assert_eq!(qx_test_infra::pids_with_arg(&uuid).len(), 1, "exactly one QEMU runs the VM");
    let request = pb::StopVmRequest { name: "race".into(), force: true, timeout_seconds: 0 };
    client.stop_vm(request).await.unwrap();
}

/// StartVm answers before `running` reaches state.json (the write is deferred off the critical path). A daemon
/// killed in that window leaves `starting` on disk next to a running QEMU: the restarted daemon takes it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_before_running_is_written_reattaches_the_vm() {
    let held = HeldQemu::new();
    let mut daemon = held.daemon();
    let mut client = client(&daemon).await;
    let uuid = create(&mut client, "window").await.spec.unwrap().uuid;
    let state_file = daemon.data_dir().join("vms/window/state.json");
    let starting = tokio::spawn({
        let mut client = client.clone();
        async move { client.start_vm(pb::StartVmRequest { name: "window".into(), paused: false }).await }
    });
    // While QEMU is held, state.json holds what the window leaves on disk: `starting`, no pid.
    assert!(wait_until(Duration::from_secs(30), || (held.spawns(&uuid) == 1).then_some(())).is_some());
    let on_disk = std::fs::read(&state_file).unwrap();
    assert!(String::from_utf8_lossy(&on_disk).contains("\"starting\""), "{}", String::from_utf8_lossy(&on_disk));
    held.release();
    let vm = starting.await.unwrap().expect("StartVm").into_inner();
    let qemu = pid(&vm);
    daemon.kill9();
    // Whether or not the deferred write won the race with the kill, put back what the window leaves.
    std::fs::write(&state_file, &on_disk).unwrap();
    assert!(pid_alive(qemu as i32), "QEMU outlives the daemon");

    daemon.restart();
    let mut client = connect(daemon.socket()).await.unwrap();
    let vm = get(&mut client, "window").await;
    assert_eq!((state(&vm), pid(&vm)), (pb::VmState::Running, qemu), "reattached to the same QEMU");
    let written = || std::fs::read_to_string(&state_file).ok().filter(|s| s.contains("\"running\"")).map(|_| ());
    assert!(wait_until(Duration::from_secs(10), written).is_some(), "state.json says running again");
    // The daemon drives that QEMU over QMP again.
    let vm = client.pause_vm(pb::VmRef { name: "window".into() }).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Paused);
    let vm = client.resume_vm(pb::VmRef { name: "window".into() }).await.unwrap().into_inner();
    assert_eq!(state(&vm), pb::VmState::Running);
    let request = pb::StopVmRequest { name: "window".into(), force: true, timeout_seconds: 0 };
    assert_eq!(state(&client.stop_vm(request).await.unwrap().into_inner()), pb::VmState::Stopped);
    assert!(!pid_alive(qemu as i32));
}

/// Every file under `dir`, with its contents, to prove a refused request changed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_the_field_and_changes_nothing() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    create(&mut client, "existing").await;
    let running = pid(&start(&mut client, "existing").await);
    // `running` reaches state.json just after StartVm answers.
    let state_file = daemon.data_dir().join("vms/existing/state.json");
    let written = || std::fs::read_to_string(&state_file).ok().filter(|s| s.contains("\"running\"")).map(|_| ());
    assert!(wait_until(Duration::from_secs(10), written).is_some(), "state.json never said running");
    let before = snapshot(&daemon.data_dir());
    let guest = test_guest();

    let bad_texts = [
        ("name: \"a/b\"\nkernel:\n  kernel: /k\n", "name"),
        (&guest.spec_yaml("zero", "vcpus: 0\n") as &str, "vcpus"),
        (&guest.spec_yaml("huge", "memory_mib: 99999999999\n"), "memory_mib"),
        (&guest.spec_yaml("tiny", "memory_mib: 0\n"), "memory_mib"),
        (&guest.spec_yaml("\"ctl\\x01x\"", ""), "name"),
        (&guest.spec_yaml("..", ""), "name"),
        (&guest.spec_yaml("nodisk", "disks:\n  - path: /no/such/image.qcow2\n    format: qcow2\n"), "disks[0].path"),
        (&guest.spec_yaml("typo", "memroy_mib: 5\n"), "memroy_mib"),
        (&guest.spec_yaml("badmac", "nics:\n  - mac: 01:02:03:04:05:06\n"), "nics[0].mac"),
        (&guest.spec_yaml("existing", ""), "existing"),
        ("{not yaml", "spec_text"),
    ];
    for (text, field) in bad_texts {
        let status =
            client.create_vm(pb::CreateVmRequest { spec: None, spec_text: text.to_owned() }).await.expect_err(text);
        let expected = if field == "existing" { Code::AlreadyExists } else { Code::InvalidArgument };
        assert_eq!(status.code(), expected, "{text}: {status:?}");
        assert!(status.message().contains(field), "{field} not named in {:?}", status.message());
    }

    let message_spec = pb::VmSpec { name: "msg".into(), vcpus: 1, memory_mib: 5, ..Default::default() };
    let status =
        client.create_vm(pb::CreateVmRequest { spec: Some(message_spec), spec_text: String::new() }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("memory_mib") && status.message().contains("kernel"), "{}", status.message());

    let status = client
        .update_vm(pb::UpdateVmRequest { spec: None, spec_text: guest.spec_yaml("existing", "") })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "update while running: {status:?}");
    let status = client.delete_vm(pb::VmRef { name: "existing".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "delete while running: {status:?}");
    let status = client.start_vm(pb::StartVmRequest { name: "nope".into(), paused: false }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let qxctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_qxctl")).arg("--socket").arg(daemon.socket()).args(args).output().unwrap()
    };
    let output = qxctl(&["vm", "create", "--name", "bad/name", "--memory", "0", "--kernel", "/no/kernel"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for field in ["InvalidArgument", "name", "memory_mib", "kernel.kernel"] {
        assert!(stderr.contains(field), "{field} missing from qxctl's error: {stderr}");
    }
    let spec_file = daemon.data_dir().parent().unwrap().join("bad.yaml");
    std::fs::write(&spec_file, "name: x\nvcpus: many\n").unwrap();
    let output = qxctl(&["vm", "create", "--file", spec_file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("vcpus"), "{stderr}");

    assert_eq!(snapshot(&daemon.data_dir()), before, "refused requests changed the data dir");
    let vm = get(&mut client, "existing").await;
    assert_eq!((state(&vm), pid(&vm)), (pb::VmState::Running, running));
    let output = Command::new(env!("CARGO_BIN_EXE_qxctl"))
        .arg("--socket")
        .arg(daemon.socket())
        .args(["vm", "console", "existing"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"\x1d")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(output.status.success(), "Ctrl-] detaches: {output:?}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("Detached"), "{output:?}");

    let listed = qxctl(&["vm", "list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("existing"), "the daemon still answers");
    let request = pb::StopVmRequest { name: "existing".into(), force: true, timeout_seconds: 0 };
    client.stop_vm(request).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_info_and_qxctl_json() {
    // An ovsdb-server socket that is certainly absent, whatever the machine runs.
    let config = "ovs:\n  socket: /nonexistent/quantix-test/db.sock\n";
    let daemon = Daemon::start_with(Path::new(env!("CARGO_BIN_EXE_qx-node")), "debug", Some(config));
    let mut client = client(&daemon).await;
    let info = client.get_node_info(pb::GetNodeInfoRequest {}).await.unwrap().into_inner();
    assert!(info.qemu_version.starts_with("7.") || info.qemu_version.contains('.'), "{}", info.qemu_version);
    assert!(info.cpu_count > 0 && info.memory_total_bytes > 0);
    assert!(["kvm", "tcg"].contains(&info.accelerator.as_str()));
    assert!(!info.accelerator_reason.is_empty());

    let output = Command::new(env!("CARGO_BIN_EXE_qxctl"))
        .args(["--json", "--socket"])
        .arg(daemon.socket())
        .args(["node", "info"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("qxctl --json prints JSON");
    assert_eq!(json["accelerator"], info.accelerator);

    let status = client.create_network(pb::Network { name: "n".into(), bridge: "br0".into(), ..Default::default() });
    let status = status.await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "no OVS here: {status:?}");
    assert!(status.message().contains("Open vSwitch is not reachable"), "{}", status.message());

    // A TCP listener only when configured: this daemon has none, the socket is the only way in.
    assert!(!daemon.log_text().contains("listening on TCP"));
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(qx_agent::client::channel(daemon.socket()).await.unwrap());
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest { service: "quantix.node.v1.NodeService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_tcp_listener_serves_the_same_api() {
    // TLS with a client certificate: tests/tls.rs covers what the listener refuses.
    let node = tls_common::TlsNode::start("");
    let files = node.issue("operator", "admin").await;
    let channel = node.channel(&files).await.expect("qx-node answers on its TCP listener");
    let mut client = qx_proto::node::v1::node_service_client::NodeServiceClient::new(channel);
    create(&mut client, "over-tcp").await;
    let mut unix = common::client(&node.daemon).await;
    assert_eq!(get(&mut unix, "over-tcp").await.spec.unwrap().name, "over-tcp", "one node behind both listeners");
}

/// The PCI address of the device holding the host's root file system, read independently of qx-node: the last
/// PCI function on the sysfs path of the block device mounted at `/`. `None` when `/` is not on a PCI disk.
fn root_disk_pci_address() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let source = mounts.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|f| f.get(1) == Some(&"/"))?[0];
    let name = Path::new(source).file_name()?.to_str()?.to_owned();
    let path = std::fs::canonicalize(format!("/sys/class/block/{name}")).ok()?;
    let is_pci =
        |s: &str| s.len() == 12 && s.as_bytes()[4] == b':' && s.as_bytes()[7] == b':' && s.as_bytes()[10] == b'.';
    path.iter().filter_map(|c| c.to_str()).rfind(|c| is_pci(c)).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_devices_are_what_sysfs_has_and_the_ones_the_host_uses_are_kept() {
    let daemon = daemon();
    let mut client = client(&daemon).await;
    let reply = client.list_host_devices(pb::ListHostDevicesRequest {}).await.expect("ListHostDevices").into_inner();
    let mut expected: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    expected.sort();
    let listed: Vec<&str> = reply.devices.iter().map(|d| d.address.as_str()).collect();
    assert_eq!(listed, expected, "every PCI function, in address order");
    let hex = |path: String| {
        u32::from_str_radix(std::fs::read_to_string(path).unwrap().trim().trim_start_matches("0x"), 16).unwrap()
    };
    for device in &reply.devices {
        let dir = format!("/sys/bus/pci/devices/{}", device.address);
        assert_eq!((device.vendor_id, device.device_id), (hex(format!("{dir}/vendor")), hex(format!("{dir}/device"))));
        assert_eq!(device.class_code, hex(format!("{dir}/class")), "{}", device.address);
        let driver =
            std::fs::read_link(format!("{dir}/driver")).ok().and_then(|d| Some(d.file_name()?.to_str()?.to_owned()));
        assert_eq!(device.driver, driver.unwrap_or_default(), "{}", device.address);
        assert_eq!(device.bridge, device.class_code >> 16 == 0x06, "{}", device.address);
    }
    match root_disk_pci_address() {
        Some(root) => {
            let device = reply.devices.iter().find(|d| d.address == root).expect("the root disk's device is listed");
            assert!(!device.host_use.is_empty(), "the disk holding / stays with the host: {device:?}");
            let output = Command::new(env!("CARGO_BIN_EXE_qxctl"))
                .arg("--socket")
                .arg(daemon.socket())
                .args(["node", "devices"])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
            let line = stdout.lines().find(|l| l.starts_with(&root)).unwrap_or_else(|| panic!("{root} in {stdout}"));
            assert!(line.contains(&format!("no: {}", device.host_use)), "{line}");
        }
        None => eprintln!("/ is not on a PCI disk here: the host-use check of the root disk is left out"),
    }
}

/// The cgroup path of `pid` in the v1 hierarchy of `controller` (`/quantix/<uuid>`), from `/proc/<pid>/cgroup`.
fn cgroup_of(pid: u32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == controller).then(|| path.to_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_vm_qemu_runs_in_its_own_cgroup_kept_on_reattach_and_removed_after_exit() {
    if !Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() || !qx_test_infra::ovs::privileged() {
        return qx_test_infra::skip("needs root and cgroup v1 (this machine's) with the memory controller");
    }
    let mut daemon = daemon();
    let mut client = client(&daemon).await;
    let vm = create(&mut client, "cg").await;
    let uuid = vm.spec.unwrap().uuid;
    let qemu = pid(&start(&mut client, "cg").await);
    let expected = format!("/quantix/{uuid}");
    for controller in ["memory", "pids", "cpu"] {
        assert_eq!(cgroup_of(qemu, controller).as_deref(), Some(expected.as_str()), "{controller} cgroup");
    }
    let dir = |controller: &str| Path::new("/sys/fs/cgroup").join(controller).join("quantix").join(&uuid);
    let read = |controller: &str, file: &str| std::fs::read_to_string(dir(controller).join(file)).unwrap();
    // 256 MiB of guest, 512 MiB of QEMU overhead, 1 GiB of TCG translation cache (no KVM here).
    assert_eq!(read("memory", "memory.limit_in_bytes").trim(), ((256u64 + 512 + 1024) << 20).to_string());
    assert_eq!(read("pids", "pids.max").trim(), "1024");
    boot(&mut client, "cg").await;

    daemon.kill9();
    daemon.restart();
    let mut client = connect(daemon.socket()).await.unwrap();
    let vm = get(&mut client, "cg").await;
    assert_eq!((state(&vm), pid(&vm)), (pb::VmState::Running, qemu), "reattached");
    assert_eq!(cgroup_of(qemu, "memory").as_deref(), Some(expected.as_str()), "the cgroup is kept");

    let request = pb::StopVmRequest { name: "cg".into(), force: true, timeout_seconds: 0 };
    assert_eq!(state(&client.stop_vm(request).await.unwrap().into_inner()), pb::VmState::Stopped);
    let gone = wait_until(Duration::from_secs(10), || {
        ["memory", "pids", "cpu"].iter().all(|c| !dir(c).exists()).then_some(())
    });
    assert!(gone.is_some(), "the cgroup is removed after QEMU exits");
}
