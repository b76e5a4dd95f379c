//! The `ui:` section of node.yaml: the Host UI's HTTPS listener (which also serves `/metrics`) and its login.

use std::net::SocketAddr;
use std::path::PathBuf;

use qx_common::FieldError;
use serde::Deserialize;

/// The Host UI listener. It serves HTTPS with the node's certificate (`certificates/node.pem`), no client
/// certificate asked for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Where the Host UI and `/metrics` listen. Default: none (no listener); the host image sets `0.0.0.0:8443`.
    pub listen: Option<SocketAddr>,
    /// The local administrator's user name. Default: `root`.
    pub admin_user: String,
    /// The administrator's password as an argon2 PHC string (`qx-node --hash-password` prints one). Default: none,
    /// and nobody can log in.
    pub admin_password_hash: Option<String>,
    /// A session ends after this long without a request (1..=86400). Default: 900.
    pub session_idle_seconds: u64,
    /// And this long after its login in any case (1..=604800). Default: 28800 (8 h).
    pub session_max_seconds: u64,
    /// Failed logins within `lockout_seconds` that lock the login (1..=100). Default: 5.
    pub lockout_failures: u32,
    /// How long the login stays locked after the last of them (1..=86400). Default: 300.
    pub lockout_seconds: u64,
    /// The web app's built files. Default: `/usr/share/quantix/ui`.
    pub assets_dir: PathBuf,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            listen: None,
            admin_user: "root".into(),
            admin_password_hash: None,
            session_idle_seconds: 900,
            session_max_seconds: 28_800,
            lockout_failures: 5,
            lockout_seconds: 300,
            assets_dir: PathBuf::from("/usr/share/quantix/ui"),
        }
    }
}

impl UiConfig {
    /// Every problem of the section, with its field (`ui.<name>`) and value.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let Some(addr) = self.listen {
            if addr.port() == 0 {
                errors.push(FieldError::new("ui.listen", addr, "needs a port"));
            }
        }
        if self.admin_user.is_empty() || self.admin_user.len() > 64 || self.admin_user.chars().any(char::is_control) {
            errors.push(FieldError::new(
                "ui.admin_user",
                &self.admin_user,
                "must be 1-64 characters without control characters",
            ));
        }
        if let Some(hash) = &self.admin_password_hash {
            if !super::auth::is_valid_hash(hash) {
                // A hash is not the password, but it is still not for logs.
                errors.push(FieldError::secret(
                    "ui.admin_password_hash",
                    "is not an argon2 PHC string ($argon2id$...), make one with qx-node --hash-password",
                ));
            }
        }
        let ranges = [
            ("ui.session_idle_seconds", self.session_idle_seconds, 86_400),
            ("ui.session_max_seconds", self.session_max_seconds, 604_800),
            ("ui.lockout_failures", self.lockout_failures.into(), 100),
            ("ui.lockout_seconds", self.lockout_seconds, 86_400),
        ];
        for (field, value, max) in ranges {
            if value == 0 || value > max {
                errors.push(FieldError::new(field, value, format!("is outside 1..={max}")));
            }
        }
        if !self.assets_dir.is_absolute() {
            errors.push(FieldError::new("ui.assets_dir", self.assets_dir.display(), "is not an absolute path"));
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        assert!(UiConfig::default().validate().is_empty());
        let config = UiConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            admin_password_hash: Some("hunter2".into()),
            session_idle_seconds: 0,
            lockout_failures: 1000,
            ..UiConfig::default()
        };
        let errors = config.validate();
        let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["ui.listen", "ui.admin_password_hash", "ui.session_idle_seconds", "ui.lockout_failures"]);
        assert!(!format!("{:?}", errors[1]).contains("hunter2"), "the hash is not repeated");
    }
}
