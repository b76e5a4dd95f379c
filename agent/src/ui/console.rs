//! VM consoles in the browser: a VM's VNC display bridged to a WebSocket that carries RFB as it is, for noVNC.
//! A page asks for a ticket (`POST /api/vms/<name>/vnc-ticket`, with its session and CSRF token), then opens
//! `wss://…/api/vms/<name>/vnc?ticket=…`: a WebSocket cannot carry the CSRF header, so the ticket stands for it. A
//! ticket is random, names one VM, lives [`TICKET_LIFETIME`] and opens one connection; the WebSocket also needs
//! the session cookie.
//!
//! The display is QEMU's `-vnc 127.0.0.1:<vnc_display>` (loopback TCP port 5900 + display), set in the VM's spec.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use qx_vmm::state::VmState;
use qx_vmm::VmError;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{cookie_token, csrf_header, json_error, refused, UiState};

/// How long a ticket opens a console.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(30);
/// Tickets kept at most; past it the oldest goes.
const MAX_TICKETS: usize = 256;
/// QEMU's VNC display n listens on TCP port 5900 + n.
const VNC_BASE_PORT: u32 = 5900;

/// Why a console connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("no console ticket: ask POST /api/vms/<name>/vnc-ticket for one")]
    Missing,
    #[error("the console ticket is not one this node issued, or it was used already")]
    Unknown,
    #[error("the console ticket expired (tickets last {} s)", TICKET_LIFETIME.as_secs())]
    Expired,
    #[error("the console ticket is for VM {ticket_vm:?}, not {vm:?}")]
    OtherVm { ticket_vm: String, vm: String },
}

#[derive(Debug)]
struct Ticket {
    vm: String,
    issued: Instant,
}

/// The console tickets issued and not yet used.
#[derive(Debug)]
pub struct Tickets {
    tickets: Mutex<HashMap<String, Ticket>>,
    random: SystemRandom,
}

impl Default for Tickets {
    fn default() -> Self {
        Self { tickets: Mutex::default(), random: SystemRandom::new() }
    }
}

impl Tickets {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ticket>> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new ticket for `vm`.
    pub fn issue(&self, vm: &str) -> String {
        let mut bytes = [0u8; 32];
        self.random.fill(&mut bytes).expect("the system random source works");
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let mut map = self.map();
        map.retain(|_, t| t.issued.elapsed() < TICKET_LIFETIME);
        if map.len() >= MAX_TICKETS {
            if let Some(oldest) = map.iter().min_by_key(|(_, t)| t.issued).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(token.clone(), Ticket { vm: vm.to_owned(), issued: Instant::now() });
        token
    }

    /// Uses up `token` for `vm`. A ticket shown for another VM is used up too: it was leaked or misused.
    pub fn redeem(&self, token: Option<&str>, vm: &str) -> Result<(), TicketError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TicketError::Missing)?;
        let ticket = self.map().remove(token).ok_or(TicketError::Unknown)?;
        if ticket.issued.elapsed() >= TICKET_LIFETIME {
            return Err(TicketError::Expired);
        }
        if ticket.vm != vm {
            return Err(TicketError::OtherVm { ticket_vm: ticket.vm, vm: vm.to_owned() });
        }
        Ok(())
    }
}

/// The loopback VNC port of a VM whose display is up, or the refusal saying why not.
async fn vnc_port(state: &UiState, name: &str) -> Result<u16, Response> {
    let vm = match state.node.vm(name).await {
        Ok((vm, _)) => vm,
        Err(VmError::NotFound(_)) => return Err(json_error(StatusCode::NOT_FOUND, format!("no VM named {name:?}"))),
        Err(error) => return Err(json_error(StatusCode::INTERNAL_SERVER_ERROR, error)),
    };
    let Some(display) = vm.spec.vnc_display else {
        return Err(json_error(
            StatusCode::CONFLICT,
            format!("VM {name:?} has no VNC display: set vnc_display in its spec"),
        ));
    };
    if !matches!(vm.state, VmState::Running | VmState::Paused) {
        return Err(json_error(
            StatusCode::CONFLICT,
            format!("VM {name:?} is {}: its display is there only while it runs", vm.state),
        ));
    }
    Ok(u16::try_from(VNC_BASE_PORT + display).expect("vnc_display is validated to at most 99"))
}

/// `POST /api/vms/<name>/vnc-ticket`: a ticket for the VM's console, for a live session with its CSRF token.
pub(super) async fn ticket(
    State(state): State<Arc<UiState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(error) = state.auth.check(cookie_token(&headers).as_deref(), Some(csrf_header(&headers))) {
        return refused(&error);
    }
    if let Err(response) = vnc_port(&state, &name).await {
        return response;
    }
    let ticket = state.tickets.issue(&name);
    let body = serde_json::json!({
        "ticket": ticket,
        "path": format!("/api/vms/{name}/vnc"),
        "expires_in_seconds": TICKET_LIFETIME.as_secs(),
    });
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

#[derive(Debug, serde::Deserialize)]
pub(super) struct VncQuery {
    ticket: Option<String>,
}

/// `GET /api/vms/<name>/vnc?ticket=…`: the WebSocket, once the session, the ticket and the display check out.
pub(super) async fn websocket(
    State(state): State<Arc<UiState>>,
    Path(name): Path<String>,
    Query(query): Query<VncQuery>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    if let Err(error) = state.auth.check(cookie_token(&headers).as_deref(), None) {
        return refused(&error);
    }
    if let Err(error) = state.tickets.redeem(query.ticket.as_deref(), &name) {
        return json_error(StatusCode::FORBIDDEN, error);
    }
    let port = match vnc_port(&state, &name).await {
        Ok(port) => port,
        Err(response) => return response,
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return json_error(StatusCode::BAD_REQUEST, format!("not a WebSocket request: {rejection}")),
    };
    let vnc = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(vnc) => vnc,
        Err(error) => {
            return json_error(StatusCode::BAD_GATEWAY, format!("VM {name:?}: its VNC display on port {port}: {error}"))
        }
    };
    // noVNC offers "binary" on older versions and nothing on newer ones; either way the frames are binary.
    upgrade.protocols(["binary"]).on_upgrade(move |socket| bridge(socket, vnc, name))
}

/// Copies RFB both ways until either side ends.
async fn bridge(socket: WebSocket, vnc: TcpStream, vm: String) {
    info!(vm = %vm, "Host UI console opened");
    let (mut to_browser, mut from_browser) = socket.split();
    let (mut vnc_read, mut vnc_write) = vnc.into_split();
    let up = async {
        while let Some(Ok(message)) = from_browser.next().await {
            match message {
                Message::Binary(data) => vnc_write.write_all(&data).await?,
                Message::Close(_) => break,
                _ => {}
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = vnc_read.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            to_browser.send(Message::Binary(buf[..n].to_vec().into())).await.map_err(std::io::Error::other)?;
        }
        let _ = to_browser.send(Message::Close(None)).await;
        Ok::<_, std::io::Error>(())
    };
    let ended = tokio::select! { ended = up => ended, ended = down => ended };
    if let Err(error) = ended {
        debug!(vm = %vm, %error, "Host UI console ended");
    }
    info!(vm = %vm, "Host UI console closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_one_console_of_its_own_vm() {
        let tickets = Tickets::default();
        assert_eq!(tickets.redeem(None, "web1"), Err(TicketError::Missing));
        assert_eq!(tickets.redeem(Some("00ff"), "web1"), Err(TicketError::Unknown));
        let ticket = tickets.issue("web1");
        assert_eq!(tickets.redeem(Some(&ticket), "web1"), Ok(()));
        assert_eq!(tickets.redeem(Some(&ticket), "web1"), Err(TicketError::Unknown), "used once");
        let ticket = tickets.issue("web1");
        assert_eq!(
            tickets.redeem(Some(&ticket), "db1"),
            Err(TicketError::OtherVm { ticket_vm: "web1".into(), vm: "db1".into() })
        );
        assert_eq!(tickets.redeem(Some(&ticket), "web1"), Err(TicketError::Unknown), "burnt by the misuse");
    }

    #[test]
    fn old_tickets_expire_and_the_map_stays_bounded() {
        let tickets = Tickets::default();
        let ticket = tickets.issue("web1");
        tickets.map().get_mut(&ticket).unwrap().issued -= TICKET_LIFETIME;
        assert_eq!(tickets.redeem(Some(&ticket), "web1"), Err(TicketError::Expired));
        for _ in 0..MAX_TICKETS + 10 {
            tickets.issue("web1");
        }
        assert_eq!(tickets.map().len(), MAX_TICKETS);
    }
}
