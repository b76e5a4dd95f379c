//! The dialogs the function keys open, one file each, and the form they share.
//!
//! A dialog is plain data: it takes keys and says what should happen ([`Outcome`]), and takes replies from
//! qx-node. Checks on what the operator typed are pure functions beside each dialog (`network::check_address`,
//! ...), run field by field as focus leaves a field and all together on Enter: a dialog with a problem shows it
//! under the field and sends nothing.

pub mod confirm;
pub mod diagnostics;
pub mod form;
pub mod join;
pub mod network;
pub mod power;
pub mod ssh;

use ratatui::crossterm::event::KeyEvent;

pub use confirm::{Confirm, ConfirmDialog};
pub use diagnostics::DiagnosticsView;
pub use join::JoinDialog;
pub use network::NetworkDialog;
pub use power::PowerDialog;
pub use ssh::SshDialog;

use crate::rpc::Request;

/// What a key did to a dialog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The dialog stays open (it may have changed).
    Stay,
    /// The operator cancelled or closed it.
    Close,
    /// Send this to qx-node; the dialog shows that it is waiting.
    Call(Request),
}

/// The dialog on top of the main screen, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dialog {
    Network(NetworkDialog),
    Ssh(SshDialog),
    Join(JoinDialog),
    Confirm(ConfirmDialog),
    Power(PowerDialog),
    Diagnostics(DiagnosticsView),
}

impl Dialog {
    /// `page`: rows a scrolling view shows (see [`crate::view::diagnostics_page`]).
    pub fn on_key(&mut self, key: KeyEvent, page: usize) -> Outcome {
        match self {
            Self::Network(dialog) => dialog.on_key(key),
            Self::Ssh(dialog) => dialog.on_key(key),
            Self::Join(dialog) => dialog.on_key(key),
            Self::Confirm(dialog) => dialog.on_key(key),
            Self::Power(dialog) => dialog.on_key(key),
            Self::Diagnostics(view) => view.on_key(key, page),
        }
    }
}

/// A key press without modifiers, for the dialogs' tests.
#[cfg(test)]
pub(crate) fn key(code: ratatui::crossterm::event::KeyCode) -> KeyEvent {
    KeyEvent::new(code, ratatui::crossterm::event::KeyModifiers::NONE)
}
