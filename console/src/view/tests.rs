use qx_proto::node::v1::NodeInfo;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::*;

const GIB: u64 = 1 << 30;

fn node_info() -> NodeInfo {
    NodeInfo {
        node_name: "node-a".into(),
        hostname: "host-a.lab".into(),
        version: "0.1.0".into(),
        cpu_model: "AMD EPYC 7302P 16-Core Processor".into(),
        cpu_count: 32,
        memory_total_bytes: 64 * GIB,
        memory_available_bytes: 48 * GIB,
        qemu_binary: "/usr/bin/qemu-system-x86_64".into(),
        qemu_version: "9.2.0".into(),
        accelerator: "kvm".into(),
        accelerator_reason: "/dev/kvm is usable".into(),
        vms_total: 5,
        vms_running: 2,
        data_dir: "/var/lib/quantix".into(),
    }
}

fn connected() -> App {
    let mut app = App::new("/run/quantix/node.sock", true);
    app.set_snapshot(Snapshot::from_node_info(node_info()));
    app
}

fn terminal(app: &App, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|frame| render(frame, app)).unwrap();
    terminal
}

/// The buffer's text, one string per row, trailing blanks trimmed.
fn text(app: &App, width: u16, height: u16) -> Vec<String> {
    let terminal = terminal(app, width, height);
    let buffer = terminal.backend().buffer();
    (0..buffer.area.height)
        .map(|y| {
            let row: String = (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect();
            row.trim_end().to_owned()
        })
        .collect()
}

#[test]
fn connected_at_80x24() {
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  node-a",
        "",
        "  CPU:           AMD EPYC 7302P 16-Core Processor x 32",
        "  Memory:        16.0 GiB used / 64.0 GiB total",
        "  VMs:           2 / 5 running",
        "  Accelerator:   kvm (/dev/kvm is usable)",
        "",
        "",
        "",
        "  Status:        standalone",
        "  Control plane: not joined",
        "  Manage at:     https://host-a.lab/",
        "  (the web interface is not available yet; use qxctl)",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services",
        " F7 Diagnostics  F10 Power  F12 Shell  q Quit",
    ];
    assert_eq!(text(&connected(), 80, 24), expected);
}

#[test]
fn styles_at_80x24() {
    let terminal = terminal(&connected(), 80, 24);
    let buffer = terminal.backend().buffer();
    // The yellow panel spans the full width, black on yellow.
    for (x, y) in [(0, 0), (2, 1), (79, 9)] {
        assert_eq!((buffer[(x, y)].fg, buffer[(x, y)].bg), (Color::Black, Color::Yellow), "({x}, {y})");
    }
    assert!(buffer[(2, 1)].modifier.contains(Modifier::BOLD));
    assert_eq!(buffer[(0, 10)].bg, Color::Black);
    // Key names stand out from their labels.
    assert_eq!(buffer[(1, 22)].fg, Color::Yellow);
    assert_eq!(buffer[(4, 22)].fg, Color::Gray);
}

#[test]
fn connected_at_120x40_fits_the_key_bar_on_one_line() {
    let lines = text(&connected(), 120, 40);
    assert_eq!(lines[1], "  Quantix 0.1.0");
    assert_eq!(lines[2], "  node-a");
    assert_eq!(lines[6], "  VMs:           2 / 5 running");
    assert_eq!(lines[11], "  Status:        standalone");
    assert_eq!(lines[38], "");
    assert_eq!(
        lines[39],
        " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services  F7 Diagnostics  F10 Power  F12 Shell  q Quit"
    );
}

#[test]
fn no_quit_key_when_quitting_is_not_allowed() {
    let mut app = connected();
    app.allow_quit = false;
    let lines = text(&app, 120, 40);
    assert_eq!(
        lines[39],
        " F2 Network  F3 SSH  F4 Join cluster  F5 Refresh  F6 Restart services  F7 Diagnostics  F10 Power  F12 Shell"
    );
}

#[test]
fn connecting_before_the_first_answer() {
    let app = App::new("/run/quantix/node.sock", true);
    let lines = text(&app, 80, 24);
    assert_eq!(lines[1], format!("  Quantix {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(lines[2], "  qx-node: connecting...");
    assert_eq!(lines[4], "  Socket: /run/quantix/node.sock");
    assert!(!lines.iter().any(|line| line.contains("VMs:")), "{lines:#?}");
}

#[test]
fn unreachable_daemon_shows_the_reason_instead_of_numbers() {
    let mut app = connected();
    app.set_snapshot(Snapshot::unreachable(
        "cannot connect to qx-node at /run/quantix/node.sock: transport error: Connection refused (os error 111)",
    ));
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  qx-node is not reachable",
        "",
        "  Socket: /run/quantix/node.sock",
        "  Reason: cannot connect to qx-node at /run/quantix/node.sock: transport",
        "  error: Connection refused (os error 111)",
        "",
        "",
        "",
        "",
        "  Status:        standalone",
        "  Control plane: not joined",
        "",
        "  Retrying every 2 s; press F5 to retry now.",
    ];
    let lines = text(&app, 80, 24);
    assert_eq!(lines[..expected.len()], expected);
    assert!(!lines.iter().any(|line| line.contains("VMs:") || line.contains("Memory:")), "{lines:#?}");
}

#[test]
fn notice_and_refreshing_lines() {
    let mut app = connected();
    app.notice = Some("F3 SSH: not available yet".into());
    assert_eq!(text(&app, 80, 24)[21], " F3 SSH: not available yet");
    app.refreshing = true;
    assert_eq!(text(&app, 80, 24)[21], " Refreshing...");
}

#[test]
fn tiny_sizes_degrade_without_panicking() {
    let app = connected();
    assert_eq!(text(&app, 10, 3), ["Quantix 0.", "node-a", ""]);
    assert_eq!(text(&app, 1, 1), ["Q"]);
    assert_eq!(text(&app, 0, 0), Vec::<String>::new());
    assert_eq!(text(&app, 80, 0), Vec::<String>::new());
    assert_eq!(text(&app, 0, 24).len(), 24);
    let unreachable = {
        let mut app = App::new("/s", true);
        app.set_snapshot(Snapshot::unreachable("refused"));
        app
    };
    let connecting = App::new("/s", false);
    for app in [&app, &unreachable, &connecting] {
        for width in 0..=90 {
            for height in 0..=30 {
                terminal(app, width, height);
            }
        }
    }
}

#[test]
fn small_terminal_keeps_the_key_bar() {
    // 40x10: the key bar wraps to four lines and keeps them; the yellow panel gets the rest, the body nothing.
    let expected = [
        "",
        "  Quantix 0.1.0",
        "  node-a",
        "",
        "  CPU:           AMD EPYC 7302P",
        "",
        " F2 Network  F3 SSH  F4 Join cluster",
        " F5 Refresh  F6 Restart services",
        " F7 Diagnostics  F10 Power  F12 Shell",
        " q Quit",
    ];
    assert_eq!(text(&connected(), 40, 10), expected);
}

#[test]
fn draw_respects_an_offset_area() {
    let app = connected();
    let mut buf = Buffer::empty(Rect::new(0, 0, 100, 30));
    draw(&app, Rect::new(10, 3, 80, 24), &mut buf);
    let row: String = (10..30).map(|x| buf[(x, 4)].symbol()).collect();
    assert_eq!(row, "  Quantix 0.1.0     ");
    assert_eq!(buf[(9, 4)].symbol(), " ");
    assert_eq!(buf[(9, 4)].bg, Color::Reset);
}
