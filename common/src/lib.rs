//! What every Quantix crate needs and none should copy: the field-validation error (one type, one message format,
//! and the parser the console reads it back with), the host root tests fake `/sys` and `/dev` under, the one-line
//! error chain, the boxed future of object-safe async traits, blocking work off the runtime threads, and the
//! crash-safe file write.
//!
//! It is a leaf: it depends on no other workspace crate, and knows nothing of VMs, QEMU, networks or gRPC.
//!
//! # Example
//!
//! ```
//! use qx_common::{Problems, ValidationErrors};
//!
//! let mut p = Problems::default();
//! p.add("vcpus", 0, "is outside 1..=255");
//! p.add("disks[1].path", "/no/such", "does not exist");
//! let err = p.into_result().unwrap_err();
//! assert_eq!(err.to_string(), r#"vcpus: "0" is outside 1..=255; disks[1].path: "/no/such" does not exist"#);
//! // What a front end (qx-console) does with the message it got over gRPC:
//! assert_eq!(ValidationErrors::parse(&err.to_string()), err.0);
//! ```

pub mod atomic;
mod error;
mod host;
mod task;
mod validate;

pub use error::error_chain;
pub use host::HostRoot;
pub use task::{blocking, BoxFuture};
pub use validate::{shorten, FieldError, Problems, ValidationErrors, REDACTED};
