//! An OVSDB client (RFC 7047, with ovsdb-server's `monitor_cond` extension) on tokio, over a unix socket or TCP.
//!
//! - [`Client`]: `list_dbs`, `get_schema`, `transact`, `monitor`/`monitor_cond`, `echo` (both ways), `cancel`,
//!   and any other method raw ([`Client::call`]). Requests are pipelined and matched by id; the byte stream is
//!   framed incrementally, since ovsdb-server sends messages back to back without separators. It reconnects with
//!   backoff and re-establishes its monitors.
//! - [`Operation`], [`Condition`], [`Mutation`]: transaction operations, built in Rust and sent as RFC 7047 JSON.
//! - [`Value`], [`Atom`], [`Row`]: OVSDB data.
//! - [`Txn`]: operations with roles, so a failed `wait` precondition says which check failed.
//! - [`Monitor`]: a replica of monitored rows, kept current, with a change stream and [`Monitor::wait_for`].
//!
//! Nothing here knows the `Open_vSwitch` schema; [`crate::vswitch`] does.

mod client;
mod codec;
mod data;
mod error;
mod monitor;
mod ops;
mod rpc;
mod schema;
mod txn;

pub use client::{Backoff, Client, ClientOptions, ConnectionState, Endpoint, PendingTransact};
pub use data::{row_from_json, row_to_json, Atom, Row, Value};
pub use error::Error;
pub use monitor::{
    Monitor, MonitorEvent, MonitorRequest, Replica, RowUpdate, Select, TableMonitor, Update, UpdateKind,
};
pub use ops::{Condition, Function, Mutation, Mutator, Operation, OperationResult, WaitUntil};
pub use schema::{AtomicType, ColumnType, Schema, TableSchema};
pub use txn::{inserted_uuid, Txn};
