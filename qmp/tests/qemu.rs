//! `QmpClient` against a real `qemu-system-x86_64` (7.2 on Quantix hosts and CI).
//!
//! Each test starts its own QEMU with `-machine none` (no guest, starts in milliseconds) and a QMP socket in a
//! temp dir; the [`Qemu`] guard kills and reaps it by PID when the test ends, passed or failed.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qx_qmp::{ConnectOptions, Error, Event, QmpClient};
use serde_json::{json, Value};
use tokio::sync::broadcast;

const QEMU: &str = "qemu-system-x86_64";
const WAIT: Duration = Duration::from_secs(10);

/// A QEMU process this test started. Dropping it kills and reaps exactly that process.
struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
}

impl Qemu {
    fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("qx-qmp-test-").tempdir().expect("temp dir");
        let log = std::fs::File::create(dir.path().join("qemu.log")).expect("QEMU log file");
        let socket = dir.path().join("qmp.sock");
        let child = Command::new(QEMU)
            .args(["-machine", "none", "-nodefaults", "-no-user-config", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {QEMU}: {e}. The qx-qmp integration tests need QEMU 7.2 on PATH \
                     (Debian: apt-get install qemu-system-x86)"
                )
            });
        Self { child, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    fn pid(&self) -> rustix::process::Pid {
        rustix::process::Pid::from_child(&self.child)
    }

    async fn connect(&self) -> QmpClient {
        let opts = ConnectOptions { connect_timeout: WAIT, command_timeout: WAIT };
        match QmpClient::connect(self.socket(), opts).await {
            Ok(client) => client,
            Err(e) => panic!("QMP connect failed: {e} ({:?}); QEMU log:\n{}", e, self.log()),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    /// Waits for QEMU to exit by itself (e.g. after `quit`).
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait on QEMU") {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "QEMU did not exit within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // `Child::kill` does nothing once the child is reaped, so this never signals a recycled PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- QEMU log ---\n{}", self.log());
        }
    }
}

async fn next_qemu_event(events: &mut broadcast::Receiver<Event>) -> qx_qmp::QmpEvent {
    match tokio::time::timeout(WAIT, events.recv()).await.expect("no event in time").expect("event channel") {
        Event::Qemu(event) => event,
        Event::Closed { reason } => panic!("connection closed: {reason}"),
    }
}

async fn next_closed(events: &mut broadcast::Receiver<Event>) -> String {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await.expect("no Closed in time").expect("event channel") {
            Event::Closed { reason } => return reason,
            Event::Qemu(_) => continue,
        }
    }
}

fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    rustix::pipe::pipe().expect("pipe")
}

#[tokio::test]
async fn greeting_and_query_status() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let greeting = qmp.greeting();
    assert_eq!(greeting.major, 7, "{greeting:?}");
    assert!(greeting.capabilities.iter().any(|c| c == "oob"), "{greeting:?}");

    let status = qmp.execute_raw("query-status", None).await.unwrap();
    assert_eq!(status["status"], "running", "{status}");
    assert_eq!(status["running"], true, "{status}");
}

#[tokio::test]
async fn typed_commands_whose_types_match_7_2() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;

    let version = qmp.execute(qapi_qmp::query_version {}).await.unwrap();
    assert_eq!(version.qemu.major, 7);
    assert_eq!(version.qemu.minor, qmp.greeting().minor as i64);

    let status = qmp.execute(qapi_qmp::query_status {}).await.unwrap();
    assert!(status.running);
    assert!(matches!(status.status, qapi_qmp::RunState::running));
}

#[tokio::test]
async fn query_machines_needs_the_raw_path_on_7_2() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;

    let machines = qmp.execute_raw("query-machines", None).await.unwrap();
    let names: Vec<&str> = machines.as_array().unwrap().iter().filter_map(|m| m["name"].as_str()).collect();
    assert!(names.contains(&"none"), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("pc-q35-")), "{names:?}");

    // qapi-qmp 0.15 follows QEMU 9.1, whose MachineInfo has a required `acpi` member that 7.2 lacks. This is why
    // the raw path exists; if it starts decoding, the typed path became usable for it.
    let typed = qmp.execute(qapi_qmp::query_machines { compat_props: None }).await;
    assert!(matches!(typed, Err(Error::Decode { .. })), "{typed:?}");
    // A decode failure leaves the connection usable.
    qmp.execute_raw("query-status", None).await.unwrap();
}

#[tokio::test]
async fn stop_and_cont_emit_events() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let mut events = qmp.subscribe();
    let mut second = qmp.subscribe();

    qmp.execute_raw("stop", None).await.unwrap();
    let stop = next_qemu_event(&mut events).await;
    assert_eq!(stop.name, "STOP");
    assert!(stop.seconds > 0, "{stop:?}");
    assert_eq!(qmp.execute_raw("query-status", None).await.unwrap()["status"], "paused");

    qmp.execute_raw("cont", None).await.unwrap();
    assert_eq!(next_qemu_event(&mut events).await.name, "RESUME");
    assert_eq!(qmp.execute_raw("query-status", None).await.unwrap()["status"], "running");

    assert_eq!(next_qemu_event(&mut second).await.name, "STOP");
    assert_eq!(next_qemu_event(&mut second).await.name, "RESUME");
}

#[tokio::test]
async fn unknown_command_is_command_not_found() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    match qmp.execute_raw("no-such-command", None).await.unwrap_err() {
        Error::Command { command, class, desc } => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        err => panic!("{err:?}"),
    }
    let err = qmp.execute_raw("query-status", Some(json!({"bogus": 1}))).await.unwrap_err();
    assert_eq!(err.class(), Some("GenericError"), "{err:?}");
    assert!(!qmp.is_closed());
}

#[tokio::test]
async fn concurrent_commands() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let qmp = qmp.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    qmp.execute_raw("query-status", None).await.map(|v| v["status"].clone())
                } else {
                    qmp.execute_raw("query-version", None).await.map(|v| v["qemu"]["major"].clone())
                }
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let value = task.await.unwrap().unwrap();
        let expected = if i % 2 == 0 { json!("running") } else { json!(7) };
        assert_eq!(value, expected, "task {i}");
    }
}

#[tokio::test]
async fn getfd_then_closefd() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let (read, _write) = pipe();

    qmp.getfd("test-pipe", read.as_fd()).await.unwrap();
    qmp.closefd("test-pipe").await.unwrap();
    // QEMU really held it: a second close finds nothing.
    let err = qmp.closefd("test-pipe").await.unwrap_err();
    assert_eq!(err.class(), Some("GenericError"), "{err:?}");

    // Without a descriptor attached, getfd fails: the fd has to ride on the command itself.
    let err = qmp.execute_raw("getfd", Some(json!({"fdname": "nothing"}))).await.unwrap_err();
    assert_eq!(err.class(), Some("GenericError"), "{err:?}");
}

#[tokio::test]
async fn add_fd_shows_in_query_fdsets() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let (read, write) = pipe();

    let first = qmp.add_fd(None, Some("disk0"), read.as_fd()).await.unwrap();
    let second = qmp.add_fd(Some(first.fdset_id), None, write.as_fd()).await.unwrap();
    assert_eq!(second.fdset_id, first.fdset_id);
    assert_ne!(second.fd, first.fd);

    let fdsets = qmp.execute_raw("query-fdsets", None).await.unwrap();
    let fdset = fdsets
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["fdset-id"] == first.fdset_id)
        .unwrap_or_else(|| panic!("fdset {} missing from {fdsets}", first.fdset_id));
    let fds: Vec<&Value> = fdset["fds"].as_array().unwrap().iter().collect();
    let entry = fds.iter().find(|f| f["fd"] == first.fd).unwrap_or_else(|| panic!("{fdset}"));
    assert_eq!(entry["opaque"], "disk0");
    assert!(fds.iter().any(|f| f["fd"] == second.fd), "{fdset}");

    qmp.execute_raw("remove-fd", Some(json!({"fdset-id": first.fdset_id}))).await.unwrap();
}

#[tokio::test]
async fn quit_closes_the_connection() {
    let mut qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let mut events = qmp.subscribe();

    qmp.execute_raw("quit", None).await.unwrap();
    let reason = next_closed(&mut events).await;
    assert!(!reason.is_empty());
    tokio::time::timeout(WAIT, qmp.closed()).await.expect("closed() did not resolve");
    assert!(qmp.is_closed());

    let err = tokio::time::timeout(WAIT, qmp.execute_raw("query-status", None)).await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Closed { .. }), "{err:?}");
    assert!(qemu.wait_exit().await.success());
}

#[tokio::test]
async fn killed_qemu_fails_the_waiting_command() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let mut events = qmp.subscribe();

    // A stopped QEMU reads nothing, so the command below stays pending until the kill.
    rustix::process::kill_process(qemu.pid(), rustix::process::Signal::STOP).unwrap();
    let mut waiting = {
        let qmp = qmp.clone();
        tokio::spawn(async move { qmp.execute_raw("query-status", None).await })
    };
    // A bounded wait for what must not happen: an answer from the stopped QEMU within 200 ms.
    let answered = tokio::time::timeout(Duration::from_millis(200), &mut waiting).await;
    assert!(answered.is_err(), "a stopped QEMU answered: {answered:?}");
    rustix::process::kill_process(qemu.pid(), rustix::process::Signal::KILL).unwrap();

    let result = tokio::time::timeout(WAIT, waiting).await.expect("pending command hung").unwrap();
    match result {
        Err(Error::Closed { command }) => assert_eq!(command, "query-status"),
        other => panic!("{other:?}"),
    }
    next_closed(&mut events).await;
    assert!(qmp.is_closed());
}

#[tokio::test]
async fn reconnect_after_dropping_the_client() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    qmp.execute_raw("query-status", None).await.unwrap();
    drop(qmp);
    // QEMU serves one QMP client at a time: a second connection only gets its greeting once the first is closed,
    // so this passes only if dropping the client really closed the socket.
    let qmp = qemu.connect().await;
    assert_eq!(qmp.execute_raw("query-status", None).await.unwrap()["status"], "running");
}

#[tokio::test]
async fn query_machines_is_typed_in_7_2s_shape() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let machines = qmp.execute(qx_qmp::commands::QueryMachines {}).await.unwrap();
    let q35 = machines.iter().find(|m| m.alias.as_deref() == Some("q35")).expect("a q35 alias");
    assert!(q35.name.starts_with("pc-q35-7."), "{q35:?}");
    assert!(q35.hotpluggable_cpus && q35.cpu_max > 1, "{q35:?}");
}

#[tokio::test]
async fn events_and_run_states_are_typed() {
    let qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let mut events = qmp.subscribe();
    assert_eq!(qmp.query_status().await.unwrap(), qx_qmp::Status { running: true, state: qx_qmp::RunState::Running });
    qmp.execute(qapi_qmp::stop {}).await.unwrap();
    assert_eq!(next_qemu_event(&mut events).await.typed(), qx_qmp::QemuEvent::Stop);
    let status = qmp.query_status().await.unwrap();
    assert_eq!((status.running, status.state.as_str()), (false, "paused"));
    qmp.execute(qapi_qmp::cont {}).await.unwrap();
    assert_eq!(next_qemu_event(&mut events).await.typed(), qx_qmp::QemuEvent::Resume);
    // A device_del of a device that does not exist is QEMU's clean error, typed or not.
    let err = qmp.execute(qapi_qmp::device_del { id: "nope".into() }).await.unwrap_err();
    assert_eq!(err.class(), Some("DeviceNotFound"), "{err}");
}
