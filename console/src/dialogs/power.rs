//! F10: reboot or shut the host down, with a second confirmation when VMs run.

use ratatui::crossterm::event::{KeyCode, KeyEvent};

use super::form::{Field, Form, FormKey, Status};
use super::Outcome;
use crate::host::PowerAction;
use crate::rpc::{Request, RpcError};

pub const ACTIONS: &[&str] = &["reboot", "shut down"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stage {
    /// Picking reboot or shut down; Enter confirms the choice.
    Choose,
    /// VMs run: the operator must confirm again, knowing how many. The text says so.
    Warn { action: PowerAction, warning: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerDialog {
    pub form: Form,
    pub stage: Stage,
    /// Running VMs as of the last snapshot.
    pub running_vms: u32,
}

/// `1 VM is running` / `3 VMs are running`.
pub fn running_text(count: u32) -> String {
    if count == 1 {
        "1 VM is running".to_owned()
    } else {
        format!("{count} VMs are running")
    }
}

impl PowerDialog {
    pub fn open(running_vms: u32) -> Self {
        let form = Form::new(vec![Field::choice("action", "Action", ACTIONS, "reboot")]);
        Self { form, stage: Stage::Choose, running_vms }
    }

    pub fn action(&self) -> PowerAction {
        match &self.stage {
            Stage::Warn { action, .. } => *action,
            Stage::Choose if self.form.value("action") == "shut down" => PowerAction::Shutdown,
            Stage::Choose => PowerAction::Reboot,
        }
    }

    fn send(&mut self, confirm_running_vms: bool) -> Outcome {
        let action = self.action();
        let pending = match action {
            PowerAction::Reboot => "Rebooting...",
            PowerAction::Shutdown => "Shutting down...",
        };
        self.form.status = Status::Pending(pending.into());
        Outcome::Call(Request::Power { action, confirm_running_vms })
    }

    /// Power was refused. FAILED_PRECONDITION means VMs started since the snapshot: qx-node's message (naming how
    /// many) becomes the warning to confirm.
    pub fn on_refused(&mut self, error: &RpcError) {
        self.form.status = Status::Editing;
        if error.code == tonic::Code::FailedPrecondition && matches!(self.stage, Stage::Choose) {
            self.stage = Stage::Warn { action: self.action(), warning: error.message.clone() };
        } else {
            self.form.status = Status::Failed(format!("qx-node refused to {}: {error}", self.action().verb()));
        }
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        match &self.stage {
            Stage::Choose => match self.form.on_key(key) {
                FormKey::Cancel => Outcome::Close,
                FormKey::Submit if self.running_vms > 0 => {
                    let warning = format!(
                        "{}. They stop when the host goes {}.",
                        running_text(self.running_vms),
                        if self.action() == PowerAction::Reboot { "down for the reboot" } else { "down" }
                    );
                    self.stage = Stage::Warn { action: self.action(), warning };
                    Outcome::Stay
                }
                FormKey::Submit => self.send(false),
                _ => Outcome::Stay,
            },
            Stage::Warn { .. } => match key.code {
                KeyCode::Esc => Outcome::Close,
                KeyCode::Enter if !self.form.is_pending() => self.send(true),
                _ => Outcome::Stay,
            },
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::dialogs::key;

    #[test]
    fn no_running_vms_one_confirmation() {
        let mut dialog = PowerDialog::open(0);
        dialog.on_key(key(KeyCode::Right));
        assert_eq!(dialog.action(), PowerAction::Shutdown);
        assert_eq!(
            dialog.on_key(key(KeyCode::Enter)),
            Outcome::Call(Request::Power { action: PowerAction::Shutdown, confirm_running_vms: false })
        );
        assert_eq!(dialog.form.status, Status::Pending("Shutting down...".into()));
    }

    #[test]
    fn running_vms_need_a_second_confirmation_naming_the_count() {
        let mut dialog = PowerDialog::open(3);
        assert_eq!(dialog.on_key(key(KeyCode::Enter)), Outcome::Stay, "nothing sent before the warning");
        assert_eq!(
            dialog.stage,
            Stage::Warn {
                action: PowerAction::Reboot,
                warning: "3 VMs are running. They stop when the host goes down for the reboot.".into()
            }
        );
        assert_eq!(dialog.on_key(key(KeyCode::Right)), Outcome::Stay, "the choice is made");
        assert_eq!(
            dialog.on_key(key(KeyCode::Enter)),
            Outcome::Call(Request::Power { action: PowerAction::Reboot, confirm_running_vms: true })
        );
        let mut dialog = PowerDialog::open(1);
        dialog.on_key(key(KeyCode::Enter));
        assert_eq!(dialog.on_key(key(KeyCode::Esc)), Outcome::Close, "the warning can be declined");
    }

    #[test]
    fn vms_started_since_the_snapshot_turn_a_refusal_into_the_warning() {
        let mut dialog = PowerDialog::open(0);
        dialog.on_key(key(KeyCode::Enter));
        dialog.on_refused(&RpcError::new(tonic::Code::FailedPrecondition, "2 VMs are running"));
        assert_eq!(dialog.stage, Stage::Warn { action: PowerAction::Reboot, warning: "2 VMs are running".into() });
        assert_eq!(
            dialog.on_key(key(KeyCode::Enter)),
            Outcome::Call(Request::Power { action: PowerAction::Reboot, confirm_running_vms: true })
        );
        dialog.on_refused(&RpcError::new(tonic::Code::Internal, "reboot: command not found"));
        assert_eq!(dialog.form.status, Status::Failed("qx-node refused to reboot: reboot: command not found".into()));
    }
}
