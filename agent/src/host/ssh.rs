//! SSH on or off, with an optional timer that turns it off. The state (and the timer's deadline) is kept in
//! `<data_dir>/ssh.json`, so a restarted qx-node re-arms the timer, or turns SSH off at once when the deadline
//! passed while it was down.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{error, info, warn, Instrument};

use super::command::{self, CommandError};
use super::{now_unix, persist_json, HostError};

/// How long the enable/disable commands may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// After a failed timed disable, when to try again.
const RETRY: Duration = Duration::from_secs(60);
/// The longest timer: a week.
pub const MAX_TIMEOUT_MINUTES: u32 = 7 * 24 * 60;

/// What qx-node last did to SSH.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshStatus {
    pub enabled: bool,
    /// Unix seconds at which SSH turns itself off; 0 without a timer.
    #[serde(default)]
    pub disable_at_unix: i64,
}

/// Reads the saved state; a missing or unreadable file means SSH off (unreadable ones are logged).
pub fn load(file: &Path) -> SshStatus {
    match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %file.display(), error = %e, "ignoring an unreadable SSH state file");
            SshStatus::default()
        }),
        Err(_) => SshStatus::default(),
    }
}

#[derive(Debug)]
pub struct Ssh {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    enable: Vec<String>,
    disable: Vec<String>,
    file: PathBuf,
    /// Held while a command runs, so SetSsh calls and the timer take turns.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    status: SshStatus,
    /// Bumped whenever the timer changes; a timer task whose generation is stale does nothing.
    generation: u64,
    timer: Option<tokio::task::AbortHandle>,
}

impl Ssh {
    /// Starts from the `saved` state (see [`load`]), re-arming a pending timer (or turning SSH off at once when
    /// its deadline has passed). Must be called inside a tokio runtime.
    pub fn open(file: PathBuf, saved: SshStatus, enable: Vec<String>, disable: Vec<String>) -> Self {
        let state = State { status: saved, ..State::default() };
        let ssh = Self { inner: Arc::new(Inner { enable, disable, file, state: Mutex::new(state) }) };
        if saved.enabled && saved.disable_at_unix > 0 {
            info!(disable_at_unix = saved.disable_at_unix, "re-arming the SSH timer");
            // Nobody else can hold the lock yet.
            if let Ok(mut state) = ssh.inner.state.try_lock() {
                ssh.arm(&mut state, saved.disable_at_unix);
            }
        }
        ssh
    }

    pub async fn status(&self) -> SshStatus {
        self.inner.state.lock().await.status
    }

    /// Turns SSH on (disabling it again after `timeout_minutes`, 0 meaning never) or off. The timer is replaced or
    /// cancelled only when the command succeeds.
    pub async fn set(&self, enabled: bool, timeout_minutes: u32) -> Result<SshStatus, HostError> {
        if enabled && timeout_minutes > MAX_TIMEOUT_MINUTES {
            return Err(HostError::Invalid(qx_vmm::ValidationErrors::one(
                "timeout_minutes",
                timeout_minutes,
                format!("is outside 0..={MAX_TIMEOUT_MINUTES}"),
            )));
        }
        let mut state = self.inner.state.lock().await;
        let argv = if enabled { &self.inner.enable } else { &self.inner.disable };
        command::run(argv, COMMAND_TIMEOUT).await.map_err(|source| HostError::SshCommand { enabled, source })?;
        self.cancel(&mut state);
        state.status = SshStatus { enabled, disable_at_unix: 0 };
        if enabled && timeout_minutes > 0 {
            let at = now_unix() + i64::from(timeout_minutes) * 60;
            state.status.disable_at_unix = at;
            self.arm(&mut state, at);
        }
        info!(enabled, disable_at_unix = state.status.disable_at_unix, "SSH set");
        self.inner.persist(state.status).await?;
        Ok(state.status)
    }

    fn cancel(&self, state: &mut State) {
        state.generation += 1;
        if let Some(timer) = state.timer.take() {
            timer.abort();
        }
    }

    fn arm(&self, state: &mut State, at_unix: i64) {
        self.cancel(state);
        let generation = state.generation;
        let inner = Arc::clone(&self.inner);
        let span = tracing::info_span!(parent: None, "ssh-timer", disable_at_unix = at_unix);
        let task = tokio::spawn(
            async move {
                let wait = u64::try_from(at_unix - now_unix()).unwrap_or(0);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                loop {
                    match inner.timed_disable(generation).await {
                        Ok(()) => return,
                        Err(e) => {
                            error!(error = %crate::grpc::error_chain(&e), "cannot turn SSH off at its deadline; retrying");
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
            }
            .instrument(span),
        );
        state.timer = Some(task.abort_handle());
    }
}

impl Inner {
    async fn timed_disable(&self, generation: u64) -> Result<(), CommandError> {
        let mut state = self.state.lock().await;
        if state.generation != generation {
            return Ok(());
        }
        command::run(&self.disable, COMMAND_TIMEOUT).await?;
        state.status = SshStatus::default();
        state.timer = None;
        info!("SSH turned off by its timer");
        if let Err(e) = self.persist(state.status).await {
            error!(error = %crate::grpc::error_chain(&e), "cannot record that SSH is off");
        }
        Ok(())
    }

    async fn persist(&self, status: SshStatus) -> Result<(), HostError> {
        persist_json(self.file.clone(), &status).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: String) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script]
    }

    fn open(dir: &Path, enable: &str, disable: &str) -> Ssh {
        let file = dir.join("ssh.json");
        Ssh::open(file.clone(), load(&file), sh(enable.to_owned()), sh(disable.to_owned()))
    }

    fn ssh(dir: &Path) -> Ssh {
        let log = dir.join("log");
        open(dir, &format!("echo on >> {}", log.display()), &format!("echo off >> {}", log.display()))
    }

    fn log(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    }

    #[tokio::test]
    async fn enable_with_timer_persists_and_disable_cancels() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = ssh(dir.path());
        assert_eq!(ssh.status().await, SshStatus::default());
        let status = ssh.set(true, 1).await.unwrap();
        assert!(status.enabled);
        assert!((status.disable_at_unix - now_unix() - 60).abs() <= 2, "{status:?}");
        let saved: SshStatus = serde_json::from_slice(&std::fs::read(dir.path().join("ssh.json")).unwrap()).unwrap();
        assert_eq!(saved, status);
        let status = ssh.set(false, 0).await.unwrap();
        assert_eq!(status, SshStatus::default());
        assert_eq!(log(dir.path()), "on\noff\n");
        let err = ssh.set(true, MAX_TIMEOUT_MINUTES + 1).await.unwrap_err();
        assert!(err.to_string().starts_with("timeout_minutes: \"10081\" is outside"), "{err}");
    }

    /// The timer fires while the daemon runs: a minute's timer is sixty seconds of tokio's clock, paused and
    /// advanced here. The deadline is kept in whole unix seconds, so the timer may fire up to a second early.
    #[tokio::test]
    async fn a_timer_firing_while_running_turns_ssh_off_after_its_minutes() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = ssh(dir.path());
        ssh.set(true, 1).await.unwrap();
        // Paused only now: the enable command above ran on the real clock (a paused clock would jump to its
        // timeout while the child process runs).
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(58)).await;
        assert!(ssh.status().await.enabled, "off before its minute");
        assert_eq!(log(dir.path()), "on\n");
        tokio::time::advance(Duration::from_secs(3)).await;
        // The disable command is a real process: let the clock run again so its timeout means real time.
        tokio::time::resume();
        let off = tokio::time::timeout(Duration::from_secs(10), async {
            while ssh.status().await.enabled {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(off.is_ok(), "the timer did not turn SSH off at 61 s");
        assert_eq!(log(dir.path()), "on\noff\n");
        let saved: SshStatus = serde_json::from_slice(&std::fs::read(dir.path().join("ssh.json")).unwrap()).unwrap();
        assert_eq!(saved, SshStatus::default(), "the timed disable is recorded");
    }

    #[tokio::test]
    async fn a_past_deadline_disables_at_open_and_a_future_one_is_rearmed() {
        let dir = tempfile::tempdir().unwrap();
        let past = SshStatus { enabled: true, disable_at_unix: now_unix() - 5 };
        std::fs::write(dir.path().join("ssh.json"), serde_json::to_vec(&past).unwrap()).unwrap();
        let ssh = ssh(dir.path());
        let off = tokio::time::timeout(Duration::from_secs(10), async {
            while ssh.status().await.enabled {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(off.is_ok(), "the overdue timer fired");
        assert_eq!(log(dir.path()), "off\n");
        let saved: SshStatus = serde_json::from_slice(&std::fs::read(dir.path().join("ssh.json")).unwrap()).unwrap();
        assert_eq!(saved, SshStatus::default());

        let future = SshStatus { enabled: true, disable_at_unix: now_unix() + 3600 };
        std::fs::write(dir.path().join("ssh.json"), serde_json::to_vec(&future).unwrap()).unwrap();
        let ssh = open(dir.path(), "true", "true");
        assert_eq!(ssh.status().await, future);
        assert!(ssh.inner.state.lock().await.timer.is_some());
    }

    #[tokio::test]
    async fn a_failing_command_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ssh = open(dir.path(), "echo sshd is missing >&2; exit 1", "true");
        let err = ssh.set(true, 5).await.unwrap_err();
        assert_eq!(
            crate::grpc::error_chain(&err),
            "cannot turn SSH on: `sh -c echo sshd is missing >&2; exit 1` exit status: 1: sshd is missing"
        );
        assert_eq!(ssh.status().await, SshStatus::default());
        assert!(!dir.path().join("ssh.json").exists());
    }
}
