//! The one error type of the crate: every fallible [`QmpClient`](crate::QmpClient) operation returns it.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// What went wrong talking QMP, named by the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The QMP socket could not be connected (after retrying while it did not exist yet or refused
    /// connections, until `connect_timeout`).
    #[error("connecting to QMP socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last connect error.
        #[source]
        source: io::Error,
    },

    /// The greeting QEMU sends on connect was not received or was not a QMP greeting.
    #[error("QMP greeting: {reason}")]
    Greeting {
        /// What was wrong, with the offending line when there was one.
        reason: String,
        /// The I/O or JSON error, if that is what went wrong.
        #[source]
        source: Option<io::Error>,
    },

    /// `qmp_capabilities`, which leaves capabilities-negotiation mode, failed.
    #[error("QMP capabilities negotiation")]
    Negotiate {
        /// How the `qmp_capabilities` command failed.
        #[source]
        source: Box<Error>,
    },

    /// The command's arguments could not be serialized to JSON.
    #[error("encoding arguments of QMP command `{command}`")]
    Encode {
        /// The command name.
        command: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// Writing the command to the socket failed. The connection is closed afterwards, since a partial
    /// write leaves the stream unusable.
    #[error("sending QMP command `{command}`")]
    Send {
        /// The command name.
        command: String,
        /// The write error.
        #[source]
        source: io::Error,
    },

    /// Duplicating the file descriptor or sending it with `SCM_RIGHTS` failed.
    #[error("passing a file descriptor with QMP command `{command}`")]
    FdPass {
        /// The command name.
        command: String,
        /// The `dup` or `sendmsg` error.
        #[source]
        source: io::Error,
    },

    /// No reply arrived within the timeout. The command may still run in QEMU; its late reply is dropped.
    #[error("QMP command `{command}` got no reply within {timeout:?}")]
    Timeout {
        /// The command name.
        command: String,
        /// The timeout that expired.
        timeout: Duration,
    },

    /// QEMU answered with an error.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// The QMP error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The connection closed (QEMU exited, the socket failed, or it was already closed) before the reply came.
    #[error("QMP connection closed before `{command}` completed")]
    Closed {
        /// The command name.
        command: String,
    },

    /// The reply did not have the shape the caller expected (typed [`execute`](crate::QmpClient::execute),
    /// [`add_fd`](crate::QmpClient::add_fd)).
    #[error("decoding reply of QMP command `{command}`")]
    Decode {
        /// The command name.
        command: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The QMP error class if QEMU answered with an error, e.g. `Some("CommandNotFound")`.
    pub fn class(&self) -> Option<&str> {
        match self {
            Error::Command { class, .. } => Some(class),
            Error::Negotiate { source } => source.class(),
            _ => None,
        }
    }
}
