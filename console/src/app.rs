//! The console's model: the last [`Snapshot`] of the node, and what the operator asked for.

use std::path::PathBuf;
use std::time::Duration;

use qx_proto::node::v1::NodeInfo;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// How often the console asks qx-node for a new snapshot; F5 asks at once.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// The function keys of the key bar, in order, with their labels. Only F5 does something yet.
pub const FUNCTION_KEYS: [(u8, &str); 8] = [
    (2, "Network"),
    (3, "SSH"),
    (4, "Join cluster"),
    (5, "Refresh"),
    (6, "Restart services"),
    (7, "Diagnostics"),
    (10, "Power"),
    (12, "Shell"),
];

/// The node facts the console shows, copied out of [`NodeInfo`] so the view does not depend on the wire type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSummary {
    pub node_name: String,
    pub hostname: String,
    pub version: String,
    pub cpu_model: String,
    pub cpu_count: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub qemu_version: String,
    pub accelerator: String,
    pub accelerator_reason: String,
}

impl NodeSummary {
    /// Memory in use: total minus available (never negative, whatever the daemon reports).
    pub fn memory_used_bytes(&self) -> u64 {
        self.memory_total_bytes.saturating_sub(self.memory_available_bytes)
    }
}

impl From<NodeInfo> for NodeSummary {
    fn from(info: NodeInfo) -> Self {
        Self {
            node_name: info.node_name,
            hostname: info.hostname,
            version: info.version,
            cpu_model: info.cpu_model,
            cpu_count: info.cpu_count,
            memory_total_bytes: info.memory_total_bytes,
            memory_available_bytes: info.memory_available_bytes,
            qemu_version: info.qemu_version,
            accelerator: info.accelerator,
            accelerator_reason: info.accelerator_reason,
        }
    }
}

/// One answer from qx-node, or the reason there was none.
///
/// When `error` is set, `node` is `None` and the counts are zero: the console shows the reason, never stale numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub node: Option<NodeSummary>,
    pub vms_running: u32,
    pub vms_total: u32,
    pub error: Option<String>,
}

impl Snapshot {
    /// A snapshot of a node that answered.
    pub fn from_node_info(info: NodeInfo) -> Self {
        Self { vms_running: info.vms_running, vms_total: info.vms_total, node: Some(info.into()), error: None }
    }

    /// A snapshot of a node that did not answer, for `reason`.
    pub fn unreachable(reason: impl Into<String>) -> Self {
        Self { error: Some(reason.into()), ..Self::default() }
    }
}

/// What the caller of [`App::on_key`] must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond redrawing.
    None,
    /// Fetch a new snapshot now.
    Refresh,
    /// Leave the console (only when quitting is allowed).
    Quit,
}

/// Everything the view draws.
#[derive(Debug, Clone)]
pub struct App {
    /// qx-node's socket, shown while connecting and when it is unreachable.
    pub socket: PathBuf,
    /// The last snapshot; `None` until the first answer (or failure) arrives, shown as "connecting...".
    pub snapshot: Option<Snapshot>,
    /// A one-line message for the operator, e.g. that a key is not available yet.
    pub notice: Option<String>,
    /// Whether q, Esc and Ctrl-C leave the console. The real console on TTY1 never quits; a dev build needs to.
    pub allow_quit: bool,
    /// Set by F5 until the next snapshot arrives.
    pub refreshing: bool,
}

impl App {
    pub fn new(socket: impl Into<PathBuf>, allow_quit: bool) -> Self {
        Self { socket: socket.into(), snapshot: None, notice: None, allow_quit, refreshing: false }
    }

    /// Takes a new snapshot from the poller.
    pub fn set_snapshot(&mut self, snapshot: Snapshot) {
        self.snapshot = Some(snapshot);
        self.refreshing = false;
    }

    /// Handles one key press and says what to do next.
    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc if self.allow_quit => Action::Quit,
            _ if ctrl_c && self.allow_quit => Action::Quit,
            KeyCode::F(5) => {
                self.notice = None;
                self.refreshing = true;
                Action::Refresh
            }
            KeyCode::F(n) => {
                if let Some((_, label)) = FUNCTION_KEYS.iter().find(|(key, _)| *key == n) {
                    self.notice = Some(format!("F{n} {label}: not available yet"));
                }
                Action::None
            }
            _ => Action::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn f5_refreshes_and_snapshot_ends_it() {
        let mut app = App::new("/s", true);
        app.notice = Some("old".into());
        assert_eq!(app.on_key(press(KeyCode::F(5))), Action::Refresh);
        assert!(app.refreshing);
        assert_eq!(app.notice, None);
        app.set_snapshot(Snapshot::unreachable("x"));
        assert!(!app.refreshing);
    }

    #[test]
    fn unimplemented_keys_say_so() {
        let mut app = App::new("/s", true);
        assert_eq!(app.on_key(press(KeyCode::F(4))), Action::None);
        assert_eq!(app.notice.as_deref(), Some("F4 Join cluster: not available yet"));
        app.on_key(press(KeyCode::F(12)));
        assert_eq!(app.notice.as_deref(), Some("F12 Shell: not available yet"));
        // F1 is not on the bar: nothing happens.
        app.on_key(press(KeyCode::F(1)));
        assert_eq!(app.notice.as_deref(), Some("F12 Shell: not available yet"));
    }

    #[test]
    fn quit_only_when_allowed() {
        let mut app = App::new("/s", true);
        assert_eq!(app.on_key(press(KeyCode::Char('q'))), Action::Quit);
        assert_eq!(app.on_key(press(KeyCode::Esc)), Action::Quit);
        assert_eq!(app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
        let mut app = App::new("/s", false);
        assert_eq!(app.on_key(press(KeyCode::Char('q'))), Action::None);
        assert_eq!(app.on_key(press(KeyCode::Esc)), Action::None);
        assert_eq!(app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::None);
    }

    #[test]
    fn snapshot_from_node_info() {
        let info = NodeInfo {
            node_name: "n".into(),
            memory_total_bytes: 10,
            memory_available_bytes: 30,
            vms_running: 1,
            vms_total: 3,
            ..NodeInfo::default()
        };
        let snap = Snapshot::from_node_info(info);
        assert_eq!((snap.vms_running, snap.vms_total, snap.error), (1, 3, None));
        assert_eq!(snap.node.unwrap().memory_used_bytes(), 0);
    }
}
