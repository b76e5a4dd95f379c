//! The console's model: the last [`Snapshot`] of the node, the open dialog, and what the operator asked for.
//!
//! Key handling ([`App::on_key`]) and replies from qx-node ([`App::on_reply`]) change the model and return an
//! [`Action`] for the binary to carry out; nothing here does I/O.

use std::path::PathBuf;
use std::time::Duration;

use qx_proto::node::v1::NodeInfo;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::Rect;

use crate::dialogs::{
    Confirm, ConfirmDialog, DiagnosticsView, Dialog, JoinDialog, NetworkDialog, Outcome, PowerDialog, SshDialog,
};
use crate::host::{HostSummary, PowerAction};
use crate::rpc::{Reply, Request, RpcError};

/// How often the console asks qx-node for a new snapshot; F5 asks at once.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);

/// After RestartServices, how long the console waits to see qx-node go away before it takes answers as coming
/// from the restarted daemon (a restart that is quicker than a poll is never seen going away).
pub const RECONNECT_GRACE_SECS: i64 = 10;

/// The function keys of the key bar, in order, with their labels.
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
    /// The A/B systems, e.g. "A 0.2.0, fallback B 0.1.0"; empty off the Quantix image.
    pub system: String,
    /// The last update's version, system and outcome; empty when there was none.
    pub last_update: String,
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
            system: info.system.as_ref().map(system_text).unwrap_or_default(),
            last_update: info.system.and_then(|s| s.last_update).map(|u| last_update_text(&u)).unwrap_or_default(),
        }
    }
}

fn system_text(status: &qx_proto::node::v1::SystemStatus) -> String {
    if !status.unavailable.is_empty() {
        return String::new();
    }
    let slot = |s: &qx_proto::node::v1::SystemSlot| format!("{} {}", s.slot.to_uppercase(), s.version);
    let mut text = status.active.as_ref().map(slot).unwrap_or_else(|| "unknown".into());
    if status.trial {
        text.push_str(" (on trial)");
    }
    match &status.fallback {
        Some(fallback) => text.push_str(&format!(", fallback {}", slot(fallback))),
        None => text.push_str(", no fallback"),
    }
    if !status.pending.is_empty() {
        text.push_str(&format!(", next boot tries {}", status.pending.to_uppercase()));
    }
    text
}

fn last_update_text(update: &qx_proto::node::v1::UpdateRecord) -> String {
    use qx_proto::node::v1::UpdateOutcome;
    let outcome = match UpdateOutcome::try_from(update.outcome) {
        Ok(UpdateOutcome::Installing) => "installing",
        Ok(UpdateOutcome::Pending) => "installed, waiting for a reboot",
        Ok(UpdateOutcome::Succeeded) => "succeeded",
        Ok(UpdateOutcome::RolledBack) => "FAILED, rolled back",
        Ok(UpdateOutcome::Failed) => "failed",
        Ok(UpdateOutcome::Cancelled) => "cancelled",
        Ok(UpdateOutcome::Unspecified) | Err(_) => "unknown",
    };
    format!("{} on {}: {outcome}", update.version, update.slot.to_uppercase())
}

/// One answer from qx-node, or the reason there was none.
///
/// When `error` is set, `node` and `host` are `None` and the counts are zero: the console shows the reason, never
/// stale numbers. `host_error` says why `host` is missing while the node answered (e.g. a qx-node without
/// `HostService`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub node: Option<NodeSummary>,
    pub vms_running: u32,
    pub vms_total: u32,
    pub error: Option<String>,
    pub host: Option<HostSummary>,
    pub host_error: Option<String>,
}

impl Snapshot {
    /// A snapshot of a node that answered.
    pub fn from_node_info(info: NodeInfo) -> Self {
        Self { vms_running: info.vms_running, vms_total: info.vms_total, node: Some(info.into()), ..Self::default() }
    }

    /// The same snapshot with `GetHostStatus`'s answer, or the reason there was none.
    pub fn with_host(self, host: Result<HostSummary, String>) -> Self {
        match host {
            Ok(host) => Self { host: Some(host), host_error: None, ..self },
            Err(reason) => Self { host: None, host_error: Some(reason), ..self },
        }
    }

    /// A snapshot of a node that did not answer, for `reason`.
    pub fn unreachable(reason: impl Into<String>) -> Self {
        Self { error: Some(reason.into()), ..Self::default() }
    }
}

/// What the caller of [`App::on_key`] and [`App::on_reply`] must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing beyond redrawing.
    None,
    /// Fetch a new snapshot now.
    Refresh,
    /// Send this request to qx-node and hand the reply to [`App::on_reply`].
    Call(Request),
    /// Leave the TUI, run this argv on the console's terminal, wait for it, come back, and report with
    /// [`App::shell_done`].
    RunShell(Vec<String>),
    /// Leave the console (only when quitting is allowed).
    Quit,
}

/// Set once RestartServices succeeded, until qx-node answers again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// Unix seconds when the restart was acknowledged.
    pub since: i64,
    /// Whether qx-node has been seen unreachable since.
    pub lost: bool,
}

/// Everything the view draws.
#[derive(Debug, Clone)]
pub struct App {
    /// qx-node's socket, shown while connecting and when it is unreachable.
    pub socket: PathBuf,
    /// The last snapshot; `None` until the first answer (or failure) arrives, shown as "connecting...".
    pub snapshot: Option<Snapshot>,
    /// A one-line message for the operator, e.g. what the last action did.
    pub notice: Option<String>,
    /// Whether q, Esc and Ctrl-C leave the console. The real console on TTY1 never quits; a dev build needs to.
    pub allow_quit: bool,
    /// Set by F5 until the next snapshot arrives.
    pub refreshing: bool,
    /// The dialog on top of the main screen; it takes every key while open.
    pub dialog: Option<Dialog>,
    /// Services are restarting: the console says "reconnecting" instead of "not reachable".
    pub reconnecting: Option<Reconnect>,
    /// Unix seconds, for the SSH timer; the binary sets it before each draw ([`App::tick`]).
    pub now: i64,
    /// The terminal's area, so scrolling knows a page's height ([`App::resize`]).
    pub area: Rect,
}

impl App {
    pub fn new(socket: impl Into<PathBuf>, allow_quit: bool) -> Self {
        Self {
            socket: socket.into(),
            snapshot: None,
            notice: None,
            allow_quit,
            refreshing: false,
            dialog: None,
            reconnecting: None,
            now: 0,
            area: Rect::default(),
        }
    }

    /// What qx-node last said about the host, if it said anything.
    pub fn host(&self) -> Option<&HostSummary> {
        self.snapshot.as_ref().and_then(|snap| snap.host.as_ref())
    }

    pub fn tick(&mut self, now_unix: i64) {
        self.now = now_unix;
    }

    pub fn resize(&mut self, area: Rect) {
        self.area = area;
    }

    /// Takes a new snapshot from the poller.
    pub fn set_snapshot(&mut self, snapshot: Snapshot) {
        if let Some(reconnect) = &mut self.reconnecting {
            if snapshot.error.is_some() {
                reconnect.lost = true;
            } else if reconnect.lost || self.now - reconnect.since >= RECONNECT_GRACE_SECS {
                self.reconnecting = None;
                self.notice = Some("Reconnected to qx-node".into());
            }
        }
        self.snapshot = Some(snapshot);
        self.refreshing = false;
    }

    /// Handles one key press and says what to do next.
    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
        if ctrl_c && self.allow_quit {
            return Action::Quit;
        }
        if let Some(dialog) = &mut self.dialog {
            let page = usize::from(crate::view::diagnostics_page(self.area));
            return match dialog.on_key(key, page) {
                Outcome::Stay => Action::None,
                Outcome::Close => {
                    self.dialog = None;
                    Action::None
                }
                Outcome::Call(request) => Action::Call(request),
            };
        }
        let action = match key.code {
            KeyCode::Char('q') | KeyCode::Esc if self.allow_quit => return Action::Quit,
            KeyCode::F(2) => {
                let (dialog, request) = NetworkDialog::open(self.host().and_then(|host| host.network.as_ref()));
                self.dialog = Some(Dialog::Network(dialog));
                Action::Call(request)
            }
            KeyCode::F(3) => {
                let ssh = self.host().map(|host| host.ssh).unwrap_or_default();
                self.dialog = Some(Dialog::Ssh(SshDialog::open(ssh)));
                Action::None
            }
            KeyCode::F(4) => {
                let cluster = self.host().map(|host| host.cluster.clone()).unwrap_or_default();
                self.dialog = Some(if cluster.is_member() {
                    Dialog::Confirm(ConfirmDialog::new(Confirm::LeaveCluster(cluster)))
                } else {
                    Dialog::Join(JoinDialog::open(&cluster.control_plane_url))
                });
                Action::None
            }
            KeyCode::F(5) => {
                self.refreshing = true;
                Action::Refresh
            }
            KeyCode::F(6) => {
                self.dialog = Some(Dialog::Confirm(ConfirmDialog::new(Confirm::RestartServices)));
                Action::None
            }
            KeyCode::F(7) => {
                let (view, request) = DiagnosticsView::open();
                self.dialog = Some(Dialog::Diagnostics(view));
                Action::Call(request)
            }
            KeyCode::F(10) => {
                let running = self.snapshot.as_ref().map_or(0, |snap| snap.vms_running);
                self.dialog = Some(Dialog::Power(PowerDialog::open(running)));
                Action::None
            }
            KeyCode::F(12) => {
                self.dialog = Some(Dialog::Confirm(ConfirmDialog::new(Confirm::Shell)));
                Action::None
            }
            _ => return Action::None,
        };
        self.notice = None;
        action
    }

    /// Takes qx-node's answer to a request and says what to do next. A reply whose dialog the operator has closed
    /// meanwhile ends up in the notice line.
    pub fn on_reply(&mut self, reply: Reply) -> Action {
        match reply {
            Reply::NetworkConfig(result) => {
                if let Some(Dialog::Network(dialog)) = &mut self.dialog {
                    dialog.on_loaded(result);
                }
                Action::None
            }
            Reply::NetworkSet(Ok(net)) => {
                self.close(|d| matches!(d, Dialog::Network(_)));
                self.notice = Some(format!("Network configuration applied: {}", net.describe()));
                Action::Refresh
            }
            Reply::NetworkSet(Err(error)) => {
                match &mut self.dialog {
                    Some(Dialog::Network(dialog)) => dialog.on_refused(&error),
                    _ => self.notice = Some(format!("Network configuration failed: {error}")),
                }
                Action::None
            }
            Reply::Ssh(Ok(ssh)) => {
                self.close(|d| matches!(d, Dialog::Ssh(_)));
                self.notice = Some(format!("SSH {}", ssh.describe(self.now)));
                if let Some(host) = self.snapshot.as_mut().and_then(|snap| snap.host.as_mut()) {
                    host.ssh = ssh;
                }
                Action::Refresh
            }
            Reply::Ssh(Err(error)) => {
                match &mut self.dialog {
                    Some(Dialog::Ssh(dialog)) => dialog.on_refused(&error),
                    _ => self.notice = Some(format!("SetSsh failed: {error}")),
                }
                Action::None
            }
            Reply::Joined(Ok(cluster)) => {
                self.close(|d| matches!(d, Dialog::Join(_)));
                let name = if cluster.cluster_name.is_empty() {
                    "the cluster".to_owned()
                } else {
                    format!("cluster \"{}\"", cluster.cluster_name)
                };
                self.notice = Some(format!("Joined {name} at {}", cluster.control_plane_url));
                if let Some(host) = self.snapshot.as_mut().and_then(|snap| snap.host.as_mut()) {
                    host.cluster = cluster;
                }
                Action::Refresh
            }
            Reply::Joined(Err(error)) => {
                match &mut self.dialog {
                    Some(Dialog::Join(dialog)) => dialog.on_refused(&error),
                    _ => self.notice = Some(format!("Joining failed: {error}")),
                }
                Action::None
            }
            Reply::Left(result) => {
                if let (Ok(cluster), Some(host)) = (&result, self.snapshot.as_mut().and_then(|s| s.host.as_mut())) {
                    host.cluster = cluster.clone();
                }
                self.confirmed(result.map(drop), "Left the cluster; this node is standalone")
            }
            Reply::Restarted(result) => {
                let ok = result.is_ok();
                let action = self.confirmed(result, "Services are restarting; VMs keep running");
                if ok {
                    self.reconnecting = Some(Reconnect { since: self.now, lost: false });
                }
                action
            }
            Reply::Diagnostics(result) => {
                if let Some(Dialog::Diagnostics(view)) = &mut self.dialog {
                    view.on_loaded(result);
                }
                Action::None
            }
            Reply::Power(action, Ok(())) => {
                self.close(|d| matches!(d, Dialog::Power(_)));
                self.notice = Some(match action {
                    PowerAction::Reboot => "The host is rebooting...".into(),
                    PowerAction::Shutdown => "The host is shutting down...".into(),
                });
                Action::None
            }
            Reply::Power(action, Err(error)) => {
                match &mut self.dialog {
                    Some(Dialog::Power(dialog)) => dialog.on_refused(&error),
                    _ => self.notice = Some(format!("qx-node refused to {}: {error}", action.verb())),
                }
                Action::None
            }
            Reply::Shell(result) => {
                let waiting = matches!(&self.dialog, Some(Dialog::Confirm(d)) if d.what == Confirm::Shell);
                match result {
                    // Only while the operator still waits for it: a shell must never appear unasked.
                    Ok(argv) if !argv.is_empty() && waiting => {
                        self.dialog = None;
                        Action::RunShell(argv)
                    }
                    Ok(argv) if !argv.is_empty() => Action::None,
                    Ok(_) => self.confirmed(Err(RpcError::new(tonic::Code::Internal, "qx-node sent no command")), ""),
                    Err(error) => self.confirmed(Err(error), ""),
                }
            }
        }
    }

    /// The end of a yes-or-no dialog's request: closed with `done` as the notice, or the failure shown in it.
    fn confirmed(&mut self, result: Result<(), RpcError>, done: &str) -> Action {
        match (result, &mut self.dialog) {
            (Ok(()), _) => {
                self.close(|d| matches!(d, Dialog::Confirm(_)));
                self.notice = Some(done.to_owned());
                Action::Refresh
            }
            (Err(error), Some(Dialog::Confirm(dialog))) => {
                dialog.on_refused(&error);
                Action::None
            }
            (Err(error), _) => {
                self.notice = Some(error.message);
                Action::None
            }
        }
    }

    fn close(&mut self, which: impl Fn(&Dialog) -> bool) {
        if self.dialog.as_ref().is_some_and(which) {
            self.dialog = None;
        }
    }

    /// The emergency shell ended; `how` says how (`exit status 0`, or why it could not run).
    pub fn shell_done(&mut self, how: &str) {
        self.notice = Some(format!("Emergency shell ended: {how}"));
    }
}

#[cfg(test)]
mod tests {
    use crate::host::{AddressMode, ClusterSummary, Membership, NetworkConfig, SshState};

    use super::*;

    fn press(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn type_text(app: &mut App, text: &str) {
        for c in text.chars() {
            app.on_key(press(KeyCode::Char(c)));
        }
    }

    fn host() -> HostSummary {
        HostSummary {
            management_address: "10.0.0.5/24".into(),
            management_url: "grpcs://10.0.0.5:7443".into(),
            network: Some(NetworkConfig {
                interface: "eth0".into(),
                mode: AddressMode::Static,
                address: "10.0.0.5/24".into(),
                gateway: "10.0.0.1".into(),
                vlan: 0,
                dns_servers: vec![],
            }),
            ssh: SshState::default(),
            cluster: ClusterSummary { state: Membership::Standalone, ..ClusterSummary::default() },
        }
    }

    fn connected(running: u32) -> App {
        let mut app = App::new("/s", false);
        let info = NodeInfo { node_name: "n".into(), vms_running: running, vms_total: 4, ..NodeInfo::default() };
        app.set_snapshot(Snapshot::from_node_info(info).with_host(Ok(host())));
        app
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
    fn quit_only_when_allowed_and_not_from_a_dialog() {
        let mut app = App::new("/s", true);
        assert_eq!(app.on_key(press(KeyCode::Char('q'))), Action::Quit);
        assert_eq!(app.on_key(press(KeyCode::Esc)), Action::Quit);
        assert_eq!(app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
        app.on_key(press(KeyCode::F(3)));
        assert_eq!(app.on_key(press(KeyCode::Esc)), Action::None, "Esc closes the dialog");
        assert!(app.dialog.is_none());
        let mut app = App::new("/s", false);
        assert_eq!(app.on_key(press(KeyCode::Char('q'))), Action::None);
        assert_eq!(app.on_key(press(KeyCode::Esc)), Action::None);
        assert_eq!(app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::None);
        // F1 is not on the bar: nothing happens.
        assert_eq!(app.on_key(press(KeyCode::F(1))), Action::None);
        assert!(app.dialog.is_none());
    }

    #[test]
    fn f2_reads_then_writes_the_network() {
        let mut app = connected(0);
        assert_eq!(app.on_key(press(KeyCode::F(2))), Action::Call(Request::GetNetworkConfig));
        let Some(Dialog::Network(dialog)) = &app.dialog else { panic!("{:?}", app.dialog) };
        assert_eq!(dialog.form.value("address"), "10.0.0.5/24", "pre-filled from the host status at once");
        assert_eq!(app.on_key(press(KeyCode::Char('x'))), Action::None, "keys wait for the read");
        let mut net = host().network.unwrap();
        net.dns_servers = vec!["10.0.0.53".into()];
        assert_eq!(app.on_reply(Reply::NetworkConfig(Ok(net.clone()))), Action::None);
        let Action::Call(Request::SetNetworkConfig(sent)) = app.on_key(press(KeyCode::Enter)) else { panic!() };
        assert_eq!(sent, net);
        assert_eq!(app.on_reply(Reply::NetworkSet(Ok(net))), Action::Refresh);
        assert!(app.dialog.is_none());
        assert_eq!(app.notice.as_deref(), Some("Network configuration applied: eth0, static 10.0.0.5/24"));
    }

    #[test]
    fn bad_network_input_sends_nothing() {
        let mut app = connected(0);
        app.on_key(press(KeyCode::F(2)));
        app.on_reply(Reply::NetworkConfig(Ok(host().network.unwrap())));
        // Interface, mode, then the address.
        app.on_key(press(KeyCode::Tab));
        app.on_key(press(KeyCode::Tab));
        app.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
        type_text(&mut app, "10.0.0.5");
        assert_eq!(app.on_key(press(KeyCode::Enter)), Action::None);
        let Some(Dialog::Network(dialog)) = &app.dialog else { panic!() };
        assert_eq!(
            dialog.form.field("address").unwrap().error.as_deref(),
            Some("\"10.0.0.5\" has no prefix length (e.g. /24)")
        );
    }

    #[test]
    fn server_validation_lands_on_the_fields_and_late_replies_become_notices() {
        let mut app = connected(0);
        app.on_key(press(KeyCode::F(2)));
        app.on_reply(Reply::NetworkConfig(Ok(host().network.unwrap())));
        app.on_key(press(KeyCode::Enter));
        let refusal = RpcError::new(
            tonic::Code::InvalidArgument,
            "address: \"10.0.0.5\" has no prefix length (e.g. /24); vlan: \"5000\" is outside 1..=4094",
        );
        assert_eq!(app.on_reply(Reply::NetworkSet(Err(refusal.clone()))), Action::None);
        let Some(Dialog::Network(dialog)) = &app.dialog else { panic!() };
        assert_eq!(dialog.form.field("vlan").unwrap().error.as_deref(), Some("\"5000\" is outside 1..=4094"));
        app.on_key(press(KeyCode::Esc));
        app.on_reply(Reply::NetworkSet(Err(RpcError::new(tonic::Code::Internal, "apply failed"))));
        assert_eq!(app.notice.as_deref(), Some("Network configuration failed: apply failed"));
    }

    #[test]
    fn f3_enables_ssh_and_the_state_shows_at_once() {
        let mut app = connected(0);
        app.tick(1_000);
        assert_eq!(app.on_key(press(KeyCode::F(3))), Action::None);
        assert_eq!(
            app.on_key(press(KeyCode::Enter)),
            Action::Call(Request::SetSsh { enabled: true, timeout_minutes: 30 })
        );
        let ssh = SshState { enabled: true, disable_at_unix: 1_000 + 30 * 60 };
        assert_eq!(app.on_reply(Reply::Ssh(Ok(ssh))), Action::Refresh);
        assert_eq!(app.notice.as_deref(), Some("SSH enabled, turns off in 30 min"));
        assert_eq!(app.host().unwrap().ssh, ssh);
        assert!(app.dialog.is_none());
    }

    #[test]
    fn f4_joins_a_standalone_node_and_offers_leave_to_a_member() {
        let mut app = connected(0);
        app.on_key(press(KeyCode::F(4)));
        assert!(matches!(app.dialog, Some(Dialog::Join(_))));
        type_text(&mut app, "http://127.0.0.1:4000");
        assert_eq!(app.on_key(press(KeyCode::Enter)), Action::None, "empty token: nothing sent");
        type_text(&mut app, "tok");
        let Action::Call(Request::JoinCluster { join_token, .. }) = app.on_key(press(KeyCode::Enter)) else { panic!() };
        assert_eq!(join_token, "tok");
        let refused = RpcError::new(tonic::Code::Unauthenticated, "the control plane refused the join token");
        app.on_reply(Reply::Joined(Err(refused)));
        let Some(Dialog::Join(dialog)) = &app.dialog else { panic!() };
        assert_eq!(
            dialog.form.status,
            crate::dialogs::form::Status::Failed("Joining failed: the control plane refused the join token".into())
        );
        let cluster = ClusterSummary {
            state: Membership::Member,
            control_plane_url: "http://127.0.0.1:4000".into(),
            cluster_name: "lab".into(),
            ..ClusterSummary::default()
        };
        assert_eq!(app.on_reply(Reply::Joined(Ok(cluster))), Action::Refresh);
        assert_eq!(app.notice.as_deref(), Some("Joined cluster \"lab\" at http://127.0.0.1:4000"));
        app.on_key(press(KeyCode::F(4)));
        let Some(Dialog::Confirm(dialog)) = &app.dialog else { panic!() };
        assert!(matches!(dialog.what, Confirm::LeaveCluster(_)));
        assert_eq!(app.on_key(press(KeyCode::Enter)), Action::Call(Request::LeaveCluster));
        let standalone = ClusterSummary { state: Membership::Standalone, ..ClusterSummary::default() };
        assert_eq!(app.on_reply(Reply::Left(Ok(standalone))), Action::Refresh);
        assert_eq!(app.notice.as_deref(), Some("Left the cluster; this node is standalone"));
        assert!(!app.host().unwrap().cluster.is_member());
    }

    #[test]
    fn f6_restarts_and_reconnects() {
        let mut app = connected(0);
        app.tick(100);
        app.on_key(press(KeyCode::F(6)));
        assert_eq!(app.on_key(press(KeyCode::Enter)), Action::Call(Request::RestartServices));
        assert_eq!(app.on_reply(Reply::Restarted(Ok(()))), Action::Refresh);
        assert_eq!(app.reconnecting, Some(Reconnect { since: 100, lost: false }));
        // The old daemon may still answer the first polls.
        app.set_snapshot(connected(0).snapshot.unwrap());
        assert!(app.reconnecting.is_some());
        app.set_snapshot(Snapshot::unreachable("refused"));
        assert_eq!(app.reconnecting, Some(Reconnect { since: 100, lost: true }));
        app.set_snapshot(connected(0).snapshot.unwrap());
        assert_eq!(app.reconnecting, None);
        assert_eq!(app.notice.as_deref(), Some("Reconnected to qx-node"));
        // A restart too quick to be seen ends after the grace period.
        app.on_key(press(KeyCode::F(6)));
        app.on_key(press(KeyCode::Enter));
        app.on_reply(Reply::Restarted(Ok(())));
        app.tick(100 + RECONNECT_GRACE_SECS);
        app.set_snapshot(connected(0).snapshot.unwrap());
        assert_eq!(app.reconnecting, None);
    }

    #[test]
    fn f7_loads_and_scrolls_diagnostics() {
        let mut app = connected(0);
        app.resize(Rect::new(0, 0, 80, 24));
        assert_eq!(app.on_key(press(KeyCode::F(7))), Action::Call(Request::GetDiagnostics));
        let report = crate::host::DiagnosticsReport {
            log_lines: (0..100).map(|i| format!("line {i}")).collect(),
            ..Default::default()
        };
        app.on_reply(Reply::Diagnostics(Ok(report)));
        app.on_key(press(KeyCode::End));
        let Some(Dialog::Diagnostics(view)) = &app.dialog else { panic!() };
        let page = usize::from(crate::view::diagnostics_page(app.area));
        assert!(page > 10, "{page}");
        assert_eq!(view.scroll, view.lines.len() - page);
        app.on_key(press(KeyCode::Esc));
        assert!(app.dialog.is_none());
    }

    #[test]
    fn f10_warns_about_running_vms_before_confirming_them() {
        let mut app = connected(2);
        app.on_key(press(KeyCode::F(10)));
        assert_eq!(app.on_key(press(KeyCode::Enter)), Action::None, "the warning comes first");
        assert_eq!(
            app.on_key(press(KeyCode::Enter)),
            Action::Call(Request::Power { action: PowerAction::Reboot, confirm_running_vms: true })
        );
        assert_eq!(app.on_reply(Reply::Power(PowerAction::Reboot, Ok(()))), Action::None);
        assert_eq!(app.notice.as_deref(), Some("The host is rebooting..."));
        let mut app = connected(0);
        app.on_key(press(KeyCode::F(10)));
        app.on_key(press(KeyCode::Right));
        assert_eq!(
            app.on_key(press(KeyCode::Enter)),
            Action::Call(Request::Power { action: PowerAction::Shutdown, confirm_running_vms: false })
        );
    }

    #[test]
    fn f12_runs_the_shell_only_while_asked_for() {
        let mut app = connected(0);
        app.on_key(press(KeyCode::F(12)));
        assert_eq!(app.on_key(press(KeyCode::Enter)), Action::Call(Request::OpenShell));
        let argv = vec!["/bin/sh".to_owned(), "-l".to_owned()];
        assert_eq!(app.on_reply(Reply::Shell(Ok(argv.clone()))), Action::RunShell(argv.clone()));
        assert!(app.dialog.is_none());
        app.shell_done("exit status 0");
        assert_eq!(app.notice.as_deref(), Some("Emergency shell ended: exit status 0"));
        // Cancelled while waiting: the shell does not appear later.
        app.on_key(press(KeyCode::F(12)));
        app.on_key(press(KeyCode::Enter));
        app.on_key(press(KeyCode::Esc));
        assert_eq!(app.on_reply(Reply::Shell(Ok(argv))), Action::None);
        // An empty command is a failure, not a shell.
        app.on_key(press(KeyCode::F(12)));
        app.on_key(press(KeyCode::Enter));
        assert_eq!(app.on_reply(Reply::Shell(Ok(vec![]))), Action::None);
        let Some(Dialog::Confirm(dialog)) = &app.dialog else { panic!() };
        assert_eq!(
            dialog.status,
            crate::dialogs::form::Status::Failed("Opening the shell failed: qx-node sent no command".into())
        );
    }

    #[test]
    fn snapshot_from_node_info_and_host() {
        let info = NodeInfo {
            node_name: "n".into(),
            memory_total_bytes: 10,
            memory_available_bytes: 30,
            vms_running: 1,
            vms_total: 3,
            ..NodeInfo::default()
        };
        let snap = Snapshot::from_node_info(info);
        assert_eq!((snap.vms_running, snap.vms_total, &snap.error), (1, 3, &None));
        assert_eq!(snap.node.as_ref().unwrap().memory_used_bytes(), 0);
        let snap = snap.with_host(Err("Unimplemented".into()));
        assert_eq!((snap.host.as_ref(), snap.host_error.as_deref()), (None, Some("Unimplemented")));
        let snap = snap.with_host(Ok(host()));
        assert_eq!((snap.host.is_some(), snap.host_error.as_deref()), (true, None));
    }
}
