//! `qx-console`: the host console on TTY1, Quantix's counterpart of ESXi's yellow DCUI.
//!
//! It shows what an operator standing at the machine needs first: the product and version, the node's name, its
//! cluster status and control plane, where to manage it from (management IP and URL), SSH, the hardware, how many
//! VMs run, and which accelerator QEMU uses (and why). Its function keys configure the management network (F2),
//! SSH (F3), join or leave a cluster (F4), refresh (F5), restart services (F6), show diagnostics (F7), reboot or
//! shut down (F10) and open an emergency shell (F12). It talks only to the local `qx-node` daemon, over its unix
//! socket ([`qx_agent::client`]), which does all privileged work through its `HostService`.
//!
//! The crate is split so the screen can be tested without a terminal or a daemon:
//! - [`app`]: the model ([`app::Snapshot`] of the node, [`app::App`] with the open dialog) and key handling, which
//!   returns [`app::Action`]s instead of doing anything;
//! - [`dialogs`]: one module per dialog, with the pure checks on what the operator typed;
//! - [`view`]: a pure function from [`app::App`] to a ratatui buffer;
//! - [`poll`]: fetching a [`app::Snapshot`] from `qx-node`, every [`app::REFRESH_INTERVAL`] or on demand;
//! - [`rpc`]: performing the [`rpc::Request`]s actions carry, with timeouts, off the draw path;
//! - [`host`]: the host facts, copied out of the wire types.
//!
//! It is not a management tool: VMs are managed through `qxctl` and the gRPC API. The binary `qx-console` wires
//! the parts together on a real terminal.
//!
//! ```
//! use qx_console::app::{Action, App, Snapshot};
//! use qx_console::rpc::Request;
//! use qx_console::view;
//! use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
//! use ratatui::{backend::TestBackend, Terminal};
//!
//! let mut app = App::new("/run/quantix/node.sock", true);
//! app.set_snapshot(Snapshot::unreachable("connection refused"));
//! // F2 opens the network form and asks for the current configuration.
//! let action = app.on_key(KeyEvent::new(KeyCode::F(2), KeyModifiers::NONE));
//! assert_eq!(action, Action::Call(Request::GetNetworkConfig));
//! let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
//! terminal.draw(|frame| view::render(frame, &app)).unwrap();
//! ```

pub mod app;
pub mod dialogs;
pub mod host;
pub mod poll;
pub mod rpc;
pub mod view;
