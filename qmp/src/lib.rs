//! Async clients for QEMU's two JSON protocols over unix sockets: QMP, the QEMU Machine Protocol `vmm` drives its
//! QEMU processes with, and QGA, the guest agent protocol ([`qga`]).
//!
//! Both are front ends on one JSON channel (line framing, request ids, per-command timeouts, file descriptors over
//! `SCM_RIGHTS`, an event stream, and a clean [`Error::Closed`] for every waiting command when the peer goes).
//!
//! [`QmpClient`] connects (retrying while QEMU creates its socket), checks the greeting, negotiates capabilities,
//! then runs commands concurrently from any number of tasks, matching replies by id. Commands are typed
//! ([`QmpClient::execute`] with `qapi-qmp`'s definitions, or this crate's [`commands`] where `qapi-qmp`, generated
//! from QEMU 9.1, and QEMU 7.2 disagree) or raw ([`QmpClient::execute_raw`], JSON in and out). File descriptors
//! travel with `SCM_RIGHTS` ([`QmpClient::getfd`], [`QmpClient::add_fd`], [`QmpClient::execute_with_fd`]). Events
//! go to every [`QmpClient::subscribe`]r, typed with [`QmpEvent::typed`]; `query-status`'s run state is a
//! [`RunState`].
//!
//! It does not start, watch or kill QEMU, and knows nothing of VMs: process management and the meaning of events
//! belong to `vmm`.
//!
//! # Example
//!
//! ```no_run
//! use qx_qmp::{ConnectOptions, Event, QemuEvent, QmpClient};
//!
//! # async fn example() -> Result<(), qx_qmp::Error> {
//! let qmp = QmpClient::connect("/run/quantix/vm/web1/qmp.sock", ConnectOptions::default()).await?;
//! println!("QEMU {}.{}", qmp.greeting().major, qmp.greeting().minor);
//!
//! let mut events = qmp.subscribe();
//! let status = qmp.query_status().await?;
//! println!("status: {}", status.state);
//!
//! qmp.execute(qx_qmp::qapi_qmp::system_powerdown {}).await?;
//! while let Ok(event) = events.recv().await {
//!     match event {
//!         Event::Qemu(event) => {
//!             if let QemuEvent::Shutdown { reason, .. } = event.typed() {
//!                 println!("guest shut down: {reason:?}");
//!             }
//!         }
//!         Event::Closed { reason } => {
//!             println!("QMP closed: {reason}");
//!             break;
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod channel;
mod client;
pub mod commands;
mod error;
mod events;
mod fdpass;
mod protocol;
pub mod qga;

pub use client::{AddFdInfo, ConnectOptions, QmpClient};
pub use error::Error;
pub use events::{BlockJobInfo, JobStatus, MigrationStatus, QemuEvent, RunState, ShutdownCause, Status};
pub use protocol::{Event, Greeting, QmpEvent};
/// The typed QMP commands [`QmpClient::execute`] takes, re-exported so callers name the same version.
pub use qapi_qmp;
/// The `Command` trait [`QmpClient::execute`] takes, re-exported so callers name the same version.
pub use qapi_spec;
