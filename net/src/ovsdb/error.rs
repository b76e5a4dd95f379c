//! The error type of the OVSDB client.

use std::io;
use std::time::Duration;

/// What went wrong talking OVSDB, named by the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The endpoint string is neither `unix:PATH`, `tcp:HOST:PORT` nor an absolute path.
    #[error("OVSDB endpoint {value:?} is not unix:PATH, tcp:HOST:PORT or an absolute socket path")]
    Endpoint {
        /// The string given.
        value: String,
    },

    /// The first connection could not be made within `connect_timeout` (later ones are retried forever).
    #[error("connecting to OVSDB at {endpoint}")]
    Connect {
        /// The endpoint, e.g. `unix:/run/openvswitch/db.sock`.
        endpoint: String,
        /// The last connect error.
        #[source]
        source: io::Error,
    },

    /// The request was refused before being sent (e.g. conditions on a `monitor` that is not `monitor_cond`).
    #[error("OVSDB request `{method}` refused: {reason}")]
    Request {
        /// The method.
        method: String,
        /// Why.
        reason: String,
    },

    /// The parameters could not be encoded as JSON.
    #[error("encoding OVSDB request `{method}`")]
    Encode {
        /// The method.
        method: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },

    /// No reply within the request timeout. A `transact` still waiting at the server is sent a `cancel`.
    #[error("OVSDB request `{method}` got no reply within {timeout:?}")]
    Timeout {
        /// The method.
        method: String,
        /// The timeout that expired.
        timeout: Duration,
    },

    /// The connection dropped after the request was sent and before its reply: it may or may not have taken
    /// effect. The client reconnects by itself; read the state again (a [`Monitor`](super::Monitor) does) before
    /// retrying anything that is not idempotent.
    #[error("OVSDB connection lost before `{method}` completed; it may or may not have taken effect")]
    Disconnected {
        /// The method.
        method: String,
    },

    /// The client is closed: dropped, or the connection was lost with reconnecting disabled.
    #[error("OVSDB client closed before `{method}` completed: {reason}")]
    Closed {
        /// The method.
        method: String,
        /// Why the client closed.
        reason: String,
    },

    /// The request was canceled by the caller ([`PendingTransact::cancel`](super::PendingTransact::cancel)).
    #[error("OVSDB request `{method}` was canceled")]
    Canceled {
        /// The method.
        method: String,
    },

    /// The server answered with a JSON-RPC error, e.g. `unknown database`.
    #[error("OVSDB request `{method}` failed: {error}{}", details.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Rpc {
        /// The method.
        method: String,
        /// The error, e.g. `unknown database`.
        error: String,
        /// The server's explanation, if it gave one.
        details: Option<String>,
    },

    /// An operation of a transaction failed, so none of it took effect.
    #[error("OVSDB transaction on {db}: operation {index} ({op}) failed: {error}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
    Transaction {
        /// The database.
        db: String,
        /// Index of the failed operation; one past the last for errors found at commit (`referential integrity
        /// violation`, `constraint violation`).
        index: usize,
        /// The failed operation's kind, e.g. `insert`, or `commit`.
        op: &'static str,
        /// The error, e.g. `constraint violation`, `timed out` (a `wait`), `not owner`.
        error: String,
        /// The server's explanation.
        details: String,
    },

    /// The reply did not have the shape the method promises.
    #[error("decoding reply of OVSDB request `{method}`: {reason}")]
    Decode {
        /// The method.
        method: String,
        /// What was wrong.
        reason: String,
    },

    /// The database's schema could not be parsed.
    #[error("schema of OVSDB database {db}: {reason}")]
    Schema {
        /// The database.
        db: String,
        /// What was wrong.
        reason: String,
    },

    /// [`Monitor::wait_for`](super::Monitor::wait_for) timed out.
    #[error("OVSDB monitor {monitor}: condition not met within {timeout:?}")]
    WaitTimeout {
        /// The monitor id.
        monitor: String,
        /// The timeout that expired.
        timeout: Duration,
    },
}

impl Error {
    /// For a failed transaction, the index of the failed operation and the server's error string.
    pub fn transaction_error(&self) -> Option<(usize, &str)> {
        match self {
            Error::Transaction { index, error, .. } => Some((*index, error)),
            _ => None,
        }
    }
}
