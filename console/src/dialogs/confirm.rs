//! Yes-or-no dialogs: F6 restart services, F4 leave the cluster (on a member), F12 the emergency shell.

use ratatui::crossterm::event::{KeyCode, KeyEvent};

use super::form::Status;
use super::Outcome;
use crate::host::ClusterSummary;
use crate::rpc::{Request, RpcError};

/// What is being confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    RestartServices,
    LeaveCluster(ClusterSummary),
    Shell,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmDialog {
    pub what: Confirm,
    pub status: Status,
}

impl ConfirmDialog {
    pub fn new(what: Confirm) -> Self {
        Self { what, status: Status::Editing }
    }

    pub fn title(&self) -> &'static str {
        match self.what {
            Confirm::RestartServices => "Restart services",
            Confirm::LeaveCluster(_) => "Leave cluster",
            Confirm::Shell => "Emergency shell",
        }
    }

    /// The question, one paragraph per item.
    pub fn text(&self) -> Vec<String> {
        match &self.what {
            Confirm::RestartServices => vec![
                "Restart the Quantix services (qx-node) on this host?".into(),
                "Running VMs keep running; the console reconnects by itself.".into(),
            ],
            Confirm::LeaveCluster(cluster) => {
                let name = if cluster.cluster_name.is_empty() {
                    "a cluster".to_owned()
                } else {
                    format!("cluster \"{}\"", cluster.cluster_name)
                };
                vec![
                    format!("This node is a member of {name} at {}.", cluster.control_plane_url),
                    "Leave it? Heartbeats stop and the node becomes standalone; VMs keep running.".into(),
                ]
            }
            Confirm::Shell => vec![
                "Open a root shell on this console?".into(),
                "Use it only when the console and qxctl cannot fix the problem; opening it is logged.".into(),
                "Leave the shell (exit) to come back to the console.".into(),
            ],
        }
    }

    /// The word on the Enter key.
    pub fn confirm_label(&self) -> &'static str {
        match self.what {
            Confirm::RestartServices => "restart",
            Confirm::LeaveCluster(_) => "leave",
            Confirm::Shell => "open the shell",
        }
    }

    pub fn on_refused(&mut self, error: &RpcError) {
        let what = match self.what {
            Confirm::RestartServices => "Restarting failed",
            Confirm::LeaveCluster(_) => "Leaving failed",
            Confirm::Shell => "Opening the shell failed",
        };
        self.status = Status::Failed(format!("{what}: {error}"));
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        match key.code {
            KeyCode::Esc => Outcome::Close,
            KeyCode::Enter if !matches!(self.status, Status::Pending(_)) => {
                let (request, pending) = match self.what {
                    Confirm::RestartServices => (Request::RestartServices, "Restarting services..."),
                    Confirm::LeaveCluster(_) => (Request::LeaveCluster, "Leaving the cluster..."),
                    Confirm::Shell => (Request::OpenShell, "Opening the shell..."),
                };
                self.status = Status::Pending(pending.into());
                Outcome::Call(request)
            }
            _ => Outcome::Stay,
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::dialogs::key;

    #[test]
    fn enter_asks_once_esc_cancels() {
        for (what, request) in [
            (Confirm::RestartServices, Request::RestartServices),
            (Confirm::LeaveCluster(ClusterSummary::default()), Request::LeaveCluster),
            (Confirm::Shell, Request::OpenShell),
        ] {
            let mut dialog = ConfirmDialog::new(what);
            assert_eq!(dialog.on_key(key(KeyCode::Char('y'))), Outcome::Stay);
            assert_eq!(dialog.on_key(key(KeyCode::Enter)), Outcome::Call(request));
            assert_eq!(dialog.on_key(key(KeyCode::Enter)), Outcome::Stay, "not twice");
            dialog.on_refused(&RpcError::new(tonic::Code::Internal, "boom"));
            assert!(matches!(&dialog.status, Status::Failed(text) if text.ends_with(": boom")), "{:?}", dialog.status);
            assert!(matches!(dialog.on_key(key(KeyCode::Enter)), Outcome::Call(_)), "a failure can be retried");
            assert_eq!(dialog.on_key(key(KeyCode::Esc)), Outcome::Close);
        }
    }
}
