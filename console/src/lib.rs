//! `qx-console`: the host console on TTY1, Quantix's counterpart of ESXi's yellow DCUI.
//!
//! It shows what an operator standing at the machine needs first: the product and version, the node's name and
//! status, where to manage it from, the hardware, how many VMs run, and which accelerator QEMU uses (and why). It
//! talks only to the local `qx-node` daemon, over its unix socket, through [`qx_agent::client`].
//!
//! The crate is split so the screen can be tested without a terminal or a daemon:
//! - [`app`]: the model ([`app::Snapshot`] of the node, [`app::App`] with the operator's state) and key handling;
//! - [`view`]: a pure function from [`app::App`] to a ratatui buffer;
//! - [`poll`]: fetching a [`app::Snapshot`] from `qx-node`, every [`app::REFRESH_INTERVAL`] or on demand.
//!
//! It is not a management tool: VMs are managed through `qxctl` and the gRPC API. The binary `qx-console` wires
//! the three together on a real terminal.
//!
//! ```
//! use qx_console::{app::{App, Snapshot}, view};
//! use ratatui::{backend::TestBackend, Terminal};
//!
//! let mut app = App::new("/run/quantix/node.sock", true);
//! app.set_snapshot(Snapshot::unreachable("connection refused"));
//! let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
//! terminal.draw(|frame| view::render(frame, &app)).unwrap();
//! ```

pub mod app;
pub mod poll;
pub mod view;
