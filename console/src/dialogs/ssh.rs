//! F3: turn SSH on, with a timer that turns it off again, or off at once.

use ratatui::crossterm::event::KeyEvent;

use super::form::{Field, Form, FormKey, Status};
use super::Outcome;
use crate::host::SshState;
use crate::rpc::{Request, RpcError};

/// The choice field's options.
pub const CHOICES: &[&str] = &["enable", "disable"];
/// What the minutes field starts with.
pub const DEFAULT_TIMEOUT_MINUTES: u32 = 30;
/// A week, as qx-node: SSH left on longer than that should be a decision made without a timer (0).
pub const MAX_TIMEOUT_MINUTES: u32 = 7 * 24 * 60;

/// Minutes until SSH turns itself off; 0 means no timer.
pub fn check_minutes(value: &str) -> Result<u32, String> {
    if value.is_empty() {
        return Err("is empty (minutes; 0 = no timer)".into());
    }
    match value.parse::<u32>() {
        Ok(minutes) if minutes <= MAX_TIMEOUT_MINUTES => Ok(minutes),
        Ok(_) => Err(format!("\"{value}\" is outside 0..={MAX_TIMEOUT_MINUTES} (a week; 0 = no timer)")),
        Err(_) => Err(format!("\"{value}\" is not a number of minutes")),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshDialog {
    pub form: Form,
    /// The state when the dialog opened, shown at its top.
    pub current: SshState,
}

impl SshDialog {
    /// Offers the opposite of the current state: enabling when SSH is off, disabling when it is on.
    pub fn open(current: SshState) -> Self {
        let choice = if current.enabled { "disable" } else { "enable" };
        let form = Form::new(vec![
            Field::choice("enabled", "SSH", CHOICES, choice),
            Field::text("timeout_minutes", "Turn off after", DEFAULT_TIMEOUT_MINUTES.to_string())
                .with_hint("minutes, 0 = no timer"),
        ]);
        let mut dialog = Self { form, current };
        dialog.sync();
        dialog
    }

    fn enabling(&self) -> bool {
        self.form.value("enabled") == "enable"
    }

    fn sync(&mut self) {
        let enabling = self.enabling();
        self.form.set_enabled("timeout_minutes", enabling);
    }

    fn recheck(&mut self) {
        let error = check_minutes(self.form.value("timeout_minutes").trim()).err();
        self.form.set_error("timeout_minutes", error);
    }

    pub fn on_refused(&mut self, error: &RpcError) {
        self.form.on_refused(error, "SetSsh failed");
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        match self.form.on_key(key) {
            FormKey::Cancel => Outcome::Close,
            FormKey::Edited("enabled") => {
                self.sync();
                Outcome::Stay
            }
            FormKey::Edited("timeout_minutes") => {
                // A field in error is checked as it is typed, so the message goes as soon as the value is right.
                if self.form.field("timeout_minutes").is_some_and(|f| f.error.is_some()) {
                    self.recheck();
                }
                Outcome::Stay
            }
            FormKey::Left("timeout_minutes") => {
                self.recheck();
                Outcome::Stay
            }
            FormKey::Submit => {
                let request = if self.enabling() {
                    match check_minutes(self.form.value("timeout_minutes").trim()) {
                        Ok(timeout_minutes) => Request::SetSsh { enabled: true, timeout_minutes },
                        Err(error) => {
                            self.form.set_error("timeout_minutes", Some(error));
                            return Outcome::Stay;
                        }
                    }
                } else {
                    Request::SetSsh { enabled: false, timeout_minutes: 0 }
                };
                self.form.status =
                    Status::Pending(if self.enabling() { "Enabling SSH..." } else { "Disabling SSH..." }.into());
                Outcome::Call(request)
            }
            _ => Outcome::Stay,
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::{KeyCode, KeyModifiers};

    use super::*;
    use crate::dialogs::key;

    #[test]
    fn minutes_checks() {
        assert_eq!(check_minutes("0"), Ok(0));
        assert_eq!(check_minutes("30"), Ok(30));
        assert_eq!(check_minutes("10080"), Ok(10080));
        assert_eq!(check_minutes("10081").unwrap_err(), "\"10081\" is outside 0..=10080 (a week; 0 = no timer)");
        assert_eq!(check_minutes("-1").unwrap_err(), "\"-1\" is not a number of minutes");
        assert_eq!(check_minutes("").unwrap_err(), "is empty (minutes; 0 = no timer)");
    }

    #[test]
    fn enabling_with_the_default_timer() {
        let mut dialog = SshDialog::open(SshState::default());
        assert_eq!(dialog.form.value("enabled"), "enable");
        assert_eq!(dialog.form.value("timeout_minutes"), "30");
        assert_eq!(
            dialog.on_key(key(KeyCode::Enter)),
            Outcome::Call(Request::SetSsh { enabled: true, timeout_minutes: 30 })
        );
        assert_eq!(dialog.form.status, Status::Pending("Enabling SSH...".into()));
    }

    #[test]
    fn disabling_when_enabled_ignores_the_minutes() {
        let mut dialog = SshDialog::open(SshState { enabled: true, disable_at_unix: 0 });
        assert_eq!(dialog.form.value("enabled"), "disable");
        assert!(!dialog.form.field("timeout_minutes").unwrap().enabled);
        assert_eq!(
            dialog.on_key(key(KeyCode::Enter)),
            Outcome::Call(Request::SetSsh { enabled: false, timeout_minutes: 0 })
        );
    }

    #[test]
    fn bad_minutes_are_shown_inline_and_nothing_is_sent() {
        let mut dialog = SshDialog::open(SshState::default());
        dialog.on_key(key(KeyCode::Tab));
        dialog.on_key(key(KeyCode::Backspace));
        dialog.on_key(key(KeyCode::Backspace));
        for c in "soon".chars() {
            dialog.on_key(key(KeyCode::Char(c)));
        }
        assert_eq!(dialog.on_key(key(KeyCode::Enter)), Outcome::Stay);
        assert_eq!(
            dialog.form.field("timeout_minutes").unwrap().error.as_deref(),
            Some("\"soon\" is not a number of minutes")
        );
        dialog.on_key(KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL));
        dialog.on_key(key(KeyCode::Char('0')));
        assert_eq!(dialog.form.field("timeout_minutes").unwrap().error, None);
        assert_eq!(
            dialog.on_key(key(KeyCode::Enter)),
            Outcome::Call(Request::SetSsh { enabled: true, timeout_minutes: 0 })
        );
    }

    #[test]
    fn refusals_are_shown() {
        let mut dialog = SshDialog::open(SshState::default());
        dialog.on_key(key(KeyCode::Enter));
        dialog.on_refused(&RpcError::new(tonic::Code::InvalidArgument, "timeout_minutes: 99999 is too long"));
        assert_eq!(dialog.form.field("timeout_minutes").unwrap().error.as_deref(), Some("99999 is too long"));
        dialog.on_refused(&RpcError::new(tonic::Code::Internal, "sshd did not start"));
        assert_eq!(dialog.form.status, Status::Failed("SetSsh failed: sshd did not start".into()));
    }
}
