//! An async client for QMP, the QEMU Machine Protocol, over a unix socket: the wire layer the `vmm` crate uses to
//! drive the QEMU processes it runs.
//!
//! [`QmpClient`] connects (retrying while QEMU creates its socket), checks the greeting, negotiates capabilities,
//! then runs commands concurrently from any number of tasks, matching replies by id. Commands go out either raw
//! ([`QmpClient::execute_raw`], JSON in and out, which works with any QEMU) or typed through the `qapi-qmp`
//! definitions ([`QmpClient::execute`], which follow QEMU 9.1's schema: on QEMU 7.2 a few replies, such as
//! `query-machines`, do not decode, so use the raw path for those). File descriptors travel with
//! `SCM_RIGHTS` ([`QmpClient::getfd`], [`QmpClient::add_fd`], [`QmpClient::execute_with_fd`]). Events go to
//! every [`QmpClient::subscribe`]r, and when the socket closes every waiting command fails with
//! [`Error::Closed`] and every subscriber receives [`Event::Closed`].
//!
//! It does not start, watch or kill QEMU, and knows nothing of VMs: process management and the meaning of events
//! belong to `vmm`. Nor does it speak the guest agent protocol (QGA).
//!
//! # Example
//!
//! ```no_run
//! use qx_qmp::{ConnectOptions, Event, QmpClient};
//!
//! # async fn example() -> Result<(), qx_qmp::Error> {
//! let qmp = QmpClient::connect("/run/quantix/vm/web1/qmp.sock", ConnectOptions::default()).await?;
//! println!("QEMU {}.{}", qmp.greeting().major, qmp.greeting().minor);
//!
//! let mut events = qmp.subscribe();
//! let status = qmp.execute_raw("query-status", None).await?;
//! println!("status: {}", status["status"]);
//!
//! qmp.execute_raw("system_powerdown", None).await?;
//! while let Ok(event) = events.recv().await {
//!     match event {
//!         Event::Qemu(event) if event.name == "SHUTDOWN" => println!("guest shut down: {}", event.data),
//!         Event::Qemu(_) => {}
//!         Event::Closed { reason } => {
//!             println!("QMP closed: {reason}");
//!             break;
//!         }
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
mod fdpass;
mod protocol;

pub use client::{AddFdInfo, ConnectOptions, QmpClient};
pub use error::Error;
pub use protocol::{Event, Greeting, QmpEvent};
/// The `Command` trait [`QmpClient::execute`] takes, re-exported so callers name the same version.
pub use qapi_spec;
