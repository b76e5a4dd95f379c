//! [`QgaClient`]: the QEMU guest agent (QGA) front end on the same JSON channel as QMP.
//!
//! The agent runs inside the guest and is reached through a virtio-serial port whose host end is a unix socket of
//! QEMU's (or, in tests, `qemu-ga --method unix-listen`). That socket connects whether or not an agent runs in the
//! guest, and the port keeps bytes across agent restarts and host reconnects, so unlike QMP:
//! - nobody greets; the client resynchronises instead: it sends 0xFF (which resets the agent's JSON parser,
//!   dropping a half-written command of an earlier client) then `guest-sync-delimited` with a fresh id, and takes
//!   the stream as in step once the agent returns that id. It does so before the first command and after every
//!   timeout, since a late answer may still be on its way;
//! - stale replies (to an earlier connection's or a timed-out command) carry ids this client is not waiting for,
//!   and are dropped: request ids start at a per-connection random base;
//! - an agent that never answers is an error after each command's timeout ([`QgaError::NotResponding`]), never a
//!   hang: ping 3 s, fsfreeze up to 10 min (the agent runs the guest's freeze hooks), thaw 3 min ([`QgaOptions`]);
//! - `guest-shutdown` succeeds without a reply, so [`QgaClient::shutdown`] only waits for it to be written.
//!
//! The agent is sequential, so commands are sent one at a time. Its types follow QEMU 7.2's `qga/qapi-schema.json`
//! (`guest-exec`'s `capture-output` is a bool there; later QEMUs also take an enum).
//!
//! # Example
//!
//! ```no_run
//! use qx_qmp::qga::{QgaClient, QgaOptions};
//!
//! # async fn example() -> Result<(), qx_qmp::qga::QgaError> {
//! let agent = QgaClient::connect("/run/quantix/vm/web1/qga.sock", QgaOptions::default()).await?;
//! agent.ping().await?;
//! let frozen = agent.fsfreeze_freeze().await?;
//! println!("{frozen} file systems frozen");
//! agent.fsfreeze_thaw().await?;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::debug;

use crate::channel::{self, Channel};
use crate::error::Error;

/// The typed agent commands and answers this client uses where they match QEMU 7.2's agent (`guest-get-fsinfo`,
/// `guest-network-get-interfaces`, `guest-get-timezone`, `guest-file-*`, `guest-set-user-password`), re-exported so
/// callers name the same version. `guest-exec` stays raw JSON: `qapi-qga` follows QEMU 9.1, whose `capture-output`
/// is an alternate that 7.2's agent refuses.
pub use qapi_qga;

/// How many bytes [`QgaClient::read_file`] and [`QgaClient::write_file`] move per command: 1 MiB is 1.4 MB of
/// base64, well inside the channel's message limit, and few round trips over the virtio-serial port.
pub const FILE_CHUNK: usize = 1 << 20;

/// Timeouts of a [`QgaClient`]; `Default` has the values below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QgaOptions {
    /// How long to keep trying to connect the socket (it appears when QEMU starts). Default: 5 s.
    pub connect_timeout: Duration,
    /// How long the agent gets to answer `guest-sync-delimited`. Default: 3 s.
    pub sync_timeout: Duration,
    /// `guest-ping`. Default: 3 s.
    pub ping_timeout: Duration,
    /// `guest-fsfreeze-freeze(-list)`: the agent syncs and freezes every file system and runs the guest's
    /// freeze hooks (a database flushing), which may take long. Default: 10 min.
    pub freeze_timeout: Duration,
    /// `guest-fsfreeze-thaw`. Default: 3 min.
    pub thaw_timeout: Duration,
    /// Every other command. Default: 30 s.
    pub command_timeout: Duration,
}

impl Default for QgaOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            sync_timeout: Duration::from_secs(3),
            ping_timeout: Duration::from_secs(3),
            freeze_timeout: Duration::from_secs(600),
            thaw_timeout: Duration::from_secs(180),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// What went wrong talking to the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// The agent's socket could not be connected.
    #[error("connecting to the guest agent socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connect error.
        #[source]
        source: io::Error,
    },
    /// No answer within the timeout: no agent runs in the guest (not installed, not started yet, the guest is
    /// paused or hung) or it is stuck in this command. The next command resynchronises first.
    #[error(
        "the guest agent did not answer `{command}` within {timeout:?} (is qemu-guest-agent running in the guest?)"
    )]
    NotResponding {
        /// The command that got no answer (or whose resynchronisation got none).
        command: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The agent answered with an error (`CommandNotFound` for a command it has disabled, ...).
    #[error("guest agent command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// The error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// The agent's description.
        desc: String,
    },
    /// The socket closed (QEMU exited) before the answer came, or already was.
    #[error("the guest agent connection closed before `{command}` completed")]
    Closed {
        /// The command name.
        command: String,
    },
    /// `guest-sync-delimited` came back with another id than sent: something else speaks on the channel.
    #[error("guest agent resynchronisation: sent id {sent}, got {got}")]
    Sync {
        /// The id sent.
        sent: u64,
        /// What came back.
        got: Value,
    },
    /// The answer did not have the shape QEMU 7.2's agent documents.
    #[error("decoding the guest agent's answer to `{command}`")]
    Decode {
        /// The command name.
        command: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// [`QgaClient::read_file`] found the file longer than allowed.
    #[error("guest file {path:?} is larger than {max_bytes} bytes")]
    FileTooLarge {
        /// The guest path.
        path: String,
        /// The limit.
        max_bytes: usize,
    },
    /// The agent wrote nothing of what [`QgaClient::write_file`] sent.
    #[error("the guest agent wrote no bytes to {path:?}")]
    ShortWrite {
        /// The guest path.
        path: String,
    },
    /// Encoding or writing the command failed.
    #[error("sending guest agent command `{command}`")]
    Send {
        /// The command name.
        command: String,
        /// The channel error.
        #[source]
        source: Error,
    },
}

impl QgaError {
    fn from_channel(command: &str, error: Error) -> Self {
        match error {
            Error::Timeout { timeout, .. } => QgaError::NotResponding { command: command.to_owned(), timeout },
            Error::Command { class, desc, .. } => QgaError::Command { command: command.to_owned(), class, desc },
            Error::Closed { .. } => QgaError::Closed { command: command.to_owned() },
            Error::Decode { source, .. } => QgaError::Decode { command: command.to_owned(), source },
            Error::Connect { path, source } => QgaError::Connect { path, source },
            source => QgaError::Send { command: command.to_owned(), source },
        }
    }

    /// Whether the agent did not answer (as opposed to answering with an error).
    pub fn is_not_responding(&self) -> bool {
        matches!(self, QgaError::NotResponding { .. })
    }
}

/// `guest-info`: the agent's version and commands.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentInfo {
    /// e.g. `7.2.22`.
    pub version: String,
    /// Every command the agent knows, and whether it is enabled.
    pub supported_commands: Vec<AgentCommand>,
}

/// One command of [`AgentInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AgentCommand {
    /// The command name.
    pub name: String,
    /// Disabled commands (`qemu-ga -b`) answer `CommandNotFound`.
    pub enabled: bool,
    /// `false` for the commands that answer nothing on success (`guest-shutdown`, `guest-suspend-*`).
    #[serde(rename = "success-response")]
    pub success_response: bool,
}

impl AgentInfo {
    /// Whether `command` is known and enabled.
    pub fn supports(&self, command: &str) -> bool {
        self.supported_commands.iter().any(|c| c.name == command && c.enabled)
    }
}

/// `guest-get-osinfo`: the guest's OS, from its `/etc/os-release` and `uname` (every member optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct OsInfo {
    /// e.g. `debian`.
    pub id: Option<String>,
    /// e.g. `Debian GNU/Linux`.
    pub name: Option<String>,
    /// e.g. `Debian GNU/Linux 12 (bookworm)`.
    pub pretty_name: Option<String>,
    /// e.g. `12 (bookworm)`.
    pub version: Option<String>,
    /// e.g. `12`.
    pub version_id: Option<String>,
    /// e.g. `6.1.0-18-amd64`.
    pub kernel_release: Option<String>,
    /// e.g. `#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (2024-02-01)`.
    pub kernel_version: Option<String>,
    /// e.g. `x86_64`.
    pub machine: Option<String>,
    /// OS variant.
    pub variant: Option<String>,
    /// OS variant id.
    pub variant_id: Option<String>,
}

/// `guest-fsfreeze-status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    /// File systems are writable.
    Thawed,
    /// File systems are frozen until `guest-fsfreeze-thaw` (or the agent's own timeout).
    Frozen,
}

/// How `guest-shutdown` stops the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShutdownMode {
    /// Power off (the default of the agent).
    Powerdown,
    /// Halt without powering off.
    Halt,
    /// Reboot.
    Reboot,
}

/// A program for `guest-exec` to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestExec {
    /// The program, e.g. `/bin/sh`.
    pub path: String,
    /// Its arguments (without the program name).
    pub args: Vec<String>,
    /// Environment variables as `NAME=value`; the agent's own when empty.
    pub env: Vec<String>,
    /// Bytes written to its standard input, which is then closed.
    pub input: Option<Vec<u8>>,
    /// Capture standard output and error for [`GuestExecStatus`] (QEMU 7.2 takes a bool).
    pub capture_output: bool,
}

/// `guest-exec-status`: whether the program exited, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestExecStatus {
    /// Whether it exited; the other members are only set once it has.
    pub exited: bool,
    /// Its exit code, if it exited normally.
    pub exit_code: Option<i64>,
    /// The signal that killed it, if one did.
    pub signal: Option<i64>,
    /// Its standard output, when captured.
    pub stdout: Vec<u8>,
    /// Its standard error, when captured.
    pub stderr: Vec<u8>,
    /// Whether the agent cut the output short (it keeps at most 16 MiB).
    pub truncated: bool,
}

#[derive(Deserialize)]
struct RawExecStatus {
    exited: bool,
    #[serde(default)]
    exitcode: Option<i64>,
    #[serde(default)]
    signal: Option<i64>,
    #[serde(default, rename = "out-data")]
    out_data: Option<String>,
    #[serde(default, rename = "err-data")]
    err_data: Option<String>,
    #[serde(default, rename = "out-truncated")]
    out_truncated: bool,
    #[serde(default, rename = "err-truncated")]
    err_truncated: bool,
}

/// A guest agent connection. Clones share it; commands from all clones go one at a time.
#[derive(Clone)]
pub struct QgaClient {
    inner: Arc<Inner>,
}

struct Inner {
    channel: Channel,
    opts: QgaOptions,
    /// Held for a whole exchange (resync and command): the agent answers one command at a time, and a resync
    /// must not interleave with a command. `true` once the stream is known to be in step.
    synced: Mutex<bool>,
    next_sync_id: AtomicU64,
}

impl fmt::Debug for QgaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QgaClient")
            .field("opts", &self.inner.opts)
            .field("closed", &self.inner.channel.is_closed())
            .finish_non_exhaustive()
    }
}

/// Ids that an earlier connection to the same port cannot have used: a per-connection base from the clock and
/// the process id, below 2^53 so that any JSON parser keeps them exact.
fn random_base() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mixed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x5bd1_e995_3c6e_f372;
    (mixed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 12) & ((1 << 52) - 1)
}

impl QgaClient {
    /// Connects to the agent's socket at `path`, retrying while it does not exist yet or refuses connections
    /// (until `opts.connect_timeout`). Talks to the agent only at the first command: an agent that is not running
    /// yet makes commands fail with [`QgaError::NotResponding`], not the connect.
    pub async fn connect(path: impl AsRef<Path>, opts: QgaOptions) -> Result<Self, QgaError> {
        let path = path.as_ref();
        let deadline = Instant::now() + opts.connect_timeout;
        let stream = channel::connect_with_retry(path, deadline).await.map_err(|e| match e {
            Error::Connect { path, source } => QgaError::Connect { path, source },
            other => QgaError::Send { command: "connect".to_owned(), source: other },
        })?;
        debug!(path = %path.display(), "guest agent socket connected");
        Ok(Self::from_stream(stream, opts))
    }

    /// Like [`connect`](Self::connect), over a stream the caller connected itself. Must be called inside a tokio
    /// runtime.
    pub fn from_stream(stream: UnixStream, opts: QgaOptions) -> Self {
        let (read, write) = stream.into_split();
        let base = random_base();
        let channel = Channel::start(BufReader::new(read), write, "QGA", base);
        // Sync ids from another range than request ids, so neither can be taken for the other.
        let next_sync_id = AtomicU64::new(random_base() ^ (1 << 52));
        QgaClient { inner: Arc::new(Inner { channel, opts, synced: Mutex::new(false), next_sync_id }) }
    }

    /// The timeouts in use.
    pub fn options(&self) -> &QgaOptions {
        &self.inner.opts
    }

    /// Resynchronises now (0xFF, then `guest-sync-delimited` with a fresh id), as happens by itself before the
    /// first command and after a timeout. Doubles as a liveness check.
    pub async fn sync(&self) -> Result<(), QgaError> {
        let mut synced = self.inner.synced.lock().await;
        *synced = false;
        self.resync("guest-sync-delimited").await?;
        *synced = true;
        Ok(())
    }

    async fn resync(&self, command: &str) -> Result<(), QgaError> {
        let channel = &self.inner.channel;
        let timeout = self.inner.opts.sync_timeout;
        let id = self.inner.next_sync_id.fetch_add(1, Ordering::Relaxed);
        debug!(id, "resynchronising with the guest agent");
        channel.send_bytes("0xFF", vec![0xFF], timeout).await.map_err(|e| QgaError::from_channel(command, e))?;
        let arguments = json!({ "id": id });
        let got = channel
            .request("guest-sync-delimited", Some(&arguments), None, timeout)
            .await
            .map_err(|e| QgaError::from_channel(command, e))?;
        if got.as_u64() != Some(id) {
            return Err(QgaError::Sync { sent: id, got });
        }
        Ok(())
    }

    /// Runs `command` with `arguments` and returns the agent's `return` value, resynchronising first when needed.
    pub async fn execute_raw(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let mut synced = self.inner.synced.lock().await;
        if !*synced {
            self.resync(command).await?;
            *synced = true;
        }
        let result = self.inner.channel.request(command, arguments.as_ref(), None, timeout).await;
        if let Err(Error::Timeout { .. }) = &result {
            // Its answer may still come; the next command resynchronises past it.
            *synced = false;
        }
        result.map_err(|e| QgaError::from_channel(command, e))
    }

    async fn execute<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<T, QgaError> {
        let value = self.execute_raw(command, arguments, timeout).await?;
        serde_json::from_value(value).map_err(|source| QgaError::Decode { command: command.to_owned(), source })
    }

    /// `guest-ping`: whether the agent answers.
    pub async fn ping(&self) -> Result<(), QgaError> {
        self.execute_raw("guest-ping", None, self.inner.opts.ping_timeout).await.map(drop)
    }

    /// `guest-info`: the agent's version and commands.
    pub async fn info(&self) -> Result<AgentInfo, QgaError> {
        self.execute("guest-info", None, self.inner.opts.command_timeout).await
    }

    /// `guest-get-osinfo`.
    pub async fn osinfo(&self) -> Result<OsInfo, QgaError> {
        self.execute("guest-get-osinfo", None, self.inner.opts.command_timeout).await
    }

    /// `guest-get-host-name`.
    pub async fn host_name(&self) -> Result<String, QgaError> {
        #[derive(Deserialize)]
        struct Reply {
            #[serde(rename = "host-name")]
            host_name: String,
        }
        let reply: Reply = self.execute("guest-get-host-name", None, self.inner.opts.command_timeout).await?;
        Ok(reply.host_name)
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&self) -> Result<FreezeStatus, QgaError> {
        self.execute("guest-fsfreeze-status", None, self.inner.opts.command_timeout).await
    }

    /// `guest-fsfreeze-freeze`: freezes every freezable file system; returns how many.
    pub async fn fsfreeze_freeze(&self) -> Result<i64, QgaError> {
        self.execute("guest-fsfreeze-freeze", None, self.inner.opts.freeze_timeout).await
    }

    /// `guest-fsfreeze-freeze-list`: freezes the file systems mounted at `mountpoints`; returns how many.
    pub async fn fsfreeze_freeze_list(&self, mountpoints: &[String]) -> Result<i64, QgaError> {
        let arguments = json!({ "mountpoints": mountpoints });
        self.execute("guest-fsfreeze-freeze-list", Some(arguments), self.inner.opts.freeze_timeout).await
    }

    /// `guest-fsfreeze-thaw`: thaws every frozen file system; returns how many.
    pub async fn fsfreeze_thaw(&self) -> Result<i64, QgaError> {
        self.execute("guest-fsfreeze-thaw", None, self.inner.opts.thaw_timeout).await
    }

    /// `guest-shutdown`: asks the guest to power off, halt or reboot. The agent answers nothing on success, so
    /// this returns once the command is written, after a resynchronisation that shows an agent is there to read
    /// it. Whether the guest went down shows in QMP (`SHUTDOWN`, `RESET`), not here.
    pub async fn shutdown(&self, mode: ShutdownMode) -> Result<(), QgaError> {
        const COMMAND: &str = "guest-shutdown";
        let mut synced = self.inner.synced.lock().await;
        if !*synced {
            self.resync(COMMAND).await?;
        }
        // Nothing comes back to tell whether the stream is still in step: the next command resynchronises.
        *synced = false;
        let arguments = json!({ "mode": mode });
        self.inner
            .channel
            .notify(COMMAND, Some(&arguments), self.inner.opts.command_timeout)
            .await
            .map_err(|e| QgaError::from_channel(COMMAND, e))
    }

    /// `guest-exec`: starts a program in the guest; returns its pid for [`exec_status`](Self::exec_status).
    pub async fn exec(&self, exec: &GuestExec) -> Result<i64, QgaError> {
        let mut arguments = json!({ "path": exec.path, "capture-output": exec.capture_output });
        if !exec.args.is_empty() {
            arguments["arg"] = json!(exec.args);
        }
        if !exec.env.is_empty() {
            arguments["env"] = json!(exec.env);
        }
        if let Some(input) = &exec.input {
            arguments["input-data"] = json!(base64::encode(input));
        }
        #[derive(Deserialize)]
        struct Reply {
            pid: i64,
        }
        let reply: Reply = self.execute("guest-exec", Some(arguments), self.inner.opts.command_timeout).await?;
        Ok(reply.pid)
    }

    /// `guest-exec-status` of the program [`exec`](Self::exec) started.
    pub async fn exec_status(&self, pid: i64) -> Result<GuestExecStatus, QgaError> {
        const COMMAND: &str = "guest-exec-status";
        let raw: RawExecStatus =
            self.execute(COMMAND, Some(json!({ "pid": pid })), self.inner.opts.command_timeout).await?;
        let decode = |data: Option<String>| match data {
            None => Ok(Vec::new()),
            Some(text) => base64::decode(&text).ok_or_else(|| QgaError::Decode {
                command: COMMAND.to_owned(),
                source: serde::de::Error::custom("output is not base64"),
            }),
        };
        Ok(GuestExecStatus {
            exited: raw.exited,
            exit_code: raw.exitcode,
            signal: raw.signal,
            stdout: decode(raw.out_data)?,
            stderr: decode(raw.err_data)?,
            truncated: raw.out_truncated || raw.err_truncated,
        })
    }

    /// Runs a typed `qapi-qga` command (QEMU 9.1's schema, for the commands whose 7.2 answers it decodes).
    async fn typed<C: qapi_spec::Command>(&self, command: C, timeout: Duration) -> Result<C::Ok, QgaError> {
        let arguments = crate::client::encode_arguments(&command)
            .map_err(|source| QgaError::Send { command: C::NAME.to_owned(), source })?;
        let value = self.execute_raw(C::NAME, arguments, timeout).await?;
        serde_json::from_value(value).map_err(|source| QgaError::Decode { command: C::NAME.to_owned(), source })
    }

    /// `guest-get-timezone`: the guest's time zone name (when it has one) and its offset from UTC in seconds.
    pub async fn timezone(&self) -> Result<qapi_qga::GuestTimezone, QgaError> {
        self.typed(qapi_qga::guest_get_timezone {}, self.inner.opts.command_timeout).await
    }

    /// `guest-network-get-interfaces`: every interface with its MAC, addresses and counters.
    pub async fn network_interfaces(&self) -> Result<Vec<qapi_qga::GuestNetworkInterface>, QgaError> {
        self.typed(qapi_qga::guest_network_get_interfaces {}, self.inner.opts.command_timeout).await
    }

    /// `guest-get-fsinfo`: every mounted file system with its type, usage and the disks under it.
    pub async fn fsinfo(&self) -> Result<Vec<qapi_qga::GuestFilesystemInfo>, QgaError> {
        self.typed(qapi_qga::guest_get_fsinfo {}, self.inner.opts.command_timeout).await
    }

    /// `guest-set-user-password`: sets `username`'s password; `crypted` says it is already hashed (crypt(3)).
    pub async fn set_user_password(&self, username: &str, password: &[u8], crypted: bool) -> Result<(), QgaError> {
        let command =
            qapi_qga::guest_set_user_password { username: username.to_owned(), password: password.to_vec(), crypted };
        self.typed(command, self.inner.opts.command_timeout).await.map(drop)
    }

    /// `guest-file-open`: opens `path` in the guest with an `fopen(3)` mode (`r`, `w`, `a`, `r+`, ...); returns
    /// the handle for the other `file_*` calls, which [`file_close`](Self::file_close) must give back.
    pub async fn file_open(&self, path: &str, mode: &str) -> Result<i64, QgaError> {
        let command = qapi_qga::guest_file_open { path: path.to_owned(), mode: Some(mode.to_owned()) };
        self.typed(command, self.inner.opts.command_timeout).await
    }

    /// `guest-file-read`: up to `count` bytes from the handle's position, and whether the end was reached.
    pub async fn file_read(&self, handle: i64, count: usize) -> Result<(Vec<u8>, bool), QgaError> {
        let command = qapi_qga::guest_file_read { handle, count: Some(count as i64) };
        let read = self.typed(command, self.inner.opts.command_timeout).await?;
        Ok((read.buf_b64, read.eof))
    }

    /// `guest-file-write`: writes `bytes` at the handle's position; returns how many the agent wrote.
    pub async fn file_write(&self, handle: i64, bytes: &[u8]) -> Result<usize, QgaError> {
        let command = qapi_qga::guest_file_write { handle, buf_b64: bytes.to_vec(), count: None };
        let written = self.typed(command, self.inner.opts.command_timeout).await?;
        Ok(usize::try_from(written.count).unwrap_or(0))
    }

    /// `guest-file-close`.
    pub async fn file_close(&self, handle: i64) -> Result<(), QgaError> {
        self.typed(qapi_qga::guest_file_close { handle }, self.inner.opts.command_timeout).await.map(drop)
    }

    /// Reads the guest file at `path` whole, in [`FILE_CHUNK`] pieces, refusing one longer than `max_bytes`
    /// ([`QgaError::FileTooLarge`]). The handle is closed on every path, errors included.
    pub async fn read_file(&self, path: &str, max_bytes: usize) -> Result<Vec<u8>, QgaError> {
        let handle = self.file_open(path, "r").await?;
        let read = async {
            let mut content = Vec::new();
            loop {
                // One byte more than allowed tells a file of exactly `max_bytes` from a longer one.
                let want = FILE_CHUNK.min(max_bytes.saturating_add(1) - content.len());
                let (bytes, eof) = self.file_read(handle, want).await?;
                content.extend_from_slice(&bytes);
                if content.len() > max_bytes {
                    return Err(QgaError::FileTooLarge { path: path.to_owned(), max_bytes });
                }
                if eof || bytes.is_empty() {
                    return Ok(content);
                }
            }
        };
        let result = read.await;
        let closed = self.file_close(handle).await;
        let content = result?;
        closed?;
        Ok(content)
    }

    /// Writes `content` to the guest file at `path` (created, or truncated), in [`FILE_CHUNK`] pieces. The handle
    /// is closed on every path; the agent flushes it at close.
    pub async fn write_file(&self, path: &str, content: &[u8]) -> Result<(), QgaError> {
        let handle = self.file_open(path, "w").await?;
        let write = async {
            for chunk in content.chunks(FILE_CHUNK) {
                let mut rest = chunk;
                while !rest.is_empty() {
                    let written = self.file_write(handle, rest).await?;
                    if written == 0 {
                        return Err(QgaError::ShortWrite { path: path.to_owned() });
                    }
                    rest = &rest[written.min(rest.len())..];
                }
            }
            Ok(())
        };
        let result = write.await;
        let closed = self.file_close(handle).await;
        result?;
        closed
    }

    /// Whether the connection is closed (QEMU exited, or the agent's socket closed).
    pub fn is_closed(&self) -> bool {
        self.inner.channel.is_closed()
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        self.inner.channel.closed().await
    }
}

/// Standard base64 with padding, which `guest-exec` uses for input and output: too small a need for a crate.
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub(super) fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    pub(super) fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.trim_end_matches('=');
        let mut out = Vec::with_capacity(text.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in text.bytes() {
            let value = ALPHABET.iter().position(|&a| a == c)? as u32;
            acc = (acc << 6) | value;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn round_trips() {
            for (bytes, text) in
                [(&b""[..], ""), (b"h", "aA=="), (b"hi", "aGk="), (b"hi\n", "aGkK"), (b"hello!!", "aGVsbG8hIQ==")]
            {
                assert_eq!(super::encode(bytes), text);
                assert_eq!(super::decode(text).unwrap(), bytes);
            }
            assert!(super::decode("a*b").is_none());
        }
    }
}

#[cfg(test)]
mod tests {
    //! A scripted agent for what a real qemu-ga will not do on demand: never answer, answer late, answer stale.
    //! `tests/qga.rs` runs the rest against a real qemu-ga.

    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

    const WAIT: Duration = Duration::from_secs(5);

    fn opts() -> QgaOptions {
        QgaOptions {
            connect_timeout: WAIT,
            sync_timeout: Duration::from_millis(100),
            ping_timeout: Duration::from_millis(100),
            freeze_timeout: WAIT,
            thaw_timeout: WAIT,
            command_timeout: WAIT,
        }
    }

    struct FakeAgent {
        read: BufReader<OwnedReadHalf>,
        write: OwnedWriteHalf,
    }

    impl FakeAgent {
        /// Reads the 0xFF reset and the sync that follows it; returns the sync's request id and sync id.
        async fn expect_sync(&mut self) -> (Value, u64) {
            let mut byte = [0u8; 1];
            tokio::time::timeout(WAIT, self.read.read_exact(&mut byte)).await.unwrap().unwrap();
            assert_eq!(byte, [0xFF], "a resync starts with 0xFF");
            let message = self.recv().await;
            assert_eq!(message["execute"], "guest-sync-delimited", "{message}");
            (message["id"].clone(), message["arguments"]["id"].as_u64().unwrap())
        }

        async fn recv(&mut self) -> Value {
            let mut line = String::new();
            tokio::time::timeout(WAIT, self.read.read_line(&mut line)).await.expect("no command").unwrap();
            serde_json::from_str(&line).unwrap()
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.write.write_all(bytes).await.unwrap();
        }

        async fn answer_sync(&mut self) {
            let (id, sync) = self.expect_sync().await;
            // What qemu-ga does: an id-less parse error for the 0xFF, then the delimited answer.
            self.send(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}\n")
                .await;
            self.send(&delimited(json!({"return": sync, "id": id}))).await;
        }

        async fn reply(&mut self, id: &Value, value: Value) {
            self.send(format!("{}\n", json!({"return": value, "id": id})).as_bytes()).await;
        }
    }

    /// An answer as qemu-ga sends it to `guest-sync-delimited`: a raw 0xFF byte first.
    fn delimited(value: Value) -> Vec<u8> {
        let mut bytes = vec![0xFF];
        bytes.extend(format!("{value}\n").into_bytes());
        bytes
    }

    fn pair() -> (QgaClient, FakeAgent) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let client = QgaClient::from_stream(ours, opts());
        let (read, write) = theirs.into_split();
        (client, FakeAgent { read: BufReader::new(read), write })
    }

    #[tokio::test]
    async fn first_command_syncs_then_runs() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            let ping = agent.recv().await;
            assert_eq!(ping["execute"], "guest-ping");
            agent.reply(&ping["id"], json!({})).await;
            // In step now: the next command goes without a resync.
            let status = agent.recv().await;
            assert_eq!(status["execute"], "guest-fsfreeze-status");
            agent.reply(&status["id"], json!("thawed")).await;
        };
        let commands = async {
            client.ping().await.unwrap();
            client.fsfreeze_status().await.unwrap()
        };
        let (status, ()) = tokio::join!(commands, peer);
        assert_eq!(status, FreezeStatus::Thawed);
    }

    #[tokio::test]
    async fn an_agent_that_never_answers_is_reported_not_awaited() {
        let (client, mut agent) = pair();
        let peer = async {
            // Reads everything, answers nothing: a guest without a running agent.
            agent.expect_sync().await;
            agent.expect_sync().await;
            agent
        };
        let (first, second, _agent) = tokio::join!(
            client.ping(),
            async {
                tokio::time::sleep(Duration::from_millis(10)).await;
                client.ping().await
            },
            peer
        );
        for result in [first, second] {
            let err = result.unwrap_err();
            assert!(err.is_not_responding(), "{err:?}");
            assert!(err.to_string().contains("guest-ping"), "{err}");
        }
        assert!(!client.is_closed());
    }

    #[tokio::test]
    async fn a_timeout_resyncs_and_the_stale_answer_is_skipped() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            let slow = agent.recv().await;
            assert_eq!(slow["execute"], "guest-get-host-name");
            // No answer in time; the next command resyncs first, and the late answer arrives before the sync's.
            let (id, sync) = agent.expect_sync().await;
            agent.reply(&slow["id"], json!({"host-name": "stale"})).await;
            agent.send(&delimited(json!({"return": sync, "id": id}))).await;
            let again = agent.recv().await;
            assert_eq!(again["execute"], "guest-get-host-name");
            agent.reply(&again["id"], json!({"host-name": "fresh"})).await;
        };
        let commands = async {
            let short = Duration::from_millis(100);
            let err = client.execute_raw("guest-get-host-name", None, short).await.unwrap_err();
            assert!(err.is_not_responding(), "{err:?}");
            client.host_name().await.unwrap()
        };
        let (name, ()) = tokio::join!(commands, peer);
        assert_eq!(name, "fresh");
    }

    #[tokio::test]
    async fn a_stale_sync_answer_is_not_taken_for_the_current_one() {
        let (client, mut agent) = pair();
        let peer = async {
            let (id, sync) = agent.expect_sync().await;
            // An answer to a sync of an earlier connection first: another request id, another sync id.
            agent.send(&delimited(json!({"return": 12345, "id": 999}))).await;
            agent.send(&delimited(json!({"return": sync, "id": id}))).await;
        };
        let (result, ()) = tokio::join!(client.sync(), peer);
        result.unwrap();
    }

    #[tokio::test]
    async fn a_sync_answered_with_another_id_is_an_error() {
        let (client, mut agent) = pair();
        let peer = async {
            let (id, sync) = agent.expect_sync().await;
            agent.send(&delimited(json!({"return": sync + 1, "id": id}))).await;
        };
        let (result, ()) = tokio::join!(client.sync(), peer);
        assert!(matches!(result, Err(QgaError::Sync { .. })), "{result:?}");
    }

    #[tokio::test]
    async fn shutdown_expects_no_answer() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            let shutdown = agent.recv().await;
            assert_eq!(shutdown, json!({"execute": "guest-shutdown", "arguments": {"mode": "reboot"}}));
            // No answer, as qemu-ga on success; the next command resyncs.
            agent.answer_sync().await;
            let ping = agent.recv().await;
            agent.reply(&ping["id"], json!({})).await;
        };
        let commands = async {
            client.shutdown(ShutdownMode::Reboot).await.unwrap();
            client.ping().await.unwrap();
        };
        tokio::join!(commands, peer);
    }

    #[tokio::test]
    async fn exec_sends_7_2_arguments_and_decodes_output() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            let exec = agent.recv().await;
            assert_eq!(
                exec["arguments"],
                json!({"path": "/bin/cat", "capture-output": true, "arg": ["-"], "input-data": "aGkK"})
            );
            agent.reply(&exec["id"], json!({"pid": 42})).await;
            let status = agent.recv().await;
            assert_eq!(status["arguments"], json!({"pid": 42}));
            agent
                .reply(
                    &status["id"],
                    json!({"exited": true, "exitcode": 0, "out-data": "aGkK", "out-truncated": false}),
                )
                .await;
        };
        let commands = async {
            let exec = GuestExec {
                path: "/bin/cat".into(),
                args: vec!["-".into()],
                input: Some(b"hi\n".to_vec()),
                capture_output: true,
                ..GuestExec::default()
            };
            let pid = client.exec(&exec).await.unwrap();
            client.exec_status(pid).await.unwrap()
        };
        let (status, ()) = tokio::join!(commands, peer);
        assert_eq!(
            status,
            GuestExecStatus { exited: true, exit_code: Some(0), stdout: b"hi\n".to_vec(), ..Default::default() }
        );
    }

    #[tokio::test]
    async fn agent_errors_and_a_closed_socket_are_told_apart() {
        let (client, mut agent) = pair();
        let peer = async move {
            agent.answer_sync().await;
            let freeze = agent.recv().await;
            let error = json!({"error": {"class": "CommandNotFound", "desc": "Command guest-fsfreeze-freeze has been disabled"}, "id": freeze["id"]});
            agent.send(format!("{error}\n").as_bytes()).await;
            let _ = agent.recv().await;
            // The agent's end goes away (QEMU exited) while the thaw waits.
        };
        let commands = async {
            let err = client.fsfreeze_freeze().await.unwrap_err();
            assert!(matches!(&err, QgaError::Command { class, .. } if class == "CommandNotFound"), "{err:?}");
            client.fsfreeze_thaw().await.unwrap_err()
        };
        let (err, ()) = tokio::join!(commands, peer);
        assert!(matches!(&err, QgaError::Closed { command } if command == "guest-fsfreeze-thaw"), "{err:?}");
        assert!(client.is_closed());
    }

    /// What qemu-ga 7.2 answered on this host (`guest-get-fsinfo`, `guest-network-get-interfaces`,
    /// `guest-get-timezone`), decoded by the `qapi-qga` types.
    #[tokio::test]
    async fn info_answers_of_a_7_2_agent_decode() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            let tz = agent.recv().await;
            assert_eq!(tz["execute"], "guest-get-timezone");
            agent.reply(&tz["id"], json!({"zone": "UTC", "offset": 0})).await;
            let fs = agent.recv().await;
            assert_eq!(fs["execute"], "guest-get-fsinfo");
            let disk = json!({"bus-type": "virtio", "bus": 0, "unit": 0, "target": 0, "dev": "/dev/vda",
                "pci-controller": {"bus": 0, "slot": 2, "domain": 0, "function": 0}});
            let answer = json!([{"name": "vda", "total-bytes": 97572749312u64, "mountpoint": "/", "disk": [disk],
                "used-bytes": 13115097088u64, "type": "ext4"}]);
            agent.reply(&fs["id"], answer).await;
            let nics = agent.recv().await;
            assert_eq!(nics["execute"], "guest-network-get-interfaces");
            let answer = json!([
                {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "127.0.0.1", "prefix": 8}],
                 "statistics": {"tx-packets": 29, "tx-errs": 0, "rx-bytes": 3193, "rx-dropped": 0, "rx-packets": 29,
                    "rx-errs": 0, "tx-bytes": 3193, "tx-dropped": 0}},
                {"name": "ifb0", "hardware-address": "36:80:1a:49:3b:0c"}]);
            agent.reply(&nics["id"], answer).await;
        };
        let commands = async {
            (
                client.timezone().await.unwrap(),
                client.fsinfo().await.unwrap(),
                client.network_interfaces().await.unwrap(),
            )
        };
        let ((tz, fs, nics), ()) = tokio::join!(commands, peer);
        assert_eq!((tz.zone.as_deref(), tz.offset), (Some("UTC"), 0));
        assert_eq!(
            (fs[0].mountpoint.as_str(), fs[0].type_.as_str(), fs[0].used_bytes),
            ("/", "ext4", Some(13115097088))
        );
        assert_eq!(fs[0].disk[0].dev.as_deref(), Some("/dev/vda"));
        assert_eq!(nics.len(), 2);
        let lo = nics[0].ip_addresses.as_ref().unwrap();
        assert_eq!((lo[0].ip_address.as_str(), lo[0].prefix), ("127.0.0.1", 8));
        assert!(nics[1].ip_addresses.is_none());
    }

    /// A file read in pieces until `eof`; one longer than allowed is refused, and the handle is closed either way.
    #[tokio::test]
    async fn read_file_reads_to_eof_refuses_large_files_and_always_closes() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            for (content, chunks) in [(&b"hello\n"[..], 1), (&b"0123456789"[..], 1)] {
                let open = agent.recv().await;
                assert_eq!(open["arguments"], json!({"path": "/etc/motd", "mode": "r"}));
                agent.reply(&open["id"], json!(7)).await;
                for _ in 0..chunks {
                    let read = agent.recv().await;
                    assert_eq!(read["execute"], "guest-file-read");
                    assert_eq!(read["arguments"]["handle"], 7);
                    let want = read["arguments"]["count"].as_u64().unwrap() as usize;
                    let part = &content[..want.min(content.len())];
                    let eof = part.len() == content.len();
                    agent
                        .reply(&read["id"], json!({"count": part.len(), "buf-b64": base64::encode(part), "eof": eof}))
                        .await;
                }
                let close = agent.recv().await;
                assert_eq!(
                    (close["execute"].as_str(), &close["arguments"]),
                    (Some("guest-file-close"), &json!({"handle": 7}))
                );
                agent.reply(&close["id"], json!({})).await;
            }
        };
        let commands = async {
            let small = client.read_file("/etc/motd", 8).await;
            let large = client.read_file("/etc/motd", 8).await;
            (small, large)
        };
        let ((small, large), ()) = tokio::join!(commands, peer);
        assert_eq!(small.unwrap(), b"hello\n");
        let err = large.unwrap_err();
        assert!(matches!(&err, QgaError::FileTooLarge { max_bytes: 8, .. }), "{err:?}");
    }

    #[tokio::test]
    async fn write_file_sends_base64_and_closes_even_when_a_write_fails() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            let open = agent.recv().await;
            assert_eq!(open["arguments"], json!({"path": "/tmp/x", "mode": "w"}));
            agent.reply(&open["id"], json!(1000)).await;
            let write = agent.recv().await;
            assert_eq!(write["arguments"], json!({"handle": 1000, "buf-b64": "aGkK"}));
            agent.reply(&write["id"], json!({"count": 3, "eof": false})).await;
            let close = agent.recv().await;
            assert_eq!(close["execute"], "guest-file-close");
            agent.reply(&close["id"], json!({})).await;
            // The second time the disk is full.
            let open = agent.recv().await;
            agent.reply(&open["id"], json!(1001)).await;
            let write = agent.recv().await;
            let error =
                json!({"error": {"class": "GenericError", "desc": "failed to write to file"}, "id": write["id"]});
            agent.send(format!("{error}\n").as_bytes()).await;
            let close = agent.recv().await;
            assert_eq!(close["arguments"], json!({"handle": 1001}));
            agent.reply(&close["id"], json!({})).await;
        };
        let commands =
            async { (client.write_file("/tmp/x", b"hi\n").await, client.write_file("/tmp/x", b"hi\n").await) };
        let ((first, second), ()) = tokio::join!(commands, peer);
        first.unwrap();
        assert!(
            matches!(second, Err(QgaError::Command { ref command, .. }) if command == "guest-file-write"),
            "{second:?}"
        );
    }

    #[tokio::test]
    async fn set_user_password_sends_it_in_base64() {
        let (client, mut agent) = pair();
        let peer = async {
            agent.answer_sync().await;
            let set = agent.recv().await;
            assert_eq!(set["execute"], "guest-set-user-password");
            assert_eq!(set["arguments"], json!({"username": "ops", "password": "aGkK", "crypted": false}));
            agent.reply(&set["id"], json!({})).await;
        };
        let (result, ()) = tokio::join!(client.set_user_password("ops", b"hi\n", false), peer);
        result.unwrap();
    }

    #[test]
    fn default_timeouts() {
        let opts = QgaOptions::default();
        assert_eq!(opts.ping_timeout, Duration::from_secs(3));
        assert_eq!(opts.freeze_timeout, Duration::from_secs(600));
        assert_eq!(opts.thaw_timeout, Duration::from_secs(180));
    }

    #[test]
    fn random_bases_stay_exact_in_json() {
        let base = random_base();
        assert!(base < 1 << 52);
    }
}
