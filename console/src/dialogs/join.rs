//! F4 on a standalone node: join a cluster with the control plane's URL and a join token.

use ratatui::crossterm::event::KeyEvent;

use super::form::{Field, Form, FormKey, Status};
use super::Outcome;
use crate::rpc::{Request, RpcError};

/// An `http://` or `https://` URL with a host.
pub fn check_url(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty (the control plane's gRPC endpoint, e.g. https://cp.example:8443)".into());
    }
    let rest = value.strip_prefix("https://").or_else(|| value.strip_prefix("http://"));
    match rest {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') && !value.chars().any(char::is_whitespace) => Ok(()),
        _ => Err(format!("\"{value}\" must be an http:// or https:// URL with a host")),
    }
}

/// The token itself is never quoted back: it is a secret.
pub fn check_token(value: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err("must not be empty (the join token the control plane issued)".into());
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinDialog {
    pub form: Form,
}

impl JoinDialog {
    /// `url`: the control plane this node last knew, if any.
    pub fn open(url: &str) -> Self {
        let mut form = Form::new(vec![
            Field::text("control_plane_url", "Control plane", url),
            Field::secret("join_token", "Join token"),
        ]);
        if !url.is_empty() {
            form.focus = 1;
        }
        Self { form }
    }

    fn check(&self, name: &str) -> Option<String> {
        let value = self.form.value(name).trim();
        match name {
            "control_plane_url" => check_url(value).err(),
            "join_token" => check_token(value).err(),
            _ => None,
        }
    }

    fn recheck(&mut self, name: &str) {
        let error = self.check(name);
        self.form.set_error(name, error);
    }

    /// JoinCluster failed: a validation message goes onto its fields, any other reason (the control plane is
    /// unreachable, refused the token, ...) under the form.
    pub fn on_refused(&mut self, error: &RpcError) {
        self.form.on_refused(error, "Joining failed");
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Outcome {
        match self.form.on_key(key) {
            FormKey::Cancel => Outcome::Close,
            FormKey::Ignored => Outcome::Stay,
            FormKey::Edited(name) => {
                if self.form.field(name).is_some_and(|f| f.error.is_some()) {
                    self.recheck(name);
                }
                Outcome::Stay
            }
            FormKey::Left(name) => {
                // An empty token is only wrong once the operator tries to join: tabbing past it is fine.
                if name != "join_token" || !self.form.value(name).is_empty() {
                    self.recheck(name);
                }
                Outcome::Stay
            }
            FormKey::Submit => {
                self.recheck("control_plane_url");
                self.recheck("join_token");
                if let Some(first) = self.form.fields.iter().position(|f| f.error.is_some()) {
                    self.form.focus = first;
                    return Outcome::Stay;
                }
                self.form.status = Status::Pending("Joining...".into());
                Outcome::Call(Request::JoinCluster {
                    control_plane_url: self.form.value("control_plane_url").trim().to_owned(),
                    join_token: self.form.value("join_token").trim().to_owned(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ratatui::crossterm::event::KeyCode;

    use super::*;
    use crate::dialogs::key;

    fn type_text(dialog: &mut JoinDialog, text: &str) {
        for c in text.chars() {
            dialog.on_key(key(KeyCode::Char(c)));
        }
    }

    #[test]
    fn url_and_token_checks() {
        assert!(check_url("https://cp.example:8443").is_ok());
        assert!(check_url("http://127.0.0.1:4000").is_ok());
        let not_url = "must be an http:// or https:// URL with a host";
        assert_eq!(check_url("cp.example:8443").unwrap_err(), format!("\"cp.example:8443\" {not_url}"));
        assert_eq!(check_url("https://").unwrap_err(), format!("\"https://\" {not_url}"));
        assert!(check_url("").unwrap_err().starts_with("must not be empty"));
        assert!(check_token("abc.def").is_ok());
        assert_eq!(check_token(" ").unwrap_err(), "must not be empty (the join token the control plane issued)");
    }

    #[test]
    fn an_empty_token_is_shown_inline_and_nothing_is_sent() {
        let mut dialog = JoinDialog::open("https://cp.example");
        assert_eq!(dialog.form.focused().unwrap().name, "join_token", "the URL is known: straight to the token");
        assert_eq!(dialog.on_key(key(KeyCode::Enter)), Outcome::Stay);
        assert_eq!(
            dialog.form.field("join_token").unwrap().error.as_deref(),
            Some("must not be empty (the join token the control plane issued)")
        );
        assert_eq!(dialog.form.field("control_plane_url").unwrap().error, None);
        assert!(!dialog.form.is_pending());
    }

    #[test]
    fn a_bad_url_is_shown_inline_and_nothing_is_sent() {
        let mut dialog = JoinDialog::open("");
        type_text(&mut dialog, "cp.example");
        dialog.on_key(key(KeyCode::Tab));
        assert_eq!(
            dialog.form.field("control_plane_url").unwrap().error.as_deref(),
            Some("\"cp.example\" must be an http:// or https:// URL with a host")
        );
        assert_eq!(dialog.form.field("join_token").unwrap().error, None);
        type_text(&mut dialog, "secret");
        assert_eq!(dialog.on_key(key(KeyCode::Enter)), Outcome::Stay);
        assert_eq!(dialog.form.focused().unwrap().name, "control_plane_url");
    }

    #[test]
    fn join_sends_url_and_token_and_shows_failures() {
        let mut dialog = JoinDialog::open("");
        type_text(&mut dialog, "http://127.0.0.1:4000");
        dialog.on_key(key(KeyCode::Tab));
        type_text(&mut dialog, "s3cret");
        assert_eq!(dialog.form.field("join_token").unwrap().shown(), "******");
        assert_eq!(
            dialog.on_key(key(KeyCode::Enter)),
            Outcome::Call(Request::JoinCluster {
                control_plane_url: "http://127.0.0.1:4000".into(),
                join_token: "s3cret".into()
            })
        );
        assert_eq!(dialog.form.status, Status::Pending("Joining...".into()));
        dialog.on_refused(&RpcError::new(tonic::Code::Unauthenticated, "the join token was refused"));
        assert_eq!(dialog.form.status, Status::Failed("Joining failed: the join token was refused".into()));
    }
}
