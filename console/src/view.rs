//! The console screen: a pure function from [`App`] to a ratatui buffer.
//!
//! From top to bottom: a yellow panel (product, version, node name, hardware, VMs, accelerator), a dark panel
//! (cluster status, control plane, management address and URL, SSH), a notice line, and the key bar. An open
//! dialog is drawn over it ([`dialogs`]). Small terminals lose the lower parts first; nothing here panics, down
//! to a zero-size area.
//!
//! Only characters the Linux console's default font has are used (ASCII and box drawing), since TTY1 is a VGA
//! or framebuffer console, not a terminal emulator.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget, Wrap};
use ratatui::Frame;

use crate::app::{App, NodeSummary, Snapshot, FUNCTION_KEYS, REFRESH_INTERVAL};
use crate::host::{duration, HostSummary, Membership};

mod dialogs;

pub use dialogs::diagnostics_page;

/// Rows of the yellow panel when the terminal has room for them.
const TOP_HEIGHT: u16 = 10;
/// Rows kept for the yellow panel before the key bar and notice line get any.
const MIN_TOP_HEIGHT: u16 = 4;
/// Width of the labels in both panels, so values line up.
const LABEL_WIDTH: usize = 15;
/// Columns left blank on each side of the panels' text.
const MARGIN: u16 = 2;
/// Panels narrower than this get no margin and no wrapping.
const WRAP_MIN_WIDTH: u16 = 40;

const TOP: Style = Style::new().fg(Color::Black).bg(Color::Yellow);
const BODY: Style = Style::new().fg(Color::Gray).bg(Color::Black);
const VALUE: Style = Style::new().fg(Color::White).add_modifier(Modifier::BOLD);
const KEY: Style = Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD);
const ERROR: Style = Style::new().fg(Color::LightRed).add_modifier(Modifier::BOLD);

/// Draws the whole console into `frame`.
pub fn render(frame: &mut Frame, app: &App) {
    let area = frame.area();
    draw(app, area, frame.buffer_mut());
}

/// Draws the whole console into `area` of `buf`.
pub fn draw(app: &App, area: Rect, buf: &mut Buffer) {
    let area = area.intersection(buf.area);
    if area.is_empty() {
        return;
    }
    let keys = key_bar(app, area.width);
    let spare = area.height.saturating_sub(MIN_TOP_HEIGHT);
    let keys_height = spare.min(u16::try_from(keys.len()).unwrap_or(u16::MAX));
    let notice_height = (spare - keys_height).min(1);
    let top_height = (area.height - keys_height - notice_height).min(TOP_HEIGHT);
    let body_height = area.height - keys_height - notice_height - top_height;

    let mut y = area.y;
    let mut next = |height: u16| {
        let rect = Rect::new(area.x, y, area.width, height);
        y += height;
        rect
    };
    let top = next(top_height);
    let body = next(body_height);
    let notice = next(notice_height);
    let key_rect = next(keys_height);

    let mut top_text = top_lines(app);
    if top.height < MIN_TOP_HEIGHT {
        // No room for air above the banner.
        top_text.remove(0);
    }
    panel(top_text, TOP, top, buf);
    panel(body_lines(app), BODY, body, buf);
    Paragraph::new(notice_line(app)).style(BODY).render(notice, buf);
    Paragraph::new(keys).style(BODY).render(key_rect, buf);
    if let Some(dialog) = &app.dialog {
        dialogs::draw(dialog, app, area, buf);
    }
}

/// Fills `area` with `style` and draws `lines` inside a margin, wrapping long ones. Narrow areas get neither
/// margin nor wrapping: words broken over a handful of columns read worse than cut ones.
fn panel(lines: Vec<Line<'_>>, style: Style, area: Rect, buf: &mut Buffer) {
    buf.set_style(area, style);
    let roomy = area.width >= WRAP_MIN_WIDTH;
    let margin = if roomy { MARGIN } else { 0 };
    let inner = Rect { x: area.x + margin, width: area.width - 2 * margin, ..area };
    let paragraph = Paragraph::new(lines).style(style);
    let paragraph = if roomy { paragraph.wrap(Wrap { trim: false }) } else { paragraph };
    paragraph.render(inner, buf);
}

fn top_lines(app: &App) -> Vec<Line<'_>> {
    let node = app.snapshot.as_ref().and_then(|snap| snap.node.as_ref());
    let version = match node {
        Some(node) if !node.version.is_empty() => node.version.as_str(),
        _ => env!("CARGO_PKG_VERSION"),
    };
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut lines = vec![Line::default(), Line::styled(format!("Quantix {version}"), bold)];
    match (&app.snapshot, node) {
        (None, _) => {
            lines.push(Line::from("qx-node: connecting..."));
            lines.push(Line::default());
            lines.push(Line::from(format!("Socket: {}", app.socket.display())));
        }
        (Some(snap), Some(node)) if snap.error.is_none() => {
            lines.push(Line::styled(node.node_name.clone(), bold));
            lines.push(Line::default());
            lines.extend(hardware_lines(node, snap));
        }
        (Some(_), _) if app.reconnecting.is_some() => {
            lines.push(Line::styled("qx-node: reconnecting...", bold));
            lines.push(Line::default());
            lines.push(Line::from(format!("Socket: {}", app.socket.display())));
            lines.push(Line::from("Services are restarting; VMs keep running."));
        }
        (Some(snap), _) => {
            let reason = snap.error.as_deref().unwrap_or("qx-node sent no node information");
            lines.push(Line::styled("qx-node is not reachable", bold));
            lines.push(Line::default());
            lines.push(Line::from(format!("Socket: {}", app.socket.display())));
            lines.push(Line::from(format!("Reason: {reason}")));
        }
    }
    lines
}

fn hardware_lines(node: &NodeSummary, snap: &Snapshot) -> [Line<'static>; 4] {
    let cpu_model = if node.cpu_model.is_empty() { "unknown CPU" } else { node.cpu_model.as_str() };
    let accelerator = match (node.accelerator.as_str(), node.accelerator_reason.as_str()) {
        ("", _) => "unknown".to_owned(),
        (accel, "") => accel.to_owned(),
        (accel, reason) => format!("{accel} ({reason})"),
    };
    [
        labelled("CPU:", format!("{cpu_model} x {}", node.cpu_count), None),
        labelled(
            "Memory:",
            format!("{} used / {} total", gib(node.memory_used_bytes()), gib(node.memory_total_bytes)),
            None,
        ),
        labelled("VMs:", format!("{} / {} running", snap.vms_running, snap.vms_total), None),
        labelled("Accelerator:", accelerator, None),
    ]
}

fn body_lines(app: &App) -> Vec<Line<'static>> {
    let mut lines = vec![Line::default()];
    let snap = app.snapshot.as_ref().filter(|snap| snap.error.is_none() && snap.node.is_some());
    let Some(snap) = snap else {
        lines.push(Line::from(format!("Retrying every {} s; press F5 to retry now.", REFRESH_INTERVAL.as_secs())));
        return lines;
    };
    match &snap.host {
        Some(host) => lines.extend(host_lines(host, app.now)),
        None => {
            lines.push(labelled("Status:", "unknown".into(), Some(VALUE)));
            let reason = snap.host_error.as_deref().unwrap_or("qx-node sent no host status");
            lines.push(labelled("Host status:", reason.to_owned(), None));
        }
    }
    if let Some(node) = snap.node.as_ref().filter(|node| !node.system.is_empty()) {
        lines.push(labelled("System:", node.system.clone(), None));
        if !node.last_update.is_empty() {
            lines.push(labelled("Last update:", node.last_update.clone(), None));
        }
    }
    lines
}

fn host_lines(host: &HostSummary, now: i64) -> Vec<Line<'static>> {
    let cluster = &host.cluster;
    let named = |what: &str| match cluster.cluster_name.as_str() {
        "" => what.to_owned(),
        name => format!("{what} of cluster \"{name}\""),
    };
    let status = match cluster.state {
        Membership::Unknown => "unknown".to_owned(),
        Membership::Standalone => "standalone".to_owned(),
        Membership::Member => named("member"),
        Membership::Disconnected => format!("{}, disconnected", named("member")),
    };
    let control_plane = if cluster.state == Membership::Standalone || cluster.control_plane_url.is_empty() {
        "not joined".to_owned()
    } else {
        let mut text = cluster.control_plane_url.clone();
        if cluster.state == Membership::Disconnected && !cluster.last_error.is_empty() {
            text.push_str(&format!(" (heartbeat failed: {})", cluster.last_error));
        } else if cluster.last_heartbeat_unix > 0 && now > 0 {
            text.push_str(&format!(" (heartbeat {} ago)", duration(now - cluster.last_heartbeat_unix)));
        }
        text
    };
    let mut address =
        if host.management_address.is_empty() { "no address".to_owned() } else { host.management_address.clone() };
    if let Some(net) = &host.network {
        if !net.interface.is_empty() {
            address.push_str(&format!(" on {}", net.interface));
        }
        let mut how = net.mode.label().to_owned();
        if net.vlan != 0 {
            how.push_str(&format!(", VLAN {}", net.vlan));
        }
        address.push_str(&format!(" ({how})"));
    }
    let url = if host.management_url.is_empty() { "not available".to_owned() } else { host.management_url.clone() };
    vec![
        labelled("Status:", status, Some(VALUE)),
        labelled("Control plane:", control_plane, Some(VALUE)),
        labelled("Management IP:", address, Some(VALUE)),
        labelled("Manage at:", url, Some(VALUE)),
        labelled("SSH:", host.ssh.describe(now), Some(VALUE)),
    ]
}

fn notice_line(app: &App) -> Line<'_> {
    let text = if app.refreshing {
        Some("Refreshing...")
    } else if app.reconnecting.is_some() {
        Some("Services are restarting; reconnecting to qx-node...")
    } else {
        app.notice.as_deref()
    };
    match text {
        Some(text) => Line::from(vec![Span::raw(" "), Span::styled(text, KEY)]),
        None => Line::default(),
    }
}

/// The key bar, packed greedily into as many lines as `width` needs.
fn key_bar(app: &App, width: u16) -> Vec<Line<'static>> {
    let quit = app.allow_quit.then_some(("q".to_owned(), "Quit".to_owned()));
    let items = FUNCTION_KEYS.iter().map(|(n, label)| (format!("F{n}"), (*label).to_owned())).chain(quit);
    pack_keys(items, usize::from(width), 1)
}

/// `key label` items packed greedily into lines of at most `width` columns, each starting with `indent` blanks.
fn pack_keys(items: impl IntoIterator<Item = (String, String)>, width: usize, indent: usize) -> Vec<Line<'static>> {
    let fresh = || Line::raw(" ".repeat(indent));
    let mut lines: Vec<Line<'static>> = Vec::new();
    let mut current = fresh();
    for (key, label) in items {
        let item_width = key.len() + 1 + label.len();
        let fits = current.width() + 2 + item_width <= width;
        if current.width() > indent && !fits {
            lines.push(std::mem::replace(&mut current, fresh()));
        }
        if current.width() > indent {
            current.push_span(Span::raw("  "));
        }
        current.push_span(Span::styled(key, KEY));
        current.push_span(Span::raw(format!(" {label}")));
    }
    lines.push(current);
    lines
}

fn labelled(label: &'static str, value: String, value_style: Option<Style>) -> Line<'static> {
    let value = match value_style {
        Some(style) => Span::styled(value, style),
        None => Span::raw(value),
    };
    Line::from(vec![Span::raw(format!("{label:<LABEL_WIDTH$}")), value])
}

fn gib(bytes: u64) -> String {
    // f64 is exact up to 8 PiB, far beyond any host's memory.
    let gib = bytes as f64 / f64::from(1u32 << 30);
    format!("{gib:.1} GiB")
}

#[cfg(test)]
mod dialog_tests;
#[cfg(test)]
mod tests;
