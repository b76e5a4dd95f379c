//! `QgaClient` against a real guest agent: Debian's `qemu-ga` 7.2 running on the host with
//! `--method unix-listen` (installed by `scripts/install-deps.sh`). The fake-agent cases (never answers, stale
//! replies) are unit tests in `src/qga.rs`.
//!
//! The agent runs as the test's user on this host, so the RPCs that would act on the host (shutdown, suspend,
//! freeze, writes, passwords, keys) are disabled with `-b`; the tests check that a disabled command is a clean
//! error. Each test starts its own agent and the [`Agent`] guard kills and reaps exactly that process.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qx_qmp::qga::{FreezeStatus, GuestExec, QgaClient, QgaError, QgaOptions};

const QEMU_GA: &str = "qemu-ga";
const WAIT: Duration = Duration::from_secs(10);
/// What must never run against the host this test runs on.
const BLOCKED: &str = "guest-shutdown,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,\
guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fstrim,guest-set-time,guest-set-user-password,\
guest-set-vcpus,guest-set-memory-blocks,guest-file-open,guest-file-write,guest-ssh-add-authorized-keys,\
guest-ssh-remove-authorized-keys,guest-network-get-interfaces";
/// [`BLOCKED`] but for the file commands, for a test that only opens files in its own directory.
const BLOCKED_BUT_FILES: &str = "guest-shutdown,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,\
guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fstrim,guest-set-time,guest-set-user-password,\
guest-set-vcpus,guest-set-memory-blocks,guest-ssh-add-authorized-keys,guest-ssh-remove-authorized-keys,\
guest-network-get-interfaces";

struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start() -> Self {
        Self::start_blocking(BLOCKED)
    }

    /// An agent with `blocked` RPCs disabled.
    fn start_blocking(blocked: &str) -> Self {
        let scratch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let dir = tempfile::Builder::new().prefix("qx-qga-").tempdir_in(&scratch).expect("temp dir").keep();
        let socket = dir.join("qga.sock");
        let child = Command::new(QEMU_GA)
            .args(["--method", "unix-listen", "--path"])
            .arg(&socket)
            .arg("--pidfile")
            .arg(dir.join("qemu-ga.pid"))
            .arg("--statedir")
            .arg(&dir)
            .args(["--block-rpcs", blocked])
            .arg("--logfile")
            .arg(dir.join("qemu-ga.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {QEMU_GA}: {e}. The QGA tests need the guest agent on PATH \
                     (scripts/install-deps.sh; Debian: apt-get install qemu-guest-agent)"
                )
            });
        Self { child, dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }

    async fn connect(&self) -> QgaClient {
        let opts = QgaOptions { connect_timeout: WAIT, ..QgaOptions::default() };
        match QgaClient::connect(self.socket(), opts).await {
            Ok(client) => client,
            Err(e) => panic!("connecting to qemu-ga failed: {e:?}; log:\n{}", self.log()),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu-ga.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // `Child::kill` does nothing once the child is reaped, so this never signals a recycled PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn ping_info_and_sync_against_a_real_agent() {
    let agent = Agent::start();
    let client = agent.connect().await;
    client.ping().await.unwrap();
    let info = client.info().await.unwrap();
    assert!(info.version.starts_with("7."), "{info:?}");
    assert!(info.supports("guest-ping"));
    assert!(info.supports("guest-sync-delimited"));
    assert!(!info.supports("guest-shutdown"), "the test agent must not be able to shut the host down");
    // Resyncing again and again keeps the stream in step: the agent's 0xFF parse errors are skipped.
    for _ in 0..3 {
        client.sync().await.unwrap();
        client.ping().await.unwrap();
    }
    assert_eq!(client.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
    let host = client.host_name().await.unwrap();
    assert!(!host.is_empty());
    let os = client.osinfo().await.unwrap();
    assert!(os.kernel_release.is_some(), "{os:?}");
}

#[tokio::test]
async fn exec_runs_with_7_2_capture_output_and_returns_the_output() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let exec = GuestExec {
        path: "/bin/sh".into(),
        args: vec!["-c".into(), "read line; echo \"got $line\"; echo oops >&2; exit 3".into()],
        input: Some(b"hello\n".to_vec()),
        capture_output: true,
        ..GuestExec::default()
    };
    let pid = client.exec(&exec).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let status = loop {
        let status = client.exec_status(pid).await.unwrap();
        if status.exited {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "the program did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.exit_code, Some(3));
    assert_eq!(status.stdout, b"got hello\n");
    assert_eq!(status.stderr, b"oops\n");
    assert!(!status.truncated);
}

#[tokio::test]
async fn a_disabled_command_is_a_clean_error_and_the_channel_goes_on() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let err = client.fsfreeze_freeze().await.unwrap_err();
    match &err {
        QgaError::Command { command, class, desc } => {
            assert_eq!(command, "guest-fsfreeze-freeze");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("disabled"), "{desc}");
        }
        other => panic!("{other:?}"),
    }
    let err = client.execute_raw("guest-no-such-command", None, WAIT).await.unwrap_err();
    assert!(matches!(&err, QgaError::Command { class, .. } if class == "CommandNotFound"), "{err:?}");
    client.ping().await.unwrap();
    // Thawing with nothing frozen is harmless and answers 0.
    assert_eq!(client.fsfreeze_thaw().await.unwrap(), 0);
}

#[tokio::test]
async fn a_second_client_after_the_first_is_gone_syncs_cleanly() {
    let agent = Agent::start();
    {
        let first = agent.connect().await;
        first.ping().await.unwrap();
        // A command written but never answered to this client (it leaves): its answer must not reach the next.
        let _ = first.execute_raw("guest-info", None, Duration::from_millis(1)).await;
    }
    let second = agent.connect().await;
    second.ping().await.unwrap();
    assert_eq!(second.fsfreeze_status().await.unwrap(), FreezeStatus::Thawed);
}

#[tokio::test]
async fn an_agent_that_went_away_is_reported_not_awaited() {
    let mut agent = Agent::start();
    let client = agent.connect().await;
    client.ping().await.unwrap();
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let err =
        tokio::time::timeout(WAIT, client.ping()).await.expect("a gone agent must not hang the client").unwrap_err();
    assert!(matches!(err, QgaError::Closed { .. } | QgaError::Send { .. }), "{err:?}");
}

#[tokio::test]
async fn timezone_and_file_systems_decode_as_qapi_qga_types() {
    let agent = Agent::start();
    let client = agent.connect().await;
    let tz = client.timezone().await.unwrap();
    assert!(tz.offset.abs() <= 14 * 3600, "{tz:?}");
    let filesystems = client.fsinfo().await.unwrap();
    assert!(filesystems.iter().any(|fs| fs.mountpoint == "/"), "{filesystems:?}");
    // A blocked command through the typed path is the same clean error.
    let err = client.network_interfaces().await.unwrap_err();
    assert!(matches!(&err, QgaError::Command { class, .. } if class == "CommandNotFound"), "{err:?}");
}

#[tokio::test]
async fn a_file_written_through_the_agent_reads_back_whole() {
    let agent = Agent::start_blocking(BLOCKED_BUT_FILES);
    let client = agent.connect().await;
    let path = agent.dir.join("file.bin");
    let path_text = path.to_str().unwrap();
    // More than one chunk, and bytes that are not text.
    let content: Vec<u8> = (0..qx_qmp::qga::FILE_CHUNK + 4099).map(|i| (i % 251) as u8).collect();
    client.write_file(path_text, &content).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content, "what the agent wrote on disk");
    assert_eq!(client.read_file(path_text, content.len()).await.unwrap(), content);
    let err = client.read_file(path_text, content.len() - 1).await.unwrap_err();
    assert!(matches!(err, QgaError::FileTooLarge { .. }), "{err:?}");
    let err = client.read_file("/nonexistent/qx-file", 10).await.unwrap_err();
    assert!(
        matches!(&err, QgaError::Command { command, desc, .. } if command == "guest-file-open" && desc.contains("No such file")),
        "{err:?}"
    );
    // No handle is left open: the agent answers and the file is still whole.
    client.ping().await.unwrap();
    assert_eq!(client.read_file(path_text, content.len()).await.unwrap().len(), content.len());
}
