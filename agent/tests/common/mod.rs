//! What the agent's end-to-end tests share: a daemon per test, a gRPC client, and a console session that waits
//! for what the guest prints.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use qx_agent::client::connect;
use qx_proto::node::v1 as pb;
use qx_proto::node::v1::node_service_client::NodeServiceClient;
use qx_test_infra::{test_guest, Daemon, READY_LINE};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Several TCG guests boot at once on two cores during the test run; one alone takes about 5 s.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub type Client = NodeServiceClient<Channel>;

pub fn daemon() -> Daemon {
    test_guest();
    Daemon::start(Path::new(env!("CARGO_BIN_EXE_qx-node")))
}

pub async fn client(daemon: &Daemon) -> Client {
    connect(daemon.socket()).await.expect("connect to qx-node")
}

pub async fn create(client: &mut Client, name: &str) -> pb::Vm {
    let spec_text = test_guest().spec_yaml(name, "nics:\n  - kind: user\n");
    client.create_vm(pb::CreateVmRequest { spec: None, spec_text }).await.expect("CreateVm").into_inner()
}

pub async fn start(client: &mut Client, name: &str) -> pb::Vm {
    client.start_vm(pb::StartVmRequest { name: name.into(), paused: false }).await.expect("StartVm").into_inner()
}

pub fn state(vm: &pb::Vm) -> pb::VmState {
    pb::VmState::try_from(vm.state).unwrap_or_default()
}

pub fn pid(vm: &pb::Vm) -> u32 {
    vm.runtime.as_ref().map_or(0, |r| r.pid)
}

pub async fn get(client: &mut Client, name: &str) -> pb::Vm {
    client.get_vm(pb::VmRef { name: name.into() }).await.expect("GetVm").into_inner()
}

/// A console session: output accumulates in `seen`.
pub struct Console {
    pub input: mpsc::Sender<pb::ConsoleInput>,
    pub output: tonic::Streaming<pb::ConsoleOutput>,
    pub seen: String,
}

impl Console {
    pub async fn open(client: &mut Client, name: &str) -> Self {
        let (input, rx) = mpsc::channel(8);
        input.send(pb::ConsoleInput { vm: name.into(), history: true, data: Vec::new() }).await.unwrap();
        let output = client.console(ReceiverStream::new(rx)).await.expect("Console").into_inner();
        Self { input, output, seen: String::new() }
    }

    /// Waits until the output since the session opened contains `needle`.
    pub async fn expect(&mut self, needle: &str, timeout: Duration) {
        self.expect_count(needle, 1, timeout).await;
    }

    /// Waits until `needle` has appeared `count` times since the session opened.
    pub async fn expect_count(&mut self, needle: &str, count: usize, timeout: Duration) {
        let what = format!("{needle:?} {count} times");
        self.expect_that(&what, timeout, |seen| seen.matches(needle).count() >= count).await;
    }

    /// Waits until `done` holds for the output since the session opened; `what` names it in the failure.
    pub async fn expect_that(&mut self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) {
        let found = tokio::time::timeout(timeout, async {
            while !done(&self.seen) {
                match self.output.message().await {
                    Ok(Some(chunk)) => self.seen.push_str(&String::from_utf8_lossy(&chunk.data)),
                    _ => return false,
                }
            }
            true
        })
        .await;
        assert!(matches!(found, Ok(true)), "console never showed {what}; it showed:\n{}", self.seen);
    }

    /// Runs `command` in the guest's shell and returns exactly what it printed (lines joined by `\n`). The output
    /// is read between two markers unique to this call, so nothing printed before the command ran (nor the echo of
    /// the command line itself) can be mistaken for its answer.
    pub async fn command(&mut self, command: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // The quotes split each marker in the echoed command line; only the shell's output has it whole.
        let line = format!("echo QX-BEGIN-{n}''; {command}; echo QX-END-{n}''\n");
        let (begin, end) = (format!("QX-BEGIN-{n}\r\n"), format!("QX-END-{n}\r\n"));
        self.input.send(pb::ConsoleInput { data: line.into_bytes(), ..Default::default() }).await.unwrap();
        self.expect(&end, Duration::from_secs(30)).await;
        let start = self.seen.find(&begin).expect("the begin marker comes first") + begin.len();
        let stop = self.seen.find(&end).expect("just awaited");
        self.seen[start..stop].replace('\r', "").trim_end_matches('\n').to_owned()
    }

    /// Types a shell command and waits for its answer; `$((..))` keeps the echo of the command itself from
    /// matching.
    pub async fn run(&mut self, a: u32, b: u32) {
        let command = format!("echo qx-answer-$(({a}+{b}))\n");
        self.input.send(pb::ConsoleInput { data: command.into_bytes(), ..Default::default() }).await.unwrap();
        self.expect(&format!("qx-answer-{}", a + b), Duration::from_secs(30)).await;
    }
}

impl Console {
    /// Runs `command` in the guest's shell and returns what it printed (one line, trimmed). The marker is built
    /// by the shell (`$((..))`), so the echo of the typed line does not match.
    pub async fn sh(&mut self, command: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let line = format!("echo \"qx-out-$(({n}+0))[$({command} 2>&1 | tr '\\n' ' ')]\"\n");
        let start = format!("qx-out-{n}[");
        self.input.send(pb::ConsoleInput { data: line.into_bytes(), ..Default::default() }).await.unwrap();
        self.expect(&start, Duration::from_secs(30)).await;
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(at) = self.seen.rfind(&start) {
                    if let Some(end) = self.seen[at..].find("]") {
                        return self.seen[at + start.len()..at + end].trim().to_owned();
                    }
                }
                match self.output.message().await {
                    Ok(Some(chunk)) => self.seen.push_str(&String::from_utf8_lossy(&chunk.data)),
                    _ => return String::new(),
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no answer to {command:?}; the console showed:\n{}", self.seen))
    }
}

pub async fn boot(client: &mut Client, name: &str) -> Console {
    let mut console = Console::open(client, name).await;
    console.expect(READY_LINE, BOOT_TIMEOUT).await;
    console
}

/// Every file under `dir` with its contents, sorted, except sockets, logs and pidfiles: what "nothing changed"
/// compares.
pub fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy();
            if name.ends_with(".sock") || name.ends_with(".log") || name == "qemu.pid" {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// The virtualenv `agent/tests/install-python-grpc.sh` makes, or `None` (and a skip) without it.
pub fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("QX_PYTHON_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/quantix/python-grpc")
    });
    let python = venv.join("bin/python3");
    if python.exists() {
        Some(python)
    } else {
        qx_test_infra::skip(&format!("no grpcio at {}: run agent/tests/install-python-grpc.sh", venv.display()));
        None
    }
}
