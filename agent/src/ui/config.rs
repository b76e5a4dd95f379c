//! The `ui:` section of node.yaml: the Host UI's HTTPS listener, which also serves `/metrics`.

use std::net::SocketAddr;

use qx_common::FieldError;
use serde::Deserialize;

/// The Host UI listener. It serves HTTPS with the node's certificate (`certificates/node.pem`), no client
/// certificate asked for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Where the Host UI and `/metrics` listen. Default: none (no listener); the host image sets `0.0.0.0:8443`.
    pub listen: Option<SocketAddr>,
}

#[allow(clippy::derivable_impls)]
impl Default for UiConfig {
    fn default() -> Self {
        Self { listen: None }
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
        errors
    }
}
